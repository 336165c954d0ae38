"""`asymvlm demo` end to end on real tiny models (no mocks): numbers, files, caching, errors."""

import json
import socket

import numpy as np
import pytest
from PIL import Image

from asymvlm_vllm import cli, plots
from asymvlm_vllm.core import AsymVLMConfig, UniformBudget
from asymvlm_vllm.core.flops import prefill_flops
from asymvlm_vllm.hf import PrunedVLM
from asymvlm_vllm.core import SpiralRanker
from asymvlm_vllm.hf import shapes
from asymvlm_vllm.hf.demo import sample_question, shapes_sample
from asymvlm_vllm.hf.pruning import prune_prompt
from asymvlm_vllm.hf.shapes_vlm import shipped_config, shipped_model_dir
from tests.hf.conftest import cell_tile, colourful, nearest_colour, random_image, remote_hd_transform


@pytest.fixture
def offline(monkeypatch):
    """The hub disabled, and any network connection an error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(self, *args, **kwargs):
        raise OSError("asymvlm demo tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def run_cli(capsys, *argv):
    code = cli.main(["demo", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample_image():
    from importlib import resources

    with resources.as_file(resources.files("asymvlm_vllm.assets") / "sample.png") as path:
        with Image.open(path) as img:
            return img.convert("RGB")


def text_dims(model_dir):
    config = json.loads((model_dir / "config.json").read_text())["text_config"]
    return config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]


def test_bundled_samples_are_small_and_have_questions():
    from importlib import resources

    png = resources.files("asymvlm_vllm.assets") / "sample.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(png.read_bytes()) < 30_000
    assert sample_image().size == (256, 256)
    assert sample_question().strip().endswith("?")
    picture, question, answer, cell = shapes_sample()
    assert picture.size == (64, 64) and question in shapes.question_vocabulary()
    assert answer in shapes.answer_vocabulary() and 0 <= cell < 64


def test_bundled_shapes_sample_is_what_its_metadata_says():
    """Independent of the model: the answer cell holds the asked shape in the answer's colour."""
    picture, question, answer, cell = shapes_sample()
    tile = cell_tile(picture, cell)
    asked = question.rstrip("?").split()[-1]
    assert np.array_equal(colourful(tile), shapes.MASKS[asked])
    assert nearest_colour(tile) == answer


def test_default_demo_answers_right_and_shows_a_bad_ranker(offline, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, "--output-dir", str(out_dir), "--repeats", "3")
    assert code == 0
    report = json.loads((out_dir / "report.json").read_text())
    model_dir = shipped_model_dir()
    assert report["model_dir"] == str(model_dir) and report["shipped_model"]
    assert report["config_source"].startswith("shipped shapes_asymvlm.yaml")
    picture, question, answer, cell = shapes_sample()
    assert report["question"] == question and report["expected_answer"] == answer

    # Recompute the decision independently with the same model, config, image and question.
    vlm = PrunedVLM.from_pretrained(model_dir, shipped_config())
    inputs = vlm.process([picture], [question])
    prompt = vlm.prune(inputs)
    (decision,) = prompt.images[0]
    num_keep = decision.decision.num_keep
    assert report["vision_tokens_in"] == 64
    assert report["vision_tokens_kept"] == num_keep < report["vision_tokens_in"]
    assert report["images"][0]["importance_gap"] == pytest.approx(decision.decision.gap)
    assert report["images"][0]["keep_ratio"] == decision.decision.keep_ratio
    assert report["lm_tokens_unpruned"] == prompt.prompt_lengths[0]
    assert report["lm_tokens_pruned"] == prompt.lm_lengths[0]
    assert report["lm_tokens_unpruned"] - report["lm_tokens_pruned"] == 64 - num_keep

    d, m, layers = text_dims(model_dir)
    assert (report["hidden_size"], report["intermediate_size"], report["num_layers"]) == (d, m, layers)
    assert report["flops_unpruned"] == prefill_flops(report["lm_tokens_unpruned"], d, m, layers)
    assert report["flops_pruned"] == prefill_flops(report["lm_tokens_pruned"], d, m, layers)
    assert 0 < report["flops_saved_fraction"] < 1
    assert report["prefill_seconds_unpruned"] > 0 and report["prefill_seconds_pruned"] > 0
    assert report["prefill_repetitions"] == 3

    # The answer is right, the answer cell was kept, and greedy decoding of the pruned prompt gives it.
    assert report["answer_token_ids"] == vlm.generate(inputs, max_new_tokens=24).tokens[0]
    assert report["answer"] == answer and report["correct"] and report["answer_cell_kept"]
    assert bool(decision.kept_prunable[cell])
    # The spiral ranker at 0.25 drops the answer cell and gets it wrong.
    contrast = report["contrast"]
    assert contrast["ranker"] == "spiral" and contrast["keep_ratio"] == 0.25 and contrast["vision_tokens_kept"] == 16
    assert not contrast["answer_cell_kept"] and not contrast["correct"] and contrast["answer"] != answer
    spiral = prune_prompt(vlm.model, vlm.adapter, inputs, SpiralRanker(), UniformBudget(0.25), 1)
    assert not bool(spiral.images[0][0].kept_prunable[cell])

    for needle in (
        "the shapes VLM trained for this package",
        "vision tokens in   64 (8 x 8 grid)",
        f"vision tokens kept {num_keep} of 64",
        f'"{answer}"  (right: the answer is "{answer}"; answer cell kept)',
        "With a position-only ranker instead (spiral at keep 0.25, 16 tokens kept)",
        "(wrong: answer cell dropped)",
        str(out_dir / "heatmap.png"),
    ):
        assert needle in out, needle
    assert "gibberish" not in out

    # Figures: drawn at 256 px (the 64-px image upscaled 4x); dropped patches are dark in the mask.
    with Image.open(out_dir / "heatmap.png") as heatmap:
        assert heatmap.format == "PNG" and heatmap.size == plots.heatmap_figure_size((256, 256))
    kept = decision.kept_prunable.reshape(8, 8).numpy()
    with Image.open(out_dir / "mask.png") as mask_png:
        assert mask_png.size == (256, 256)
        mask = np.asarray(mask_png.convert("RGB")).astype(float)
    original = np.asarray(picture.resize((256, 256), Image.Resampling.NEAREST)).astype(float)
    for r in range(8):
        for c in range(8):
            block = (slice(32 * r, 32 * r + 32), slice(32 * c, 32 * c + 32))
            if kept[r, c]:
                assert np.array_equal(mask[block], original[block])
            else:
                assert mask[block].mean() <= 0.25 * original[block].mean() + 1


def test_a_question_of_ones_own_about_the_bundled_image(offline, tmp_path, capsys):
    picture, _, _, _ = shapes_sample()
    code, out, _ = run_cli(capsys, "--question", "is there a ring?", "--output-dir", str(tmp_path), "--repeats", "1")
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["expected_answer"] is None and report["contrast"] is None and report["answer"] in ("yes", "no")


def test_keep_ratio_forces_a_uniform_budget(offline, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "--keep-ratio", "0.25", "--output-dir", str(tmp_path), "--repeats", "1",
                           "--max-new-tokens", "1")
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    # floor(64 * 0.25) = 16: a config's min_keep does not apply to a forced ratio.
    assert report["vision_tokens_kept"] == report["images"][0]["num_keep"] == 16
    assert report["min_keep"] == 1 and report["budget"] == "uniform keep ratio 0.25"
    assert report["lm_tokens_unpruned"] - report["lm_tokens_pruned"] == 64 - 16
    assert "floor(64 x 0.25) = 16" in out


def test_config_file_overrides_the_shipped_config(offline, tmp_path, capsys):
    config = AsymVLMConfig.from_preset("llava-1.5").model_dump(mode="json")
    config["vision"]["budget"] = {"rule": "uniform", "ratio": 0.25}
    config["vision"]["min_keep"] = 40
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    code, out, _ = run_cli(capsys, "--config", str(path), "--output-dir", str(tmp_path / "out"), "--repeats", "1",
                         "--max-new-tokens", "1")
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["vision_tokens_kept"] == 40 and report["config_source"] == f"file {path}"
    assert report["ranker"] == "cosine"
    assert "floor(64 x 0.25) = 16, raised to min_keep 40" in out


def test_real_model_directory_of_another_family(offline, tiny_model_dirs, tmp_path, capsys):
    model_dir = tiny_model_dirs("qwen2_5_vl")
    image_path = tmp_path / "picture.png"
    random_image(3).save(image_path)
    code, out, _ = run_cli(capsys, "--model", str(model_dir), "--image", str(image_path),
                           "--question", "What is shown in this picture?", "--output-dir", str(tmp_path / "out"),
                           "--repeats", "1", "--max-new-tokens", "3")
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["architecture"] == "Qwen2_5_VLForConditionalGeneration" and not report["shipped_model"]
    assert report["config_source"] == "preset qwen2.5-vl"  # picked by architecture
    assert report["image"] == str(image_path) and report["question"] == "What is shown in this picture?"
    assert report["images"][0]["grid_shape"] == [1, 8, 8]

    vlm = PrunedVLM.from_pretrained(model_dir, "qwen2.5-vl")
    prompt = vlm.prune(vlm.process([random_image(3)], ["What is shown in this picture?"]))
    num_keep = sum(d.decision.num_keep for d in prompt.images[0])
    assert report["vision_tokens_in"] == 64 and report["vision_tokens_kept"] == num_keep < 64
    d, m, layers = text_dims(model_dir)
    assert report["flops_pruned"] == prefill_flops(prompt.lm_lengths[0], d, m, layers)
    assert "gibberish" not in out
    with Image.open(tmp_path / "out" / "heatmap.png") as heatmap:
        assert heatmap.size == plots.heatmap_figure_size((224, 224))


def test_family_without_a_single_grid_skips_the_heatmap(offline, tiny_model_dirs, tmp_path, capsys):
    model_dir = tiny_model_dirs("llava_next")
    code, out, _ = run_cli(capsys, "--model", str(model_dir), "--keep-ratio", "0.5", "--output-dir", str(tmp_path),
                           "--repeats", "1", "--max-new-tokens", "1")
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    image = report["images"][0]
    structural = image["vision_tokens"] - image["prunable_tokens"]
    assert structural > 0  # the newline rows
    assert image["kept_rows"] == image["num_keep"] + structural == report["vision_tokens_kept"]
    assert image["num_keep"] == image["prunable_tokens"] // 2
    assert report["heatmap_path"] is None and not (tmp_path / "heatmap.png").exists()
    assert "no heatmap: LlavaNextForConditionalGeneration image tokens form no single patch grid" in out
    assert (tmp_path / "report.json").is_file()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p: ["--image", str(p / "missing.png"), "--question", "What?"], "image file not found"),
        (lambda p: ["--image", str(p / "notes.txt"), "--question", "What?"], "cannot read"),
        (lambda p: ["--question", "   "], "the question is empty"),
        (lambda p: ["--image", str(p / "picture.png")], "--image needs --question"),
        (lambda p: ["--model", str(p)], "is not a model directory (no config.json)"),
        (lambda p: ["--model", str(p / "nowhere")], "is not a model directory (no config.json)"),
        (lambda p: ["--config", "no-such-preset"], "unknown AsymVLM preset 'no-such-preset'"),
    ],
)
def test_bad_input_exits_2_before_any_model_work(offline, tmp_path, monkeypatch, capsys, make_args, message):
    (tmp_path / "notes.txt").write_text("not an image")
    random_image(0).save(tmp_path / "picture.png")
    code, out, err = run_cli(capsys, *make_args(tmp_path), "--output-dir", str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("asymvlm: error: ") and message in err
    assert out == ""
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_a_clear_error(offline, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    code, _, err = run_cli(capsys, "--model", str(tmp_path))
    assert code == 2 and "LlamaForCausalLM is not supported by asymvlm demo" in err


@pytest.mark.parametrize("ratio", ["0", "1.5", "nan", "half"])
def test_keep_ratio_out_of_range_is_a_usage_error(capsys, ratio):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--keep-ratio", ratio])
    assert exit_info.value.code == 2
    assert "argument --keep-ratio: expected a number in (0, 1], got" in capsys.readouterr().err


def test_run_demo_returns_the_report(offline, tmp_path):
    from asymvlm_vllm.hf.demo import format_report, run_demo

    report = run_demo(question="how many red shapes?", keep_ratio=0.5, output_dir=tmp_path, max_new_tokens=1,
                      repetitions=1)
    assert report.question == "how many red shapes?" and report.vision_tokens_kept == 32
    assert report.flops_ratio == report.flops_pruned / report.flops_unpruned
    assert json.loads((tmp_path / "report.json").read_text())["flops_ratio"] == report.flops_ratio
    assert format_report(report).startswith("AsymVLM demo\n")
    assert UniformBudget(0.5).keep_ratio(report.images[0].importance_gap) == report.images[0].keep_ratio


def test_remote_code_family_needs_the_users_flag(offline, tiny_model_dirs, tmp_path, capsys):
    """Phi-3.5-Vision's processor is code in the model directory: without --trust-remote-code the
    demo refuses before any model work and says which flag runs it."""
    model_dir = tiny_model_dirs("phi3_v")
    code, out, err = run_cli(capsys, "--model", str(model_dir), "--output-dir", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert err.startswith("asymvlm: error: ") and "remote code" in err and "pass --trust-remote-code" in err
    assert not (tmp_path / "out").exists()


def test_phi3v_heatmap_is_drawn_over_the_hd_transformed_picture(offline, tiny_model_dirs, tmp_path, capsys):
    """A 160 x 64 picture: the HD transform resizes it to 672 x 268 and pads it with white to
    672 x 336 (34 px above, 34 below), 1 x 2 crops of 336 px; their 12 x 24 patches (28 px each)
    are the first 288 prunable rows, drawn over that padded picture. The global view's 144
    rows are not drawn, and the note says so."""
    model_dir = tiny_model_dirs("phi3_v")
    picture = random_image(5, 64, 160)
    image_path = tmp_path / "wide.png"
    picture.save(image_path)
    question = "What is shown in this picture?"
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, "--model", str(model_dir), "--trust-remote-code", "--image", str(image_path),
                           "--question", question, "--output-dir", str(out_dir), "--repeats", "1",
                           "--max-new-tokens", "2")
    assert code == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["architecture"] == "Phi3VForCausalLM" and report["config_source"] == "preset phi-3.5-vision"
    image = report["images"][0]
    # (1·2 + 1)·144 + 1 + (1 + 1)·12 rows: 12 newlines after the crops' rows, the global
    # separator, 12 newlines after the global view's rows.
    assert image["vision_tokens"] == 457 and image["prunable_tokens"] == 288 + 144 and image["grid_shape"] is None
    assert image["kept_rows"] == image["num_keep"] + 25 == report["vision_tokens_kept"]

    vlm = PrunedVLM.from_pretrained(model_dir, "phi-3.5-vision", trust_remote_code=True)
    (decision,) = vlm.prune(vlm.process([picture], [question])).images[0]
    kept = decision.kept_prunable
    assert image["num_keep"] == int(kept.sum()) and image["importance_gap"] == pytest.approx(decision.decision.gap)
    crops, global_view = kept[:288].reshape(12, 24).numpy(), kept[288:]
    assert 0 < crops.sum() < 288
    assert (f"not in the heatmap: the global view's 144 tokens (12 x 12 patches of the whole image, downscaled to "
            f"336 px); {int(global_view.sum())} of 144 kept") in out
    assert "heatmap: the 12 x 24 patch grid of the 672 x 336 px image" in out

    hd = np.asarray(remote_hd_transform()(picture, hd_num=4)).astype(float)  # the processor's own
    assert hd.shape == (336, 672, 3)
    assert np.all(hd[:34] == 255) and np.all(hd[-34:] == 255) and not np.all(hd[34] == 255)  # the white bands
    with Image.open(out_dir / "heatmap.png") as heatmap:
        assert heatmap.size == plots.heatmap_figure_size((672, 336))
    with Image.open(out_dir / "mask.png") as mask_png:
        assert mask_png.size == (672, 336)
        mask = np.asarray(mask_png.convert("RGB")).astype(float)
    for r in range(12):
        for c in range(24):
            block = (slice(28 * r, 28 * r + 28), slice(28 * c, 28 * c + 28))
            if crops[r, c]:
                assert np.array_equal(mask[block], hd[block]), (r, c)
            else:
                assert mask[block].mean() <= 0.25 * hd[block].mean() + 1, (r, c)
