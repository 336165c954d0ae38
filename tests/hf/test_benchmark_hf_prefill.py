"""The transformers prefill benchmark stays runnable (its --smoke path: a tiny model on CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "hf_prefill.py"


@pytest.mark.slow
def test_hf_prefill_smoke_run_writes_ratios(tmp_path):
    out = tmp_path / "hf_prefill.json"
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["keep_ratio"] for row in rows] == [1.0, 0.75, 0.5, 0.25]
    assert rows[0]["flops_ratio"] == rows[0]["time_ratio"] == 1.0
    lengths = [row["lm_tokens"] for row in rows]
    assert lengths == sorted(lengths, reverse=True) and rows[-1]["vision_kept"] == 16
    assert all(0 < row["flops_ratio"] <= 1 and {"device", "commit", "date"} <= set(row) for row in rows)
