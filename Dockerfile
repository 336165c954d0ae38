# asymvlm-vllm: `vllm serve` with the AsymVLM plugin (vision-token pruning before prefill).
#
#   docker build -t asymvlm-vllm .
#   docker run --gpus all --shm-size 8g -p 8000:8000 -v /path/to/models:/models:ro asymvlm-vllm
#   docker run --gpus all --shm-size 8g -p 8000:8000 -v /path/to/models:/models:ro asymvlm-vllm \
#       /models/llava-1.5-7b-hf --plugin asymvlm --asymvlm-config llava-1.5 --max-model-len 4096 \
#       --host 0.0.0.0 --port 8000
#
# The image holds the CUDA user-space libraries that vLLM 0.33's torch wheels bring (CUDA 13.0,
# pinned in requirements/lock.txt); the host needs an NVIDIA driver for CUDA 13.0 (>= 580) and
# the NVIDIA Container Toolkit (`--gpus`). Python 3.11: the version the lock was resolved for.
#
# BASE is the published base; a build may substitute an equivalent Debian bookworm image with
# Python 3.11 at `python` (tests/docker/smoke.sh does, where Docker Hub cannot be reached).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG BASE
# Optional, for the labels: --build-arg REVISION=$(git rev-parse HEAD) --build-arg SOURCE=<repository URL>
ARG REVISION=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="asymvlm-vllm" \
      org.opencontainers.image.description="vllm serve with the AsymVLM plugin: vision-token pruning before prefill" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# Triton (vLLM's kernels) compiles a small C launcher when it first runs: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# The README's install ("Set up"): uv, exactly requirements/lock.txt, with requirements/overrides.txt.
# Dependencies first (a layer that changes only with the lock), then the package itself,
# non-editable and without extras, by the same command. pip and uv trust the system's CA
# store (/etc/ssl/certs), so a build behind a TLS-inspecting proxy can mount its CA bundle
# there for the build only; nothing of it is written into the image.
COPY requirements/ /src/requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -q --no-cache-dir --cert /etc/ssl/certs/ca-certificates.crt uv==0.13.8 \
    && cd /src \
    && /opt/venv/bin/uv pip install --no-cache --system-certs --python /opt/venv/bin/python -r requirements/lock.txt --override requirements/overrides.txt
COPY . /src
RUN cd /src \
    && /opt/venv/bin/uv pip install --no-cache --system-certs --python /opt/venv/bin/python -r requirements/lock.txt --override requirements/overrides.txt . \
    && rm -rf /src

# Run as a user without root rights. Its home holds the Hugging Face, vLLM, Triton and
# FlashInfer caches; the home belongs to group 0 as well, so `docker run --user <any uid>:0`
# (e.g. OpenShift) can write them too.
RUN useradd --create-home --uid 1000 --gid 0 vllm \
    && mkdir -p /home/vllm/.cache /models \
    && chown -R vllm:0 /home/vllm /models \
    && chmod -R g=u /home/vllm
ENV HOME=/home/vllm \
    XDG_CACHE_HOME=/home/vllm/.cache \
    HF_HOME=/home/vllm/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/vllm/.cache/vllm \
    TRITON_CACHE_DIR=/home/vllm/.cache/triton
USER vllm
WORKDIR /home/vllm

# Models are mounted at /models (-v /path/to/models:/models:ro).
# Optional: never reach the Hugging Face Hub. Remove it (or run with -e HF_HUB_OFFLINE=0) to let
# vLLM download a model given by its Hub name.
ENV HF_HUB_OFFLINE=1

EXPOSE 8000
# vLLM's own readiness endpoint. Loading a large model takes minutes, hence the start period.
# Serving on another port: docker run --health-cmd '...:PORT/health...' (or --no-healthcheck).
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8)"]
ENTRYPOINT ["vllm", "serve"]
# Replace the whole command to serve another model or config; every `vllm serve` flag works.
CMD ["/models/llava-1.5-7b-hf", "--plugin", "asymvlm", "--asymvlm-config", "llava-1.5", "--host", "0.0.0.0", "--port", "8000"]
