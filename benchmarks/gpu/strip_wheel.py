"""Repack vLLM's wheel without compiled files and bulky optional ones (benchmark tooling).

The lent GPU image has torch 2.11, and vLLM 0.33's extensions are built against torch 2.14, so
they are left out; ``standins.py`` replaces the few ops that are reached. ``vllm/benchmarks/``
stays: ``vllm bench serve`` needs it.

    python strip_wheel.py SRC.whl DST.whl
"""

from __future__ import annotations

import re
import sys
import zipfile

COMPILED = re.compile(r"\.so(\.\d+)*$")
BULKY = ("vllm/vllm-rs", "vllm/third_party/deep_gemm/include/", "vllm/third_party/fmha_sm100/cutlass/")


def main(src: str, dst: str) -> None:
    kept = dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if COMPILED.search(info.filename) or info.filename.startswith(BULKY):
                dropped += info.file_size
                continue
            zout.writestr(info, zin.read(info.filename))
            kept += info.file_size
    print(f"{dst}: kept {kept / 2**20:.1f} MiB, dropped {dropped / 2**20:.1f} MiB (uncompressed)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
