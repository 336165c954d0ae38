#!/usr/bin/env bash
# One command for a CUDA machine: the gpu-marked kernel tests at real shapes, then every kernel
# benchmark (rows appended to benchmarks/results/*.json). vLLM is not needed, so the package is
# installed without dependencies into a scratch folder; torch, triton, pytest, hypothesis,
# safetensors, pyyaml and pydantic must be importable, or their wheels carried in .whl/
# (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, triton, pytest, hypothesis, safetensors, yaml, pydantic; assert torch.cuda.is_available()" || {
  echo "needs a CUDA device and torch, triton, pytest, hypothesis, safetensors, pyyaml, pydantic" >&2; exit 2; }
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$site" .
unset TRITON_INTERPRET
export ASYMVLM_BENCH_COMMIT="${ASYMVLM_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
# Tests run from a copy: from the repository root, the source tree's asymvlm_vllm/ (which has no
# kernels/ inside; only the installed package does) would shadow the installed one.
work=$(mktemp -d)
cp -r tests pyproject.toml "$work"/
(cd "$work" && python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider)
for name in vision_selection block_table block_importance; do
  python3 "benchmarks/$name.py"  # a script's own folder, not the repo root, leads sys.path
done
