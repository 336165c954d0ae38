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
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
