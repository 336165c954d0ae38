import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from asymvlm_vllm.core import (
    BudgetRule,
    BudgetRuleConfig,
    LinearBudget,
    ThresholdBudget,
    UniformBudget,
    num_tokens_to_keep,
)

THRESHOLD = ThresholdBudget(
    gap_low=0.171, gap_high=0.265, ratio_conservative=0.5, ratio_moderate=0.35, ratio_aggressive=0.25
)
LINEAR = LinearBudget(target_ratio=0.35, slope=-2.0, gap_mean=0.218, min_ratio=0.15, max_ratio=0.6)

# The shared matrix: every budget rule must pass every test below that takes `rule`.
RULES = [
    UniformBudget(0.3),
    UniformBudget(1.0),
    THRESHOLD,
    ThresholdBudget(gap_low=0.2, gap_high=0.2, ratio_conservative=1.0, ratio_moderate=1.0, ratio_aggressive=0.1),
    LINEAR,
    LinearBudget(target_ratio=0.5, slope=0.0, gap_mean=0.0, min_ratio=0.5, max_ratio=0.5),
]
gaps = st.floats(0.0, 6.0)


@pytest.mark.parametrize("rule", RULES, ids=repr)
@given(a=gaps, b=gaps)
def test_keep_ratio_is_a_ratio_and_non_increasing_in_gap(rule, a, b):
    lo, hi = min(a, b), max(a, b)
    assert isinstance(rule, BudgetRule)
    assert 0.0 < rule.keep_ratio(hi) <= rule.keep_ratio(lo) <= 1.0


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_nan_gap_is_refused(rule):
    with pytest.raises(ValueError, match="NaN"):
        rule.keep_ratio(float("nan"))


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_rules_round_trip_through_their_tag(rule):
    adapter = TypeAdapter(BudgetRuleConfig)
    assert adapter.validate_python(adapter.dump_python(rule)) == rule


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_describe_names_the_rule_and_its_ratios(rule):
    text = rule.describe()
    assert text.startswith(f"{rule.rule} ") and "\n" not in text
    for name in ("ratio", "ratio_conservative", "ratio_moderate", "ratio_aggressive", "min_ratio", "max_ratio"):
        if hasattr(rule, name):
            assert f"{getattr(rule, name):g}" in text, name


def test_threshold_tiers_at_their_boundaries():
    r = THRESHOLD
    assert r.keep_ratio(0.0) == r.keep_ratio(math.nextafter(0.171, 0)) == 0.5
    assert r.keep_ratio(0.171) == r.keep_ratio(math.nextafter(0.265, 0)) == 0.35
    assert r.keep_ratio(0.265) == r.keep_ratio(5.0) == 0.25


def test_linear_formula_and_clamp():
    assert LINEAR.keep_ratio(0.218) == pytest.approx(0.35)
    assert LINEAR.keep_ratio(0.218 + 0.047) == pytest.approx(0.35 - 2 * 0.047)
    assert LINEAR.keep_ratio(0.0) == 0.6  # 0.35 + 2 * 0.218 = 0.786, clamped
    assert LINEAR.keep_ratio(1.0) == 0.15
    assert LINEAR.keep_ratio(0.05) == 0.6


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: UniformBudget(0.0), r"ratio must be a keep ratio in \(0, 1\], got 0.0"),
        (lambda: UniformBudget(1.5), r"ratio must be a keep ratio in \(0, 1\], got 1.5"),
        (lambda: UniformBudget(float("nan")), "ratio must be a keep ratio"),
        (
            lambda: ThresholdBudget(gap_low=0.3, gap_high=0.2, ratio_conservative=0.5, ratio_moderate=0.4, ratio_aggressive=0.3),
            r"gap_low \(0.3\) must be <= gap_high \(0.2\)",
        ),
        (
            lambda: ThresholdBudget(gap_low=0.1, gap_high=0.2, ratio_conservative=0.3, ratio_moderate=0.4, ratio_aggressive=0.3),
            "ratio_conservative >= ratio_moderate >= ratio_aggressive",
        ),
        (
            lambda: ThresholdBudget(gap_low=-0.1, gap_high=0.2, ratio_conservative=0.5, ratio_moderate=0.4, ratio_aggressive=0.3),
            "gap_low must be an importance gap, a finite number >= 0",
        ),
        (
            lambda: ThresholdBudget(gap_low=0.1, gap_high=float("inf"), ratio_conservative=0.5, ratio_moderate=0.4, ratio_aggressive=0.3),
            "gap_high must be an importance gap",
        ),
        (
            lambda: LinearBudget(target_ratio=0.3, slope=0.5, gap_mean=0.2, min_ratio=0.1, max_ratio=0.9),
            "slope must be a finite number <= 0",
        ),
        (
            lambda: LinearBudget(target_ratio=0.95, slope=-1, gap_mean=0.2, min_ratio=0.1, max_ratio=0.9),
            "min_ratio <= target_ratio <= max_ratio",
        ),
        (
            lambda: LinearBudget(target_ratio=0.3, slope=-1, gap_mean=0.2, min_ratio=0.0, max_ratio=0.9),
            r"min_ratio must be a keep ratio in \(0, 1\]",
        ),
        (lambda: UniformBudget(ratio=0.5, ratoi=0.4), "ratoi"),
    ],
)
def test_invalid_rules_name_the_field_and_range(make, match):
    with pytest.raises(ValidationError, match=match):
        make()


def test_five_float_rules_are_keyword_only():
    with pytest.raises(ValidationError):
        ThresholdBudget(0.1, 0.2, 0.5, 0.4, 0.3)


@given(st.integers(0, 20000), st.integers(0, 1000), st.integers(0, 50))
def test_num_tokens_to_keep_counts_decimal_ratios_exactly(n, permille, min_keep):
    ratio = permille / 1000
    exact = int(Fraction(n) * Fraction(permille, 1000))  # floor of the decimal product
    assert num_tokens_to_keep(n, ratio, min_keep) == min(n, max(min_keep, exact))


def test_num_tokens_to_keep_cases():
    assert num_tokens_to_keep(100, 0.29) == 29  # 100 * 0.29 == 28.999999999999996 in binary
    assert num_tokens_to_keep(576, 0.25) == 144
    assert num_tokens_to_keep(5, 0.0) == 1  # min_keep = 1 by default
    assert num_tokens_to_keep(5, 0.0, min_keep=0) == 0
    assert num_tokens_to_keep(3, 0.1, min_keep=10) == 3  # never more than n
    assert num_tokens_to_keep(0, 0.5) == 0
    assert num_tokens_to_keep(1, 1.0) == 1


@pytest.mark.parametrize(
    "args, match",
    [((-1, 0.5), "n must be"), ((10, 1.5), r"ratio must be in \[0, 1\]"), ((10, float("nan")), "ratio"), ((10, 0.5, -1), "min_keep"), ((2.5, 0.5), "n must be")],
)
def test_num_tokens_to_keep_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        num_tokens_to_keep(*args)
