#!/usr/bin/env bash
# One command for a CUDA machine: the gpu-marked kernel tests at real shapes, then every kernel
# benchmark (rows appended to benchmarks/results/*.json). vLLM is not needed, so the package is
# installed without dependencies into a scratch folder; torch, triton, pytest, hypothesis,
# safetensors, pyyaml and pydantic must already be importable (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, triton, pytest, hypothesis, safetensors, yaml, pydantic; assert torch.cuda.is_available()" || {
  echo "needs a CUDA device and torch, triton, pytest, hypothesis, safetensors, pyyaml, pydantic" >&2; exit 2; }
site=$(mktemp -d)
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider
for name in vision_selection block_table block_importance; do
  python3 "benchmarks/$name.py"
done
