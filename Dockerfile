# asymvlm-vllm: `vllm serve` with the AsymVLM plugin (vision-token pruning before prefill).
#
#   docker build -t asymvlm-vllm .
#   docker run --gpus all -p 8000:8000 -v /path/to/models:/models:ro asymvlm-vllm
#   docker run --gpus all -p 8000:8000 -v /path/to/models:/models:ro asymvlm-vllm \
#       /models/llava-1.5-7b-hf --plugin asymvlm --asymvlm-config llava-1.5 --max-model-len 4096
#
# The image holds the CUDA user-space libraries that vLLM 0.33's torch wheels bring (CUDA 13.0,
# pinned in requirements/lock.txt); the host needs an NVIDIA driver for CUDA 13.0 (>= 580) and
# the NVIDIA Container Toolkit (`--gpus`). Python 3.11: the version the lock was resolved for.
FROM python:3.11-slim-bookworm

# Triton (vLLM's kernels) compiles a small C launcher when it first runs: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# The README's install ("Set up"): uv, exactly requirements/lock.txt, with requirements/overrides.txt.
# Dependencies first (a layer that changes only with the lock), then the package itself,
# non-editable and without extras, by the same command.
COPY requirements/ /src/requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -q --no-cache-dir uv==0.13.8 \
    && cd /src \
    && /opt/venv/bin/uv pip install --no-cache --python /opt/venv/bin/python -r requirements/lock.txt --override requirements/overrides.txt
COPY . /src
RUN cd /src \
    && /opt/venv/bin/uv pip install --no-cache --python /opt/venv/bin/python -r requirements/lock.txt --override requirements/overrides.txt . \
    && rm -rf /src

# Run as a user without root rights; its home holds the Hugging Face, vLLM and Triton caches.
RUN useradd --create-home --uid 1000 vllm && mkdir /models && chown vllm /models
USER vllm
WORKDIR /home/vllm

# Models are mounted at /models (-v /path/to/models:/models:ro).
# Optional: never reach the Hugging Face Hub. Remove it (or run with -e HF_HUB_OFFLINE=0) to let
# vLLM download a model given by its Hub name.
ENV HF_HUB_OFFLINE=1

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
# Replace the whole command to serve another model or config; every `vllm serve` flag works.
CMD ["/models/llava-1.5-7b-hf", "--plugin", "asymvlm", "--asymvlm-config", "llava-1.5", "--host", "0.0.0.0", "--port", "8000"]
