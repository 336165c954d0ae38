"""``AsymVLMConfig``: the one configuration model, loaded from YAML files or named presets.

Presets live in the repository's ``configs/`` folder, installed as ``asymvlm_vllm.configs``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .budget import BudgetRuleConfig, ThresholdBudget
from .errors import ConfigError, format_validation_error
from .eviction import BlockEviction, MultiTurnEviction
from .rankers import CosineRanker, LearnedRanker, RandomRanker, SpiralRanker, VisionTokenRanker
from .scorer_file import load_scorer

__all__ = ["AsymVLMConfig", "TextEvictionConfig", "VisionPruningConfig", "list_presets"]

RankerName = Literal["learned", "cosine", "spiral", "random"]
DecideWith = Literal["auto", "torch", "triton"]
KERNEL_RANKERS = ("cosine", "learned")  # what the fused select_vision_tokens kernel scores with

# The paper's DocVQA importance-gap distribution (mean 0.218, std 0.047) split at mean ± std.
# Starting points only: calibrate per model with `asymvlm calibrate`.
_DEFAULT_BUDGET = ThresholdBudget(
    gap_low=0.171, gap_high=0.265, ratio_conservative=0.5, ratio_moderate=0.35, ratio_aggressive=0.25
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VisionPruningConfig(_Section):
    """Vision-token pruning before prefill."""

    enabled: bool = True
    ranker: RankerName | None = Field(
        default=None, description="default: 'learned' when a scorer file is given, else 'cosine'"
    )
    scorer: Path | None = Field(default=None, description="scorer file (.safetensors) for the learned ranker")
    budget: BudgetRuleConfig = _DEFAULT_BUDGET
    min_keep: int = Field(default=1, ge=1, description="never keep fewer vision tokens per image")
    seed: int = Field(default=0, description="seed of the random ranker")
    encoder_cache_room: int = Field(
        default=2, ge=0, le=16,
        description="encoder-cache room added to vLLM's, in steps of encoder budget: the probes' full outputs "
                    "beside the pruned copies being prefilled (0: vLLM's size, probes may wait for space)")
    encoder_only_probes: bool = Field(
        default=True,
        description="engine: a step that only probes runs the vision encoder and the decision without the "
                    "language model's forward pass and sampling, whose results the rewrite discards anyway")
    decide_with: DecideWith = Field(
        default="auto",
        description="how the engine scores and selects at the probe step: 'triton' is one packed launch of the "
                    "fused select_vision_tokens kernel for all of a step's images, 'torch' the core's functions "
                    "image by image; 'auto' is 'triton' on CUDA with the cosine or learned ranker, else 'torch'")

    @model_validator(mode="after")
    def _ranker_matches_scorer(self) -> VisionPruningConfig:
        if self.ranker is None:
            object.__setattr__(self, "ranker", "learned" if self.scorer is not None else "cosine")
        elif self.ranker == "learned" and self.scorer is None:
            raise ValueError("ranker 'learned' needs a scorer file: set vision.scorer")
        elif self.ranker != "learned" and self.scorer is not None:
            raise ValueError(
                f"vision.scorer is set but vision.ranker is '{self.ranker}', which ignores it; "
                "remove one of them"
            )
        if self.decide_with == "triton" and self.ranker not in KERNEL_RANKERS:
            raise ValueError(f"vision.decide_with 'triton' scores with the cosine or learned ranker, not '{self.ranker}'")
        return self

    def make_ranker(self, expected_hidden_size: int | None = None) -> VisionTokenRanker:
        """The configured ranker; loads and checks the scorer file for ``learned``."""
        if self.ranker == "learned":
            assert self.scorer is not None
            return LearnedRanker(load_scorer(self.scorer, expected_hidden_size=expected_hidden_size).weight)
        if self.ranker == "spiral":
            return SpiralRanker()
        if self.ranker == "random":
            return RandomRanker(self.seed)
        return CosineRanker()


class TextEvictionConfig(_Section):
    """Eviction of generated tokens from the paged KV cache during decoding."""

    enabled: bool = False
    budget_tokens: int = Field(default=512, ge=1, description="generated tokens kept before eviction starts")
    block_size: int = Field(default=16, ge=1, description="KV-cache block size: eviction frees whole blocks")
    protected_recent_blocks: int = Field(default=1, ge=0, description="newest full blocks never evicted")
    multi_turn: bool = Field(default=False, description="drop whole previous answers by cross-modal similarity")
    multi_turn_answer_budget: int = Field(default=1024, ge=0, description="tokens of previous answers kept")
    protected_recent_answers: int = Field(default=1, ge=0, description="newest previous answers never dropped")

    def make_policy(self) -> BlockEviction:
        return BlockEviction(self.budget_tokens, self.block_size, self.protected_recent_blocks)

    def make_multi_turn_policy(self) -> MultiTurnEviction:
        return MultiTurnEviction(self.multi_turn_answer_budget, self.protected_recent_answers)


class AsymVLMConfig(_Section):
    """Everything AsymVLM needs to know, for one model.

    Examples
    --------
    >>> cfg = AsymVLMConfig.load("llava-1.5")          # a preset by name
    >>> cfg = AsymVLMConfig.load("my-model.yaml")      # or a file
    >>> cfg.vision.budget.keep_ratio(0.3)
    0.25
    """

    description: str = ""
    architectures: list[str] = Field(default_factory=list, description="HF architectures this config is for")
    calibrated: bool = Field(default=False, description="true once the budget was calibrated on this model")
    vision: VisionPruningConfig = VisionPruningConfig()
    text: TextEvictionConfig = TextEvictionConfig()

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base_dir: Path | None = None) -> AsymVLMConfig:
        """Validate ``data``; a relative ``vision.scorer`` is resolved against ``base_dir``."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"invalid AsymVLM config ({source}): expected a mapping, got {type(data).__name__}")
        try:
            config = cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"invalid AsymVLM config ({source})")) from None
        scorer = config.vision.scorer
        if scorer is not None and base_dir is not None and not scorer.is_absolute():
            vision = config.vision.model_copy(update={"scorer": base_dir / scorer})
            config = config.model_copy(update={"vision": vision})
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> AsymVLMConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read AsymVLM config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"AsymVLM config {path} is not valid YAML: {e}") from None
        return cls.from_dict(data, source=str(path), base_dir=path.parent)

    @classmethod
    def from_preset(cls, name: str) -> AsymVLMConfig:
        presets = list_presets()
        if name not in presets:
            raise ConfigError(f"unknown AsymVLM preset '{name}'; presets: {', '.join(presets)}")
        resource = resources.files("asymvlm_vllm.configs") / f"{name}.yaml"
        return cls.from_dict(yaml.safe_load(resource.read_text()), source=f"preset {name}")

    @classmethod
    def load(cls, path_or_preset: str | os.PathLike) -> AsymVLMConfig:
        """A YAML file if ``path_or_preset`` names an existing file or ends in .yaml/.yml, else a preset."""
        text = str(path_or_preset)
        if Path(text).is_file() or text.endswith((".yaml", ".yml")):
            return cls.from_yaml(text)
        return cls.from_preset(text)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def list_presets() -> list[str]:
    """Names of the bundled presets (the ``configs/*.yaml`` file stems)."""
    folder = resources.files("asymvlm_vllm.configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
