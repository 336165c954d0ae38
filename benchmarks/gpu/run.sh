#!/usr/bin/env bash
# The one-command GPU run, for the lent H200 (torch 2.11, no vLLM): everything under $OUT.
# Needs, carried: .gpu_carry/vllm033-lean-target.tar.xz (bash benchmarks/gpu/build_carry.sh).
# Each step has its own time limit, so a failure still leaves the earlier steps' results; every
# step appends {"step", "rc", "seconds"} to $OUT/steps.jsonl and writes $OUT/<step>.log.
#   device run: bash benchmarks/gpu/run.sh        (9 minutes at most; ASYMVLM_GPU_PART=2: the Qwen steps,
#               for a second call)
#   here:       ASYMVLM_GPU_REHEARSAL=1 OUT=/tmp/out bash benchmarks/gpu/run.sh   (no CUDA: what can run)
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/asymvlm-gpu-out}
mkdir -p "$OUT"
started=$(date +%s)
rehearsal=${ASYMVLM_GPU_REHEARSAL:-0}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 begin rc
  shift 2
  begin=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$(( $(date +%s) - begin ))" >> "$OUT/steps.jsonl"
  tail -3 "$OUT/$name.log"
  echo "== $name rc=$rc"
}

# vLLM 0.33's Python without its compiled files, plus the packages the image lacks.
site=/tmp/asymvlm-site
mkdir -p "$site"
tar -xJf .gpu_carry/vllm033-lean-target.tar.xz -C "$site" || { echo "no carry: build it first" >&2; exit 10; }
# platforms/cuda.py imports vllm._C_stable_libtorch unguarded: a module of that name registers the
# stand-ins in every process that loads the CUDA platform.
printf 'from standins import register as _register\n_register()\n' > "$site/vllm/_C_stable_libtorch.py"
# The package as pip would lay it out (kernels/ and configs/ inside it), without pip.
rm -rf "$site/asymvlm_vllm" && cp -r asymvlm_vllm "$site/asymvlm_vllm"
cp -r kernels "$site/asymvlm_vllm/kernels" && cp -r configs "$site/asymvlm_vllm/configs"
export PYTHONPATH="$site:$PWD/benchmarks/gpu"
export VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0
unset TRITON_INTERPRET
echo "unpacked in $(( $(date +%s) - started )) s"

step environment 20 python3 -c "
import json, platform, torch, triton, transformers, vllm, standins
print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
                  'triton': triton.__version__, 'transformers': transformers.__version__, 'vllm': vllm.__version__,
                  'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
                  'standins_defined': standins.register()}))"
cp "$OUT/environment.log" "$OUT/environment.json"
step models 40 python3 benchmarks/gpu/models.py /tmp/asymvlm-models

# Tests run from a copy: from the repository root, the source tree's asymvlm_vllm/ (no kernels/
# inside) would shadow the laid-out package.
tests=$(mktemp -d)
cp -r tests pyproject.toml "$tests/"
if [ "$rehearsal" = 1 ]; then
  step b_gpu_tests 120 bash -c "cd $tests && python3 -m pytest -q --collect-only -m gpu tests/kernels tests/gpu -p no:cacheprovider"
  step imports 120 bash -c "cd $tests && python3 -c 'import vllm.v1.worker.gpu_model_runner, asymvlm_vllm.engine.worker, asymvlm_vllm.kernels.block_table, smoke, record'"
  step smoke_help 60 python3 benchmarks/gpu/smoke.py --help
  echo "rehearsal: CUDA steps skipped"
  exit 0
fi

if [ "${ASYMVLM_GPU_PART:-1}" = 2 ]; then
  # The second call of a session (if the first left time): Qwen2.5-VL-7B, 1,600 image tokens.
  step a2_smoke_qwen 180 python3 benchmarks/gpu/smoke.py /tmp/asymvlm-models/qwen2.5-vl-7b --out "$OUT/a_smoke.jsonl"
  step d2_throughput_qwen 240 python3 benchmarks/gpu/smoke.py /tmp/asymvlm-models/qwen2.5-vl-7b --throughput 32 --out "$OUT/d_throughput.jsonl"
  echo "total $(( $(date +%s) - started )) s"
  exit 0
fi
# a. the plugin on the GPU at a real shape (async scheduling on, as vLLM defaults there)
step a_smoke_llava 120 python3 benchmarks/gpu/smoke.py /tmp/asymvlm-models/llava-1.5-7b --out "$OUT/a_smoke.jsonl"
# b. gpu-marked tests: the CUDA engine (pruning, text eviction) first, then the kernels at real shapes
step b_gpu_tests 200 bash -c "cd $tests && python3 -m pytest -q -m gpu tests/gpu tests/kernels -p no:cacheprovider --junitxml=$OUT/b_gpu_tests.xml"
# c. the kernel benchmarks, with their floors
step c_kernel_benchmarks 40 bash -c "for name in vision_selection block_table block_importance; do python3 benchmarks/\$name.py --out $OUT/c_\$name.json || exit 1; done"
# d. a first throughput ratio: plain vLLM vs the plugin, same flags, same process
step d_throughput 100 python3 benchmarks/gpu/smoke.py /tmp/asymvlm-models/llava-1.5-7b --throughput 64 --out "$OUT/d_throughput.jsonl"
echo "total $(( $(date +%s) - started )) s"
