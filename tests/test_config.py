from importlib import resources
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from asymvlm_vllm.core import (
    AsymVLMConfig,
    BlockEviction,
    ConfigError,
    CosineRanker,
    LearnedRanker,
    LinearBudget,
    RandomRanker,
    ScorerFileError,
    ScorerMetadata,
    SpiralRanker,
    ThresholdBudget,
    list_presets,
    save_scorer,
)

PRESETS = ["gemma-3", "llava-1.5", "llava-next", "phi-3.5-vision", "qwen2.5-vl"]


def test_a_preset_for_each_supported_model():
    assert list_presets() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_say_they_are_uncalibrated(name):
    config = AsymVLMConfig.from_preset(name)
    assert config.architectures and config.vision.enabled
    assert config.calibrated is False
    text = (resources.files("asymvlm_vllm.configs") / f"{name}.yaml").read_text()
    assert "UNCALIBRATED" in text and "0.218" in text and "0.047" in text


@pytest.mark.parametrize("name", PRESETS)
def test_yaml_round_trip(name, tmp_path):
    config = AsymVLMConfig.from_preset(name)
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert AsymVLMConfig.from_yaml(path) == config


def test_both_budget_methods_have_a_preset():
    assert isinstance(AsymVLMConfig.from_preset("llava-1.5").vision.budget, ThresholdBudget)
    assert isinstance(AsymVLMConfig.from_preset("qwen2.5-vl").vision.budget, LinearBudget)


def test_defaults():
    config = AsymVLMConfig()
    assert config.vision.ranker == "cosine" and config.vision.min_keep == 1
    assert config.text.enabled is False
    assert config.text.make_policy() == BlockEviction(512, 16, 1)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"vision": {"budget": {"rule": "uniform", "ratio": 1.5}}}, r"vision.budget.ratio: ratio must be a keep ratio in (0, 1], got 1.5"),
        ({"vision": {"budget": {"rule": "uniform", "ratio": 0}}}, "vision.budget.ratio: ratio must be a keep ratio in (0, 1]"),
        (
            {"vision": {"budget": {"rule": "threshold", "gap_low": 0.3, "gap_high": 0.2, "ratio_conservative": 0.5, "ratio_moderate": 0.4, "ratio_aggressive": 0.3}}},
            "vision.budget: gap_low (0.3) must be <= gap_high (0.2)",
        ),
        (
            {"vision": {"budget": {"rule": "threshold", "gap_low": 0.1, "gap_high": 0.2, "ratio_conservative": 0.2, "ratio_moderate": 0.4, "ratio_aggressive": 0.3}}},
            "ratio_conservative >= ratio_moderate >= ratio_aggressive",
        ),
        ({"vision": {"budget": {"rule": "linear", "target_ratio": 0.3, "slope": 1, "gap_mean": 0.2, "min_ratio": 0.1, "max_ratio": 0.9}}}, "vision.budget.slope: slope must be a finite number <= 0"),
        ({"vision": {"budget": {"rule": "adaptive", "ratio": 0.5}}}, "expected tags: 'uniform', 'threshold', 'linear'"),
        ({"vision": {"budget": {"rule": "uniform"}}}, "vision.budget.ratio: Field required"),
        ({"vision": {"min_keep": 0}}, "vision.min_keep: Input should be greater than or equal to 1 (got 0)"),
        ({"vision": {"ranker": "saliency"}}, "vision.ranker: Input should be 'learned', 'cosine', 'spiral' or 'random'"),
        ({"vision": {"ranker": "learned"}}, "ranker 'learned' needs a scorer file: set vision.scorer"),
        ({"vision": {"ranker": "spiral", "scorer": "w.safetensors"}}, "vision.scorer is set but vision.ranker is 'spiral'"),
        ({"vision": {"enabeld": True}}, "vision.enabeld: Extra inputs are not permitted"),
        ({"text": {"block_size": 0}}, "text.block_size: Input should be greater than or equal to 1 (got 0)"),
        ({"text": {"budget_tokens": "many"}}, "text.budget_tokens: Input should be a valid integer"),
        ({"text": {"protected_recent_blocks": -1}}, "text.protected_recent_blocks: Input should be greater than or equal to 0"),
        ({"vison": {}}, "vison: Extra inputs are not permitted"),
        ([1, 2], "expected a mapping, got list"),
    ],
)
def test_invalid_configs_name_the_field_and_the_allowed_values(data, expected):
    with pytest.raises(ConfigError) as info:
        AsymVLMConfig.from_dict(data, source="test.yaml")
    message = str(info.value)
    assert message.startswith("invalid AsymVLM config (test.yaml):")
    assert expected in message, message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        AsymVLMConfig.from_dict({"vision": {"min_keep": 0}, "text": {"block_size": 0}})
    assert "vision.min_keep" in str(info.value) and "text.block_size" in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read AsymVLM config .*missing.yaml"):
        AsymVLMConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        AsymVLMConfig.load(bad)
    with pytest.raises(ConfigError, match="unknown AsymVLM preset 'llava-2'; presets: gemma-3, llava-1.5"):
        AsymVLMConfig.load("llava-2")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert AsymVLMConfig.load(empty) == AsymVLMConfig()


def test_scorer_path_is_relative_to_the_yaml_and_checked_when_the_ranker_is_built(tmp_path):
    save_scorer(tmp_path / "w.safetensors", torch.full((8,), 0.5), ScorerMetadata(architecture="X", hidden_size=8))
    path = tmp_path / "c.yaml"
    path.write_text("vision:\n  scorer: w.safetensors\n")
    config = AsymVLMConfig.load(path)
    assert config.vision.ranker == "learned" and config.vision.scorer == tmp_path / "w.safetensors"
    ranker = config.vision.make_ranker(expected_hidden_size=8)
    assert isinstance(ranker, LearnedRanker) and ranker.weight.tolist() == [0.5] * 8
    with pytest.raises(ScorerFileError, match="trained for hidden size 8, but the model's is 4096"):
        config.vision.make_ranker(expected_hidden_size=4096)
    path.write_text("vision:\n  scorer: nowhere.safetensors\n")
    with pytest.raises(ScorerFileError, match="nowhere.safetensors does not exist"):
        AsymVLMConfig.load(path).vision.make_ranker()


@pytest.mark.parametrize("name, cls", [("cosine", CosineRanker), ("spiral", SpiralRanker), ("random", RandomRanker)])
def test_baseline_rankers_from_config(name, cls):
    assert isinstance(AsymVLMConfig.from_dict({"vision": {"ranker": name}}).vision.make_ranker(), cls)


def test_configs_are_immutable():
    config = AsymVLMConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.vision.min_keep = 3


def test_preset_files_are_the_repository_configs_folder():
    repo_configs = Path(__file__).parents[1] / "configs"
    assert sorted(p.stem for p in repo_configs.glob("*.yaml")) == PRESETS
