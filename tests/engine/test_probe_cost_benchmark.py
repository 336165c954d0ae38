"""``benchmarks/probe_cost.py``: the per-request profile of the probe against plain vLLM, on
three real in-process engines each (tiny LLaVA, CPU): plain, the plugin probing with a forward pass,
and the plugin's encoder-only probe; two requests after one warm-up."""

from __future__ import annotations

import json

import pytest

from tests.scripts import BENCHMARKS, load_script

pytestmark = pytest.mark.slow


def test_the_profile_splits_the_plugin_time_to_first_token(tmp_path):
    bench = load_script(BENCHMARKS / "probe_cost.py")
    out = tmp_path / "probe_cost.json"
    bench.main(["--cpu-test-engine", "--requests", "2", "--warmup", "1", "--out", str(out), "--allow-dirty"])
    plain, with_forward, plugin = json.loads(out.read_text())
    assert [r["engine"] for r in (plain, with_forward, plugin)] == ["plain", "plugin, probe with forward pass", "plugin"]
    assert (with_forward["encoder_only_probes"], plugin["encoder_only_probes"]) == (False, True)
    # Plain vLLM: one step of the whole prompt (64 image tokens and the text). The plugin: the
    # probe (the text before the image) and then the pruned prompt, 32 of 64 image tokens.
    assert plain["steps_to_first_token"] == 1 and plain["requests"] == 2
    (whole,) = plain["tokens_per_step"]
    for row in (with_forward, plugin):
        assert row["steps_to_first_token"] == 2
        probe, pruned = row["tokens_per_step"]
        assert row["vision_tokens_kept_mean"] == 32 and pruned == whole - 32 and 1 <= probe < whole - 64
        assert row["parts_seconds"]["decide"] > 0 and row["parts_seconds"]["rewrite"] > 0
        assert row["ttft_ratio"] > 0 and row["commit"] and "dirty" in row and row["vllm"]
    assert plain["parts_seconds"]["decide"] == 0 and plain["parts_seconds"]["schedule"] > 0
    assert plain["decode_step_median_seconds"] > 0 and plain["ttft_ratio"] == 1.0
