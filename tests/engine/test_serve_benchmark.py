"""``benchmarks/serve.py --smoke``: real ``vllm serve`` processes (plain, then the plugin) on a
tiny model, driven by ``vllm bench serve``; JSON rows for both sides with every field. Then the
same with an image-QA JSONL dataset and the third server, the plugin probing with a forward pass."""

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


def test_smoke_with_a_dataset_and_the_probe_with_a_forward_pass(tmp_path):
    from PIL import Image

    lines = []
    for i in range(3):
        path = tmp_path / f"image{i}.png"
        Image.new("RGB", (64 + 32 * i, 64), (40 * i, 100, 200)).save(path)
        lines.append(json.dumps({"prompt": f"What colour is picture {i}?", "image_files": [str(path)]}))
    dataset = tmp_path / "qa.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    bench = load_script(BENCHMARKS / "serve.py")
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    bench.main(["--smoke", "--keep-ratio", "0.5", "--dataset", str(dataset), "--compare-probe-forward",
                "--out", str(out), "--png", str(png)])
    rows = json.loads(out.read_text())
    assert [r["side"] for r in rows] == ["plain vLLM", "AsymVLM, probe with forward pass", "AsymVLM"]
    for row in rows:
        assert FIELDS <= set(row) and row["dataset"] == str(dataset)
        assert row["completed"] == 4 and row["failed"] == 0
    forward = rows[1]["server_flags"]
    config = forward[forward.index("--asymvlm-config") + 1]
    assert "encoder_only_probes: false" in open(config).read()
    assert "--asymvlm-config" not in rows[2]["server_flags"]
    assert rows[1]["kept_ratio"] == rows[2]["kept_ratio"] == 0.5
