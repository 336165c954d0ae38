"""Per-request keep ratios from the importance gap (the paper's Methods A and B).

Every budget rule is a small validated dataclass with one method, ``keep_ratio(gap)``; the
``rule`` field names it in YAML configs and scorer files.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Protocol, Union, runtime_checkable

from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, model_validator
from pydantic.dataclasses import dataclass

__all__ = [
    "BudgetRule",
    "BudgetRuleConfig",
    "LinearBudget",
    "ThresholdBudget",
    "UniformBudget",
    "num_tokens_to_keep",
]


def _keep_ratio(value: float, info: ValidationInfo) -> float:
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{info.field_name} must be a keep ratio in (0, 1], got {value}")
    return value


def _gap(value: float, info: ValidationInfo) -> float:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{info.field_name} must be an importance gap, a finite number >= 0, got {value}")
    return value


def _slope(value: float, info: ValidationInfo) -> float:
    if not (math.isfinite(value) and value <= 0.0):
        raise ValueError(
            f"{info.field_name} must be a finite number <= 0 (a larger gap means importance is "
            f"concentrated in fewer tokens, so the keep ratio must not grow), got {value}"
        )
    return value


KeepRatio = Annotated[float, AfterValidator(_keep_ratio)]
Gap = Annotated[float, AfterValidator(_gap)]
Slope = Annotated[float, AfterValidator(_slope)]

_RULE_CONFIG = ConfigDict(extra="forbid", frozen=True)


def _check_gap_input(gap: float) -> float:
    gap = float(gap)
    if math.isnan(gap):
        raise ValueError("importance gap is NaN")
    return gap


@runtime_checkable
class BudgetRule(Protocol):
    """Maps an image's importance gap to the fraction of its vision tokens to keep."""

    def keep_ratio(self, gap: float) -> float: ...

    def describe(self) -> str:
        """One line naming the rule and its parameters (for reports and logs)."""
        ...


@dataclass(config=_RULE_CONFIG)
class UniformBudget:
    """The same keep ratio for every image (the fixed-rate baseline)."""

    ratio: KeepRatio
    rule: Literal["uniform"] = "uniform"

    def keep_ratio(self, gap: float) -> float:
        _check_gap_input(gap)
        return self.ratio

    def describe(self) -> str:
        return f"uniform keep ratio {self.ratio:g}"


@dataclass(config=_RULE_CONFIG, kw_only=True)
class ThresholdBudget:
    """Method A (Eq. 3): three tiers split at ``gap_low`` and ``gap_high``.

    ``gap < gap_low`` → conservative, ``gap_low ≤ gap < gap_high`` → moderate,
    ``gap ≥ gap_high`` → aggressive.
    """

    gap_low: Gap
    gap_high: Gap
    ratio_conservative: KeepRatio
    ratio_moderate: KeepRatio
    ratio_aggressive: KeepRatio
    rule: Literal["threshold"] = "threshold"

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdBudget:
        if self.gap_low > self.gap_high:
            raise ValueError(f"gap_low ({self.gap_low}) must be <= gap_high ({self.gap_high})")
        if not self.ratio_conservative >= self.ratio_moderate >= self.ratio_aggressive:
            raise ValueError(
                "ratios must satisfy ratio_conservative >= ratio_moderate >= ratio_aggressive, got "
                f"{self.ratio_conservative}, {self.ratio_moderate}, {self.ratio_aggressive}"
            )
        return self

    def keep_ratio(self, gap: float) -> float:
        gap = _check_gap_input(gap)
        if gap < self.gap_low:
            return self.ratio_conservative
        if gap < self.gap_high:
            return self.ratio_moderate
        return self.ratio_aggressive

    def describe(self) -> str:
        return (f"threshold rule: gap < {self.gap_low:.4g} keeps {self.ratio_conservative:g}, "
                f"< {self.gap_high:.4g} keeps {self.ratio_moderate:g}, else {self.ratio_aggressive:g}")


@dataclass(config=_RULE_CONFIG, kw_only=True)
class LinearBudget:
    """Method B: ``clamp(target_ratio + slope · (gap − gap_mean), min_ratio, max_ratio)``."""

    target_ratio: KeepRatio
    slope: Slope
    gap_mean: Gap
    min_ratio: KeepRatio
    max_ratio: KeepRatio
    rule: Literal["linear"] = "linear"

    @model_validator(mode="after")
    def _ordered(self) -> LinearBudget:
        if not self.min_ratio <= self.target_ratio <= self.max_ratio:
            raise ValueError(
                "ratios must satisfy min_ratio <= target_ratio <= max_ratio, got "
                f"{self.min_ratio}, {self.target_ratio}, {self.max_ratio}"
            )
        return self

    def keep_ratio(self, gap: float) -> float:
        gap = _check_gap_input(gap)
        ratio = self.target_ratio + self.slope * (gap - self.gap_mean)
        return min(self.max_ratio, max(self.min_ratio, ratio))

    def describe(self) -> str:
        return (f"linear rule: clamp({self.target_ratio:.4g} {self.slope:+.4g} * (gap - {self.gap_mean:.4g}), "
                f"{self.min_ratio:g}, {self.max_ratio:g})")


BudgetRuleConfig = Annotated[
    Union[UniformBudget, ThresholdBudget, LinearBudget], Field(discriminator="rule")
]
"""Any budget rule, told apart by its ``rule`` field (for pydantic models and YAML)."""

# n · ratio is computed in binary floating point: 100 · 0.29 == 28.999999999999996. Products
# this close below an integer are taken as that integer, so a ratio written as a decimal keeps
# the count a person would compute. Float64 rounding error of n · ratio stays below 1e-11 for
# any n < 10**5, far inside this slack.
_FLOOR_SLACK = 1e-9


def num_tokens_to_keep(n: int, ratio: float, min_keep: int = 1) -> int:
    """``min(n, max(min_keep, ⌊n · ratio⌋))``.

    Parameters
    ----------
    n : int
        Number of prunable vision tokens, ``≥ 0``.
    ratio : float
        Keep ratio in ``[0, 1]``.
    min_keep : int
        Floor on the count (never more than ``n``), ``≥ 0``.
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n}")
    if isinstance(min_keep, bool) or int(min_keep) != min_keep or min_keep < 0:
        raise ValueError(f"min_keep must be an integer >= 0, got {min_keep}")
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    kept = math.floor(int(n) * float(ratio) + _FLOOR_SLACK)
    return min(int(n), max(int(min_keep), kept))
