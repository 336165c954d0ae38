"""train-scorer → scorer file → calibrate → demo, through the `asymvlm` command, on one tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from asymvlm_vllm.cli import main
from asymvlm_vllm.core import AsymVLMConfig, LearnedRanker, ThresholdBudget, load_scorer
from asymvlm_vllm.hf import PrunedVLM

from .conftest import random_image, sizes_for, trust_remote_code

ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "phi3_v": "Phi3VForCausalLM"}


def _jsonl(folder, n, seed, family):
    folder.mkdir()
    lines = []
    for i, size in enumerate(sizes_for(family, [(96, 96)] * n)):
        random_image(seed + i, *size).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "What is shown in this picture?", "answer": "a red square"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_train_save_load_calibrate_demo(family, tiny_model_dirs, tmp_path, capsys):
    """Phi-3.5-Vision: its processor is remote code in the model directory, so every command
    runs it only with --trust-remote-code (and the library with trust_remote_code=True)."""
    model = str(tiny_model_dirs(family))
    trust = ["--trust-remote-code"] if trust_remote_code(family) else []
    data = _jsonl(tmp_path / "data", 6, seed=100, family=family)
    scorer = tmp_path / "scorer.safetensors"
    assert main(["train-scorer", "--model", model, "--data", str(data), "-o", str(scorer), "--epochs", "1",
                 "--lr", "0.05", "--temperature", "0.05", "--eval-samples", "2",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), *trust]) == 0
    trained = load_scorer(scorer, expected_hidden_size=128, expected_architecture=ARCHITECTURES[family])
    assert not torch.equal(trained.weight, torch.ones(128)) and trained.metadata.calibrated_budget is None

    config_path = tmp_path / "calibrated.yaml"
    assert main(["calibrate", "--model", model, "--data", str(data), "--scorer", str(scorer), "--objective", "fidelity",
                 "--method", "threshold", "--target-keep-ratio", "0.5", "--ratio-grid", "0.25,0.5,0.75,1.0",
                 "-o", str(config_path), "--histogram", str(tmp_path / "gaps.png"), *trust]) == 0
    calibrated = load_scorer(scorer, expected_hidden_size=128)
    assert torch.equal(calibrated.weight, trained.weight)  # the weight survives the metadata rewrite
    assert isinstance(calibrated.metadata.calibrated_budget, ThresholdBudget)
    config = AsymVLMConfig.load(config_path)
    assert config.calibrated and config.vision.ranker == "learned" and config.vision.budget == calibrated.metadata.calibrated_budget
    assert (tmp_path / "gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    image = tmp_path / "data" / "0.png"
    capsys.readouterr()
    assert main(["demo", "--model", model, "--image", str(image), "--question", "What is shown in this picture?",
                 "--config", str(config_path), "--output-dir", str(tmp_path / "demo"), "--repeats", "1",
                 "--max-new-tokens", "2", *trust]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["architecture"] == ARCHITECTURES[family]
    # The demo ran the calibrated rule with the trained scorer: same decision as a direct run.
    vlm = PrunedVLM.from_pretrained(model, config, trust_remote_code=trust_remote_code(family))
    assert isinstance(vlm.ranker, LearnedRanker) and torch.equal(vlm.ranker.weight, trained.weight)
    from asymvlm_vllm.hf import load_image

    prompt = vlm.prune(vlm.process([load_image(image)], ["What is shown in this picture?"]))
    assert report["vision_tokens_kept"] == prompt.vision_tokens_kept[0] < report["vision_tokens_in"]
    assert report["vision_tokens_in"] == {"llava": 64, "phi3_v": 457}[family]  # Phi: 1 x 2 crops of a wide image
    assert report["images"][0]["importance_gap"] == prompt.images[0][0].decision.gap
    assert report["lm_tokens_pruned"] == prompt.lm_lengths[0]
