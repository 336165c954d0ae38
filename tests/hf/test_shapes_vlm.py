"""The shapes VLM: training runs, is deterministic and resumes exactly; the shipped checkpoint answers."""

import json

import numpy as np
import pytest
import torch

from asymvlm_vllm import cli
from asymvlm_vllm.core import AsymVLMConfig, UniformBudget, load_scorer
from asymvlm_vllm.core.errors import AsymVLMError
from asymvlm_vllm.hf import PrunedVLM, shapes
from asymvlm_vllm.hf.shapes_vlm import (ShapesTrainingSettings, accuracy, build_shapes_vlm, load_training_checkpoint,
                                        pixel_values, shipped_config, shipped_model_dir, shipped_scorer,
                                        train_shapes_vlm)

SMALL = ShapesTrainingSettings(steps=6, batch_size=8, warmup_steps=2)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_processor_sees_what_training_sees():
    _, processor = build_shapes_vlm()
    items = shapes.make_items("test", 4)
    processed = processor.image_processor([it.pil_image() for it in items], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values(np.stack([it.image for it in items])), processed, rtol=0, atol=1e-6)


def test_every_answer_is_one_word_token_then_the_end(tmp_path):
    _, processor = build_shapes_vlm()
    tok = processor.tokenizer
    for answer in shapes.answer_vocabulary():
        ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids).strip() == answer


def test_training_lowers_the_loss_and_is_deterministic():
    settings = ShapesTrainingSettings(steps=30, batch_size=16, warmup_steps=5)
    model_a, _, run_a = train_shapes_vlm(settings, progress=False)
    first, last = np.mean(run_a.loss_history[:3]), np.mean(run_a.loss_history[-3:])
    assert first > 4.0 and last < 0.5 * first  # from ~ln(512) toward the answer prior
    model_b, _, run_b = train_shapes_vlm(settings, progress=False)
    assert run_a.loss_history == run_b.loss_history and same(weights(model_a), weights(model_b))


def test_a_resumed_run_continues_exactly(tmp_path):
    whole, _, run = train_shapes_vlm(SMALL, progress=False)
    _, _, first = train_shapes_vlm(SMALL, checkpoint_dir=tmp_path, checkpoint_every=3, progress=False)
    assert [p.name for p in first.checkpoints] == ["step-000003.safetensors", "step-000006.safetensors"]
    resumed, _, second = train_shapes_vlm(SMALL, resume=tmp_path / "step-000003.safetensors", progress=False)
    assert second.steps == 6 and second.loss_history == run.loss_history
    assert same(weights(resumed), weights(whole))


def test_resuming_with_other_settings_or_a_foreign_file_is_refused(tmp_path):
    train_shapes_vlm(SMALL, checkpoint_dir=tmp_path, checkpoint_every=3, progress=False)
    with pytest.raises(AsymVLMError, match="cannot resume"):
        train_shapes_vlm(ShapesTrainingSettings(steps=6, batch_size=8, warmup_steps=2, learning_rate=1e-3),
                         resume=tmp_path / "step-000003.safetensors", progress=False)
    scorer = tmp_path / "not-a-checkpoint.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(3)}, scorer)
    with pytest.raises(AsymVLMError, match="not a shapes-VLM training checkpoint"):
        load_training_checkpoint(scorer)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=-1), dict(learning_rate=float("nan")),
                                 dict(seed=True), dict(weight_decay=-0.1), dict(curriculum=((1.5, 1),)),
                                 dict(curriculum=((0.5, 9),))])
def test_bad_settings_are_named(bad):
    with pytest.raises(AsymVLMError, match=next(iter(bad))):
        ShapesTrainingSettings(**bad)


def test_the_curriculum_adds_distractors_then_the_task():
    settings = ShapesTrainingSettings(steps=100, warmup_steps=10)
    assert [settings.objects_at(s) for s in (0, 9, 10, 24, 25, 99)] == [1, 1, 2, 2, 4, 4]
    lr = settings.learning_rate
    assert settings.learning_rate_at(0) == pytest.approx(lr / 10) and settings.learning_rate_at(9) == pytest.approx(lr)
    assert settings.learning_rate_at(10) == pytest.approx(lr) and settings.learning_rate_at(99) < 0.01 * lr


def test_the_command_writes_a_model_directory_both_paths_load(tmp_path, capsys):
    out = tmp_path / "model"
    code = cli.main(["train-tiny-vlm", "-o", str(out), "--steps", "4", "--batch-size", "4", "--eval-items", "8",
                     "--checkpoint-every", "2"])
    assert code == 0
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == 4 and card["test_items"] == 8 and 0.0 <= card["accuracy_keep_1"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "model.checkpoints").iterdir()) == [
        "step-000002.safetensors", "step-000004.safetensors"]
    vlm = PrunedVLM.from_pretrained(out)
    assert vlm.hidden_size == 128 and "test accuracy" in capsys.readouterr().out


def test_shapes_data_writes_a_split(tmp_path, capsys):
    assert cli.main(["shapes-data", "-o", str(tmp_path), "--split", "test", "--items", "5"]) == 0
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 5


# ---------------------------------------------------------------- the shipped checkpoint


@pytest.fixture(scope="module")
def shipped():
    return PrunedVLM.from_pretrained(shipped_model_dir())


def test_the_shipped_model_answers_the_task(shipped):
    items = shapes.make_items("test", 400)
    result = accuracy(shipped, items)
    assert result["accuracy"] >= 0.93, result["accuracy"]
    card = json.loads((shipped_model_dir() / "card.json").read_text())
    assert card["accuracy_keep_1"] >= 0.93 and card["wall_seconds"] <= 15 * 60
    assert (shipped_model_dir() / "model.safetensors").stat().st_size < 5 * 2**20


def test_the_shipped_scorer_and_config_load_for_the_shipped_model(shipped):
    scorer = load_scorer(shipped_scorer(), expected_hidden_size=shipped.hidden_size)
    assert scorer.metadata.architecture == "LlavaForConditionalGeneration" and scorer.metadata.training is not None
    config = AsymVLMConfig.load(shipped_config())
    assert config.calibrated and config.vision.ranker == "learned"
    assert config.vision.scorer == shipped_scorer()


def test_answer_positions_predict_the_answer(shipped):
    """The 'answer' states of scorer training are exactly where the model predicts the answer."""
    from asymvlm_vllm.hf.data import Sample
    from asymvlm_vllm.hf.training import prepare_training_prompt

    item = shapes.make_item(2, 1, kind="colour")
    sample = Sample(image=_png(item), question=item.question, answers=(item.answer,))
    prompt = prepare_training_prompt(shipped, sample)
    with torch.no_grad():
        hidden = shipped.model.model(**prompt.forward_kwargs()).last_hidden_state[0]
        predicted = shipped.model.lm_head(hidden[prompt.answer_positions]).argmax(-1).tolist()
    tok = shipped.processor.tokenizer
    assert predicted == tok(" " + item.answer, add_special_tokens=False)["input_ids"]


def _png(item) -> bytes:
    import io

    buf = io.BytesIO()
    item.pil_image().save(buf, format="PNG")
    return buf.getvalue()


def test_pruning_the_answer_cell_away_breaks_colour_answers(shipped):
    """The model reads the answer from the answer cell: keeping every cell but that one fails."""
    from asymvlm_vllm.hf.shapes import AnswerCellRanker

    items = [shapes.make_item(2, i, kind="colour") for i in range(40)]
    kept = accuracy(shipped, items, UniformBudget(0.125), lambda it: AnswerCellRanker(it.relevant))
    dropped = accuracy(shipped, items, UniformBudget(63 / 64),
                       lambda it: AnswerCellRanker(tuple(c for c in range(64) if c != it.relevant[0])))
    assert kept["accuracy"] >= 0.9 and all(kept["kept_relevant"])
    assert dropped["accuracy"] <= 0.4 and not any(dropped["kept_relevant"])
