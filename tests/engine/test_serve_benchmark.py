"""``benchmarks/serve.py --smoke``: two real ``vllm serve`` processes (plain, then the plugin) on a
tiny model, driven by ``vllm bench serve``; JSON rows for both sides with every field."""

from __future__ import annotations

import json

from tests.scripts import BENCHMARKS, load_script

FIELDS = {
    "commit", "dirty", "date", "device", "vllm", "torch", "transformers", "model", "regime", "side", "concurrency",
    "server_flags", "serve_flags", "input_len", "output_len", "image", "seed", "completed", "failed", "duration_s",
    "request_throughput", "output_throughput", "peak_kv_usage", "preemptions", "vision_tokens", "kept_ratio",
    *(f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl") for stat in ("mean", "median", "p99")),
    "request_throughput_ratio", "mean_ttft_ms_ratio", "p99_itl_ms_ratio",
}


def test_smoke_serves_both_sides_and_writes_every_field(tmp_path):
    bench = load_script(BENCHMARKS / "serve.py")
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    bench.main(["--smoke", "--keep-ratio", "0.5", "--out", str(out), "--png", str(png)])
    plain, plugin = json.loads(out.read_text())
    assert (plain["side"], plugin["side"]) == ("plain vLLM", "AsymVLM")
    for row in (plain, plugin):
        assert FIELDS <= set(row), FIELDS - set(row)
        assert row["completed"] == 4 and row["failed"] == 0 and row["regime"] == "relaxed"
        assert row["request_throughput"] > 0 and row["mean_ttft_ms"] > 0 and row["mean_tpot_ms"] > 0
    assert "--plugin" in plugin["server_flags"] and "--plugin" not in plain["server_flags"]
    assert plain["vision_tokens"] is None and plain["request_throughput_ratio"] == 1.0
    # /metrics counts every request of the level, the load generator's warm-up ones included.
    assert plugin["vision_tokens"] % 64 == 0 and plugin["vision_tokens"] >= 4 * 64 and plugin["kept_ratio"] == 0.5
    assert png.stat().st_size > 1000
