#!/usr/bin/env bash
# Build the carry for benchmarks/gpu/run.sh: vLLM 0.33.0 without compiled files plus the packages
# the lent GPU image lacks (carry-packages.txt), installed with pip --target for CPython 3.12
# manylinux x86-64 and packed as one tar.xz (~27 MiB; a device call carries 64 MiB in all).
#   bash benchmarks/gpu/build_carry.sh [OUT_DIR=.gpu_carry]
# OUT_DIR must be git-ignored (.gitignore has .gpu_carry/) and named in the device call's carry.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-.gpu_carry}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/dl" vllm==0.33.0 $(grep -v '^#' "$here/carry-packages.txt")
mkdir -p "$work/whl"
wheel=$(ls "$work"/dl/vllm-0.33.0-*.whl)
python3 "$here/strip_wheel.py" "$wheel" "$work/whl/$(basename "$wheel")"
find "$work/dl" -name '*.whl' ! -name 'vllm-0.33.0-*' -exec mv {} "$work/whl/" \;
python3 -m pip install -q --no-index --no-deps --no-compile "${plat[@]}" --target "$work/target" "$work"/whl/*.whl
tar -C "$work/target" -cJf "$out/vllm033-lean-target.tar.xz" .
ls -la "$out/vllm033-lean-target.tar.xz"
