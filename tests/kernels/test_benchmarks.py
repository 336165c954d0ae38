"""Every kernel benchmark runs (its --smoke path: tiny shapes on CPU under the interpreter)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
KERNELS = Path(__file__).parents[2] / "kernels"
NAMES = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")


def test_every_kernel_has_a_benchmark_and_a_test_of_the_same_name():
    assert NAMES, "no kernels found"
    for name in NAMES:
        assert (BENCHMARKS / f"{name}.py").is_file(), f"benchmarks/{name}.py is missing"
        assert (Path(__file__).parent / f"test_{name}.py").is_file(), f"tests/kernels/test_{name}.py is missing"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_benchmark_smoke_run_writes_rows(name, tmp_path):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all({"device", "commit", "date"} <= set(row) for row in rows)
