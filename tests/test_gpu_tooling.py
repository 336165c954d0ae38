"""The GPU run's tooling (``benchmarks/gpu/``), on CPU: the op stand-ins against formulas and the
tool that turns a run's output into result rows. (``run.sh`` itself needs the lent GPU; its
non-CUDA steps are rehearsed with ``ASYMVLM_GPU_REHEARSAL=1``, see ``benchmarks/README.md``.)"""

from __future__ import annotations

import json

import pytest
import torch

from tests.scripts import BENCHMARKS, load_script

GPU = BENCHMARKS / "gpu"


def _load(name: str):
    return load_script(GPU / f"{name}.py", f"asymvlm_gpu_{name}")


def test_standins_compute_what_the_compiled_ops_do():
    # The functions, not the registered ops: registering _C ops here could clash with the CPU
    # engine's test shim in the same process.
    s = _load("standins")
    torch.manual_seed(0)
    x, w = torch.randn(5, 64), torch.rand(64) + 0.5
    out = torch.empty_like(x)
    s.rms_norm(out, x, w, 1e-6)
    xd = x.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    residual = torch.randn(5, 64)
    summed = x + residual
    x2, r2 = x.clone(), residual.clone()
    s.fused_add_rms_norm(x2, r2, w, 1e-6)
    torch.testing.assert_close(r2, summed)
    sd = summed.double()
    torch.testing.assert_close(x2.double(), sd / torch.sqrt(sd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double(),
                               rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(3, 8)
    act = torch.empty(3, 4)
    s.silu_and_mul(act, gate_up)
    torch.testing.assert_close(act, gate_up[:, :4] * torch.sigmoid(gate_up[:, :4]) * gate_up[:, 4:])
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    s.apply_repetition_penalties_(logits, torch.tensor([[True, False, False]]), torch.tensor([[False, True, False]]),
                                  torch.tensor([2.0]))
    assert logits.tolist() == [[1.0, -4.0, 1.0]]
    assert s.CALLS["rms_norm"] == 1 and set(s.SCHEMAS) == set(s._IMPLS)


def test_record_turns_a_run_into_rows(tmp_path):
    record = _load("record")
    out = tmp_path / "out"
    out.mkdir()
    (out / "environment.json").write_text("noise\n" + json.dumps({"device": "NVIDIA H200", "torch": "2.11.0+cu130",
                                                                  "triton": "3.6.0", "vllm": "0.33.0"}) + "\n")
    (out / "steps.jsonl").write_text("\n".join(json.dumps(s) for s in [
        {"step": "a_smoke_llava", "rc": 0, "seconds": 80}, {"step": "d_throughput", "rc": 0, "seconds": 90},
        {"step": "a2_smoke_qwen", "rc": 124, "seconds": 40}]) + "\n")
    (out / "a_smoke.jsonl").write_text(json.dumps({"model": "llava-1.5-7b", "step": "greedy", "ok": True}) + "\n")
    (out / "d_throughput.jsonl").write_text(json.dumps({"step": "throughput_ratio", "ratio": 1.25}) + "\n")
    rows = record.main([str(out), "--out", str(tmp_path / "gpu.json")])
    assert [r["step"] for r in rows] == ["a_smoke_llava", "d_throughput", "a2_smoke_qwen"]
    for row in rows:
        assert {"commit", "dirty", "gpu", "route", "date", "rc", "seconds", "measured"} <= set(row)
        assert row["gpu"] == "NVIDIA H200" and row["route"]["torch"] == "2.11.0+cu130"
        assert row["route"]["compiled_ops"].startswith("stand-ins")
    assert rows[0]["measured"] == [{"model": "llava-1.5-7b", "step": "greedy", "ok": True}]
    assert json.loads((tmp_path / "gpu.json").read_text()) == rows
    assert "plugin / plain requests per second: 1.25" in record.table(rows)


@pytest.mark.slow
@pytest.mark.parametrize("shape, layers, hidden, side, image_tokens", [
    ("llava-1.5-7b", 32, 4096, 336, 576),
    ("gemma-3-4b", 34, 2560, 896, 256),
    ("qwen2.5-vl-7b", 28, 3584, 336, 144),  # a 24 x 24 patch grid, merged 2 x 2
    ("llava-mid", 8, 1024, 336, 576),  # not a hub model: the CPU engine's mid-sized LLaVA (--cpu-mid)
])
def test_weightless_models_have_the_hub_shapes(tmp_path, shape, layers, hidden, side, image_tokens):
    """``serve.py --shape`` serves these with ``--load-format dummy``: transformers reads the hub
    model's depth and width, and the processor gives the hub model's image-token count."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    models = _load("models")
    out = {**models.SHAPES, "llava-mid": models.llava_mid}[shape](tmp_path / shape)
    assert not list(out.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    text = config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size) == (layers, hidden)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(text=[prompt], images=[Image.new("RGB", (side, side), (90, 120, 200))],
                    return_tensors="pt")["input_ids"][0].tolist()
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert ids.count(image_id) == image_tokens and image_id < text.vocab_size
