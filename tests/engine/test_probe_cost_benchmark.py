"""``benchmarks/probe_cost.py``: the per-request profile of the probe against plain vLLM, on two
real in-process engines (tiny LLaVA, CPU), two requests after one warm-up."""

from __future__ import annotations

import json

import pytest

from tests.scripts import BENCHMARKS, load_script

pytestmark = pytest.mark.slow


def test_the_profile_splits_the_plugin_time_to_first_token(tmp_path):
    bench = load_script(BENCHMARKS / "probe_cost.py")
    out = tmp_path / "probe_cost.json"
    bench.main(["--cpu-test-engine", "--requests", "2", "--warmup", "1", "--out", str(out), "--allow-dirty"])
    plain, plugin = json.loads(out.read_text())
    assert (plain["engine"], plugin["engine"]) == ("plain", "plugin") and plain["requests"] == 2
    # Plain vLLM: one step of the whole prompt (64 image tokens and the text). The plugin: the
    # probe (the text before the image) and then the pruned prompt, 32 of 64 image tokens.
    assert plain["steps_to_first_token"] == 1 and plugin["steps_to_first_token"] == 2
    (whole,) = plain["tokens_per_step"]
    probe, pruned = plugin["tokens_per_step"]
    assert plugin["vision_tokens_kept_mean"] == 32 and pruned == whole - 32 and 1 <= probe < whole - 64
    assert plugin["parts_seconds"]["decide"] > 0 and plugin["parts_seconds"]["rewrite"] > 0
    assert plain["parts_seconds"]["decide"] == 0 and plain["parts_seconds"]["schedule"] > 0
    assert plugin["ttft_ratio"] > 0 and plain["decode_step_median_seconds"] > 0
    assert plugin["commit"] and "dirty" in plugin and plugin["vllm"]
