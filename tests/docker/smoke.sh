#!/usr/bin/env bash
# Build the image from the repository's Dockerfile and serve a pruned image chat from it, on CPU.
#
#   sudo tests/docker/smoke.sh            # or: ASYMVLM_DOCKER_SMOKE=1 pytest tests/docker
#
# Where there is no Docker daemon and no Docker Hub (this project's machines), it uses buildah and
# podman (root, vfs storage, chroot isolation for the build) and a local stand-in for
# python:3.11-slim-bookworm made with debootstrap (Debian bookworm's Python is 3.11 too):
#
#   1. base:   debootstrap --variant=minbase bookworm (+ python3, python3-venv, python-is-python3,
#              ca-certificates), imported as localhost/asymvlm-smoke-base:bookworm;
#   2. build:  buildah bud --build-arg BASE=<that> -f Dockerfile . (the repository's Dockerfile, as is;
#              the host's CA bundle is mounted over the image's for the build's RUN steps only,
#              for a TLS-inspecting proxy in front of the package index);
#   3. image:  runs as `vllm`, has the HEALTHCHECK and the labels, holds no test shim, no /src, and
#              none of the host's extra CA certificates (the whole filesystem is searched);
#   4. serve:  podman run on 127.0.0.1 with a tiny LLaVA mounted read-only at /models, an AsymVLM
#              config with a scorer file mounted read-only at /config, and the TEST-ONLY CPU-op shim
#              mounted read-only and put on PYTHONPATH for this run only;
#              `vllm serve /models/shapes-vlm --plugin asymvlm --asymvlm-config /config/asymvlm.yaml`
#              + the CPU test flags; an image chat must come back `pruned`, /metrics must count it,
#              the HEALTHCHECK must pass and every process in the container must run as `vllm`;
#   5. clean:  every container and image it made, and its storage, are removed (also on failure).
#
# It prints `SMOKE key=value` lines (phase times, image size, peak disk) and a summary at the end.
# Needs: root, buildah, podman, debootstrap (apt-get install buildah podman debootstrap runc),
# about 45 GB free under ASYMVLM_SMOKE_WORK, network access to the Debian mirror and the package index.
#
# Environment: ASYMVLM_SMOKE_WORK (default /var/tmp/asymvlm-docker-smoke; removed at the end),
# ASYMVLM_SMOKE_MIRROR (Debian mirror, default http://deb.debian.org/debian),
# ASYMVLM_SMOKE_CA (CA bundle mounted for the build, default /etc/ssl/certs/ca-certificates.crt),
# ASYMVLM_SMOKE_MODEL (a model directory to serve; default the package's shapes_vlm),
# ASYMVLM_SMOKE_SCORER (its scorer file; default the package's shapes_scorer.safetensors; without
# one the config uses the cosine ranker),
# ASYMVLM_SMOKE_KEEP=1 (keep images and storage for inspection; remove them yourself).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${ASYMVLM_SMOKE_WORK:-/var/tmp/asymvlm-docker-smoke}
MIRROR=${ASYMVLM_SMOKE_MIRROR:-http://deb.debian.org/debian}
CA=${ASYMVLM_SMOKE_CA:-/etc/ssl/certs/ca-certificates.crt}
MODEL_SRC=${ASYMVLM_SMOKE_MODEL:-$REPO/asymvlm_vllm/assets/shapes_vlm}
SCORER_SRC=${ASYMVLM_SMOKE_SCORER:-$REPO/asymvlm_vllm/assets/shapes_scorer.safetensors}
KEEP=${ASYMVLM_SMOKE_KEEP:-0}
BASE_IMAGE=localhost/asymvlm-smoke-base:bookworm
IMAGE=localhost/asymvlm-vllm:smoke
CONTAINER=asymvlm-docker-smoke
MARKER=.asymvlm-docker-smoke
STARTUP_TIMEOUT_S=${ASYMVLM_SMOKE_STARTUP_TIMEOUT_S:-900}

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
report() { printf 'SMOKE %s=%s\n' "$1" "$2"; }

# ------------------------------------------------------------------------------------- preflight
[[ $(id -u) == 0 ]] || fail "needs root (buildah/podman with vfs storage, debootstrap)"
for tool in buildah podman debootstrap python3; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install buildah podman debootstrap runc)"
done
[[ -f $CA ]] || fail "no CA bundle at $CA (ASYMVLM_SMOKE_CA)"
if [[ -e $WORK && ! -e $WORK/$MARKER ]] && [[ -n $(ls -A "$WORK" 2>/dev/null) ]]; then
    fail "$WORK exists and is not this script's; set ASYMVLM_SMOKE_WORK"
fi
RUNTIME=crun
command -v runc >/dev/null && RUNTIME=runc  # crun refuses hybrid cgroups (v1 + v2 unified), runc does not
STORE=(--root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
bah() { buildah "${STORE[@]}" "$@"; }
pod() { podman "${STORE[@]}" --cgroup-manager cgroupfs --events-backend file --runtime "$RUNTIME" "$@"; }

DISK_FS=$(dirname "$WORK")
mkdir -p "$DISK_FS"
used_mb() { df --output=used -B1M "$DISK_FS" | tail -1 | tr -d ' '; }
avail_gb=$(( $(df --output=avail -B1G "$DISK_FS" | tail -1) ))
(( avail_gb >= 40 )) || fail "only ${avail_gb} GB free under $DISK_FS; vfs needs about 45 GB"

# ------------------------------------------------------------------------------- clean-up (always)
SAMPLER=""
cleanup() {
    local rc=$?
    set +e +o pipefail
    [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null || true
    if [[ $KEEP == 1 ]]; then
        log "ASYMVLM_SMOKE_KEEP=1: keeping $WORK (images $BASE_IMAGE, $IMAGE)"
    elif [[ -e $WORK/$MARKER ]]; then
        log "removing every container, image and the storage under $WORK"
        pod rm -f --all >/dev/null 2>&1 || true
        pod image unmount --all >/dev/null 2>&1 || true
        bah rm --all >/dev/null 2>&1 || true
        bah rmi --all --force >/dev/null 2>&1 || true
        grep -o " $WORK[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
        rm -rf "$WORK"
        [[ ! -e $WORK ]] && report cleaned yes || report cleaned no
        [[ -n ${DISK0:-} ]] && report disk_after_cleanup "$(( ($(used_mb) - DISK0) ))MB more than before"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK"
touch "$WORK/$MARKER"
DISK0=$(used_mb)
(peak=$DISK0; while true; do u=$(used_mb); (( u > peak )) && peak=$u && echo "$peak" > "$WORK/disk_peak_mb"; sleep 5; done) &
SAMPLER=$!
echo "$DISK0" > "$WORK/disk_peak_mb"
T0=$(date +%s)
phase_start() { PHASE_T=$(date +%s); log "$1"; }
phase_end() { report "$1" "$(( $(date +%s) - PHASE_T ))s"; }

# ------------------------------------------------------------------------------------ 1. base
phase_start "1/5 base: debootstrap bookworm + python3 -> $BASE_IMAGE"
mkdir -p "$WORK/base"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$WORK/base/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
rm -f "$WORK"/base/rootfs/var/cache/apt/archives/*.deb
rm -rf "$WORK"/base/rootfs/var/lib/apt/lists/*
tar -C "$WORK/base/rootfs" --numeric-owner -cf "$WORK/base/rootfs.tar" .
rm -rf "$WORK/base/rootfs"
printf 'FROM scratch\nADD rootfs.tar /\nENV LANG=C.UTF-8\nCMD ["python3"]\n' > "$WORK/base/Containerfile"
bah bud --isolation chroot -t "$BASE_IMAGE" -f "$WORK/base/Containerfile" "$WORK/base" > "$WORK/base.log" 2>&1 \
    || { tail -20 "$WORK/base.log"; fail "base image"; }
rm -f "$WORK/base/rootfs.tar"
phase_end base_build_time

# ----------------------------------------------------------------------------------- 2. build
phase_start "2/5 build: the repository's Dockerfile, BASE=$BASE_IMAGE -> $IMAGE"
REVISION=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
bah bud --isolation chroot --format docker \
    --build-arg "BASE=$BASE_IMAGE" --build-arg "REVISION=$REVISION" \
    -v "$CA:/etc/ssl/certs/ca-certificates.crt:ro" \
    -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; fail "image build (log above)"; }
phase_end image_build_time
size=$(pod image inspect --format '{{.Size}}' "$IMAGE")
report image_size "$(( size / 1000000 ))MB"

# ----------------------------------------------------------------------------------- 3. image
phase_start "3/5 image: user, healthcheck, labels; no shim, no /src, no host CA"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml")
pod image inspect "$IMAGE" | python3 -c '
import json, sys
image, version, revision = json.load(sys.stdin)[0], sys.argv[1], sys.argv[2]
user, labels, check = image["Config"].get("User"), image["Labels"], image.get("Healthcheck") or {}
test = check.get("Test") or []
problems = [message for ok, message in [
    (user == "vllm", f"image user {user!r}, not vllm"),
    ("/health" in " ".join(test), f"no HEALTHCHECK on /health: {check}"),
    (labels.get("org.opencontainers.image.version") == version, f"version label: {labels}"),
    (labels.get("org.opencontainers.image.revision") == revision, f"revision label: {labels}"),
] if not ok]
print("\n".join(problems) or f"user {user}, healthcheck {test[1:]}, labels {labels}")
sys.exit(1 if problems else 0)' "$version" "$REVISION" || fail "image configuration"
ROOTFS=$(pod image mount "$IMAGE")
shims=$(find "$ROOTFS" -name 'asymvlm_test_cpu_shim*' 2>/dev/null | head -5)
[[ -z $shims ]] || fail "the test shim is in the image: $shims"
[[ ! -e $ROOTFS/src ]] || fail "/src was left in the image"
[[ ! -e $ROOTFS/tests ]] || fail "tests/ is in the image"
# The host's certificates that the image's own bundle does not have (e.g. a TLS proxy's CA): none of
# their lines may appear anywhere in the image.
python3 - "$CA" "$ROOTFS/etc/ssl/certs/ca-certificates.crt" > "$WORK/host_only_ca_lines" <<'EOF'
import re, sys
def certs(path):
    try:
        return set(re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----", open(path).read(), re.S))
    except FileNotFoundError:
        return set()
for body in certs(sys.argv[1]) - certs(sys.argv[2]):
    lines = [l for l in body.splitlines() if len(l) == 64]
    print(lines[len(lines) // 2])  # one distinctive full-width line per certificate
EOF
extra=$(wc -l < "$WORK/host_only_ca_lines")
report host_only_ca_certs "$extra"
if (( extra > 0 )); then
    leaks=$(grep -rlF -f "$WORK/host_only_ca_lines" "$ROOTFS" 2>/dev/null | head -5 || true)
    [[ -z $leaks ]] || fail "the host's CA certificates are in the image: $leaks"
fi
cmp -s "$CA" "$ROOTFS/etc/ssl/certs/ca-certificates.crt" && (( extra > 0 )) && fail "the host's CA bundle is the image's"
pod image unmount "$IMAGE" >/dev/null
phase_end image_check_time

# ----------------------------------------------------------------------------------- 4. serve
phase_start "4/5 serve: vllm serve --plugin asymvlm in the container (CPU, tiny LLaVA)"
mkdir -p "$WORK/model" "$WORK/config"
if [[ -f $MODEL_SRC/config.json ]]; then
    # The model's own files only: vLLM loads every *.safetensors of a model folder as weights, so a
    # scorer file must live elsewhere (here: the config folder).
    find "$MODEL_SRC" -maxdepth 1 -type f ! -name 'scorer*.safetensors' ! -name '*.yaml' -exec cp {} "$WORK/model/" \;
else
    "$REPO/.venv/bin/python" -c "from asymvlm_vllm.hf.tiny import build_tiny_model; build_tiny_model('llava', '$WORK/model')"
fi
# The config: the llava-1.5 preset's budget (keep <= 0.5, so the 64-token image is always pruned),
# with the model's trained scorer when there is one (a relative path: next to the YAML).
if [[ -f $SCORER_SRC ]]; then
    cp "$SCORER_SRC" "$WORK/config/scorer.safetensors"
    ranker="ranker: learned
  scorer: scorer.safetensors"
else
    ranker="ranker: cosine"
fi
cat > "$WORK/config/asymvlm.yaml" <<EOF
description: docker smoke test (the llava-1.5 preset's budget)
architectures: [LlavaForConditionalGeneration]
vision:
  enabled: true
  $ranker
  budget: {rule: threshold, gap_low: 0.171, gap_high: 0.265,
           ratio_conservative: 0.5, ratio_moderate: 0.35, ratio_aggressive: 0.25}
  min_keep: 16
EOF
report asymvlm_config "$(grep -E 'ranker|scorer' "$WORK/config/asymvlm.yaml" | tr -s ' \n' ' ')"
chmod -R a+rX "$WORK/model" "$WORK/config"  # the container's user (uid 1000) reads them
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
hard_nproc=$(ulimit -Hu); [[ $hard_nproc == unlimited || $hard_nproc -gt 32768 ]] && hard_nproc=32768
pod run -d --name "$CONTAINER" \
    --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$hard_nproc:$hard_nproc" \
    --shm-size 1g -p "127.0.0.1:$PORT:8000" \
    -v "$WORK/model:/models/shapes-vlm:ro" -v "$WORK/config:/config:ro" \
    -v "$REPO/tests/engine/cpu_shim:/opt/asymvlm-test-cpu-shim:ro" \
    -e PYTHONPATH=/opt/asymvlm-test-cpu-shim -e VLLM_TARGET_DEVICE=cpu -e VLLM_CPU_KVCACHE_SPACE=1 \
    "$IMAGE" \
    /models/shapes-vlm --plugin asymvlm --asymvlm-config /config/asymvlm.yaml --host 0.0.0.0 --port 8000 \
    --enforce-eager --max-model-len 512 --dtype float32 --block-size 32 \
    --compilation-config '{"custom_ops": ["none"]}' --max-num-seqs 4 > /dev/null 2> "$WORK/run.err" \
    || { cat "$WORK/run.err"; fail "podman run"; }
START=$(date +%s)
until python3 "$REPO/tests/docker/smoke_request.py" health "$URL" 10 2>/dev/null; do
    state=$(pod container inspect --format '{{.State.Status}}' "$CONTAINER")
    if [[ $state != running ]] || (( $(date +%s) - START > STARTUP_TIMEOUT_S )); then
        pod logs --tail 60 "$CONTAINER" 2>&1 | cut -c1-400
        fail "the server did not come up (container $state after $(( $(date +%s) - START )) s)"
    fi
done
report server_startup_time "$(( $(date +%s) - START ))s"
answer=$(python3 "$REPO/tests/docker/smoke_request.py" chat "$URL" /models/shapes-vlm) \
    || { echo "$answer"; pod logs --tail 60 "$CONTAINER" 2>&1; fail "image chat"; }
log "answer: $answer"
report answer "$answer"
python3 "$REPO/tests/docker/smoke_request.py" metrics "$URL" | sed 's/^/  /' || fail "/metrics"
pod healthcheck run "$CONTAINER" || fail "the image's HEALTHCHECK did not pass"
report healthcheck healthy
[[ $(pod exec "$CONTAINER" id -u) == 1000 ]] || fail "exec'd process is not uid 1000"
pod top "$CONTAINER" user args | sed 's/^/  /'
users=$(pod top "$CONTAINER" user | tail -n +2 | sort -u)
[[ $users == vllm ]] || fail "processes run as: $users"
report process_users "$users"
pod exec "$CONTAINER" sh -c 'touch /models/shapes-vlm/x 2>/dev/null' && fail "the model mount is writable"
pod stop -t 20 "$CONTAINER" > /dev/null
pod rm "$CONTAINER" > /dev/null
phase_end serve_time

# ------------------------------------------------------------------------------------ 5. summary
kill "$SAMPLER" 2>/dev/null || true; SAMPLER=""
report peak_extra_disk "$(( ($(cat "$WORK/disk_peak_mb") - DISK0) / 1000 ))GB"
report total_time "$(( $(date +%s) - T0 ))s"
report result passed
log "5/5 passed; cleaning up"
