"""``benchmarks/capacity.py --quick`` stays runnable and shows what pruning is for: on a KV-bound
load, keeping half the vision tokens lets more requests run at once than plain vLLM."""

import json

import vllm.v1.core.sched.scheduler  # noqa: F401  (imported at collection: the test times the run, not the import)

from tests.scripts import BENCHMARKS, load_script

BENCHMARK = BENCHMARKS / "capacity.py"


def load_benchmark():
    return load_script(BENCHMARK, "capacity_benchmark")


def test_kv_pool_formula_for_phi35_vision_on_an_h200():
    bench = load_benchmark()
    # (0.9 x 141e9 - 8e9) / (16 tokens x 2 x 32 layers x 32 heads x 96 x 2 bytes)
    assert bench.kv_pool_blocks(141, 0.9, 8, 16) == 18898


def test_quick_run_writes_ratios(tmp_path):
    bench = load_benchmark()
    out, png = tmp_path / "capacity.json", tmp_path / "capacity.png"
    bench.main(["--quick", "--out", str(out), "--png", str(png)])
    rows = json.loads(out.read_text())
    assert [r["scenario"] for r in rows] == ["plain vLLM", "keep 75%", "keep 65%", "keep 50%", "adaptive"]
    fields = {"peak_running", "peak_running_queue", "steps", "blocks_per_request", "pool_capacity", "prefill_flops",
              "peak_running_ratio", "steps_ratio", "blocks_per_request_ratio", "prefill_flops_ratio",
              "vision_tokens_kept_mean", "preemptions", "commit", "dirty", "date", "device", "num_blocks", "requests"}
    assert all(fields <= set(r) for r in rows)
    plain, half = rows[0], rows[3]
    assert plain["peak_running_ratio"] == plain["steps_ratio"] == plain["prefill_flops_ratio"] == 1.0
    assert half["peak_running"] > plain["peak_running"]
    assert half["blocks_per_request"] < 0.6 * plain["blocks_per_request"]
    assert 0.45 < half["prefill_flops_ratio"] < 0.55
    assert half["statuses"] == {"pruned": half["requests"]} and plain["statuses"] == {"plain": plain["requests"]}
    assert png.stat().st_size > 1000
    # A 1700 x 2200 page at 16 crops: 4 x 4 crops, (16 + 1)·144 + 1 + 5·12 = 2,509 rows, of which
    # 48 + 12 newlines and the global separator are never pruned; half of the other 2,448 are kept.
    assert plain["image_tokens"] == 2509 and plain["separator_rows"] == 61
    assert plain["vision_tokens_kept_mean"] == 2509 and half["vision_tokens_kept_mean"] == 61 + 1224


def test_phi35_images_carry_the_separators_of_their_real_layout():
    bench = load_benchmark()
    tokens, separators = bench.phi3v_image(128, 64, 4)  # 2:1 -> 1 x 2 crops, 12 + 1 + 12 separators
    assert tokens == 457 and len(separators) == 25
    assert separators[:2] == [24, 49] and separators[11] == 12 * 25 - 1 and separators[12] == 300
    assert separators[-1] == 456


def test_decode_heavy_quick_run_shows_what_eviction_is_for(tmp_path):
    """Long answers (512 tokens) past a 90-token eviction budget on a KV-bound pool: each
    request holds about half the blocks, more of them decode at once and the queue drains in
    fewer steps."""
    bench = load_benchmark()
    out, png = tmp_path / "capacity.json", tmp_path / "capacity.png"
    bench.main(["--workload", "decode", "--quick", "--out", str(out), "--png", str(png)])
    plain, evict, both = json.loads(out.read_text())
    assert [r["scenario"] for r in (plain, evict, both)] == ["plain vLLM", "evict 90", "keep 50% + evict 90"]
    assert plain["output_tokens"] == 512 and plain["image_tokens"] == 256 and plain["eviction_budget"] == 90
    assert plain["blocks_freed"] == 0 < evict["blocks_freed"]
    # 296 prompt tokens (19 blocks) + at most 90 + 16 generated ones and one protected block: 25 blocks.
    assert evict["blocks_per_request"] <= 25 < plain["blocks_per_request"]
    assert evict["sustained_running_ratio"] > 1.4 and evict["steps_ratio"] < 0.75
    assert both["sustained_running_ratio"] > evict["sustained_running_ratio"]
    assert png.stat().st_size > 1000
