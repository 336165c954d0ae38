import pytest
import torch

from asymvlm_vllm.cli import main
from asymvlm_vllm.core import load_scorer


def test_scorer_init_then_inspect(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    assert main(["scorer", "init", "--architecture", "LlavaForConditionalGeneration", "--hidden-size", "16", "-o", str(path)]) == 0
    scorer = load_scorer(path, expected_hidden_size=16)
    assert torch.equal(scorer.weight, torch.ones(16))
    assert main(["scorer", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"architecture": "LlavaForConditionalGeneration"' in out and "16 of 16 at 1.0" in out


def test_config_check_prints_the_resolved_config_and_warns_if_uncalibrated(capsys):
    assert main(["config", "check", "gemma-3"]) == 0
    captured = capsys.readouterr()
    assert "Gemma3ForConditionalGeneration" in captured.out and "ratio_conservative: 0.7" in captured.out
    assert "not calibrated" in captured.err


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("vision:\n  budget: {rule: uniform, ratio: 2}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "vision.budget.ratio: ratio must be a keep ratio in (0, 1], got 2.0" in capsys.readouterr().err
    bad.write_text("vision:\n  scorer: missing.safetensors\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-command"], "invalid choice"),
        (["scorer", "init", "--architecture", "X", "--hidden-size", "0", "-o", "w"], "expected an integer >= 1, got 0"),
        (["scorer", "init", "--architecture", "X", "--hidden-size", "many", "-o", "w"], "expected an integer >= 1, got 'many'"),
        (["train-tiny-vlm", "-o", "m", "--steps", "0"], "expected an integer >= 1, got 0"),
        (["train-tiny-vlm", "-o", "m", "--lr", "-1"], "expected a number in (0, inf), got -1"),
        (["train-tiny-vlm"], "the following arguments are required: -o/--output"),
        (["shapes-data", "-o", "d", "--split", "dev"], "invalid choice: 'dev'"),
        (["train-scorer", "--model", "m", "--data", "d", "-o", "o", "--compare", "all"], "invalid choice: 'all'"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "train-scorer", "calibrate"])
def test_remote_code_is_off_unless_the_user_turns_it_on(command):
    from asymvlm_vllm.cli import build_parser

    required = {"demo": [], "train-scorer": ["--model", "m", "--data", "d", "-o", "o"],
                "calibrate": ["--model", "m", "--data", "d", "--target-keep-ratio", "0.5"]}[command]
    parser = build_parser()
    assert parser.parse_args([command, *required]).trust_remote_code is False
    assert parser.parse_args([command, *required, "--trust-remote-code"]).trust_remote_code is True


@pytest.mark.parametrize("command", ["demo", "train-scorer", "calibrate"])
def test_a_remote_code_model_without_the_flag_says_which_flag_runs_it(command, tiny_model_dirs, tmp_path, capsys):
    """The tiny Phi-3.5-Vision's processor is code in its directory: refused, exit 2, no output."""
    import json

    from PIL import Image

    Image.new("RGB", (128, 64), "white").save(tmp_path / "img.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "img.png", "question": "What?", "answer": "a"}) + "\n")
    model = str(tiny_model_dirs("phi3_v"))
    argv = {"demo": ["--output-dir", str(tmp_path / "out")],
            "train-scorer": ["--data", str(tmp_path / "data.jsonl"), "-o", str(tmp_path / "out" / "w.safetensors")],
            "calibrate": ["--data", str(tmp_path / "data.jsonl"), "--target-keep-ratio", "0.5",
                          "-o", str(tmp_path / "out" / "c.yaml")]}[command]
    assert main([command, "--model", model, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("asymvlm: error: ")
    assert "remote code" in captured.err and "--trust-remote-code" in captured.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
