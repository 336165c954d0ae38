"""Per-request AsymVLM options from ``vllm_xargs`` (``SamplingParams.extra_args``)."""

import pytest

from asymvlm_vllm.core.budget import LinearBudget, ThresholdBudget, UniformBudget
from asymvlm_vllm.core.request_options import RequestOptions, RequestOptionsError, request_options_from_extra_args

THRESHOLD = ThresholdBudget(gap_low=0.1, gap_high=0.2, ratio_conservative=0.6, ratio_moderate=0.4, ratio_aggressive=0.2)


def test_no_options_means_the_configured_rule():
    options = request_options_from_extra_args(None)
    assert options == RequestOptions()
    assert options.budget_rule(THRESHOLD) is THRESHOLD
    assert request_options_from_extra_args({"other_plugin_key": 3}) == RequestOptions()


@pytest.mark.parametrize("value, enabled", [("on", True), ("off", False)])
def test_on_off(value, enabled):
    assert request_options_from_extra_args({"asymvlm": value}).enabled is enabled


@pytest.mark.parametrize("value", [1, 0.5])
def test_keep_ratio_gives_a_uniform_rule(value):
    rule = request_options_from_extra_args({"asymvlm_keep_ratio": value}).budget_rule(THRESHOLD)
    assert rule == UniformBudget(ratio=value)
    assert request_options_from_extra_args({"asymvlm_min_keep": 2**20}).min_keep == 2**20


@pytest.mark.parametrize("tier, ratio", [("conservative", 0.6), ("moderate", 0.4), ("aggressive", 0.2)])
def test_a_tier_fixes_the_ratio_of_the_configured_rule(tier, ratio):
    assert request_options_from_extra_args({"asymvlm_budget": tier}).budget_rule(THRESHOLD).keep_ratio(0.5) == ratio
    linear = LinearBudget(target_ratio=0.4, slope=-1.0, gap_mean=0.2, min_ratio=0.2, max_ratio=0.6)
    assert request_options_from_extra_args({"asymvlm_budget": tier}).budget_rule(linear).keep_ratio(0.5) == ratio


@pytest.mark.parametrize("extra, names", [
    ({"asymvlm_keep_ratio": 1.5}, "asymvlm_keep_ratio"),
    ({"asymvlm_keep_ratio": 0}, "asymvlm_keep_ratio"),
    ({"asymvlm_keep_ratio": "lots"}, "asymvlm_keep_ratio"),
    ({"asymvlm_keep_ratio": float("nan")}, "asymvlm_keep_ratio"),
    ({"asymvlm_keep_ratio": True}, "asymvlm_keep_ratio"),
    ({"asymvlm_min_keep": 0}, "asymvlm_min_keep"),
    ({"asymvlm_min_keep": 2.5}, "asymvlm_min_keep"),
    ({"asymvlm_budget": "tiny"}, "asymvlm_budget"),
    ({"asymvlm": "maybe"}, "asymvlm"),
    ({"asymvlm_keepratio": 0.5}, "asymvlm_keepratio"),
    ({"asymvlm": "off", "asymvlm_keep_ratio": 0.5}, "off"),
    ({"asymvlm_keep_ratio": 0.5, "asymvlm_budget": "moderate"}, "not both"),
    # Types are strict: what a JSON client sends is taken at its word, never coerced.
    ({"asymvlm": "yes"}, "asymvlm: must be the string 'on' or 'off'"),
    ({"asymvlm": "OFF"}, "asymvlm: must be the string 'on' or 'off'"),
    ({"asymvlm": 1}, "asymvlm: must be the string 'on' or 'off'"),
    ({"asymvlm": True}, "asymvlm: must be the string 'on' or 'off'"),
    ({"asymvlm": None}, "asymvlm: must be the string 'on' or 'off'"),
    ({"asymvlm_keep_ratio": "0.5"}, "asymvlm_keep_ratio: must be a JSON number"),
    ({"asymvlm_keep_ratio": [0.5]}, "asymvlm_keep_ratio: must be a JSON number"),
    ({"asymvlm_min_keep": "32"}, "asymvlm_min_keep: must be a JSON integer"),
    ({"asymvlm_min_keep": 1.0}, "asymvlm_min_keep: must be a JSON integer"),
    ({"asymvlm_min_keep": True}, "asymvlm_min_keep: must be a JSON integer"),
    ({"asymvlm_text_eviction": "yes"}, "asymvlm_text_eviction: must be the string 'on' or 'off'"),
    ({"asymvlm_text_eviction": True}, "asymvlm_text_eviction: must be the string 'on' or 'off'"),
    ({"asymvlm_text_budget": 0}, "asymvlm_text_budget: must be an integer in .1"),
    ({"asymvlm_text_budget": 64.0}, "asymvlm_text_budget: must be a JSON integer"),
    ({"asymvlm_text_budget": "64"}, "asymvlm_text_budget: must be a JSON integer"),
    ({"asymvlm_text_budget": 2**20 + 1}, "asymvlm_text_budget: must be an integer in .1"),
    ({"asymvlm_text_eviction": "off", "asymvlm_text_budget": 64}, "asymvlm_text_budget is set"),
    ({"asymvlm": "off", "asymvlm_text_budget": 64}, "other asymvlm_. options are set"),
    ({"asymvlm_min_keep": 2**64 - 1}, "asymvlm_min_keep: must be an integer in"),
    ({"asymvlm_min_keep": 2**20 + 1}, "asymvlm_min_keep: must be an integer in"),
    ({"asymvlm_keep_ratio": 0.5, "asymvlm_budget": "adaptive"}, "not both"),
    ({"asymvlm": "off", "asymvlm_budget": "adaptive"}, "off"),
    ({"asymvlm_budget": 3}, "asymvlm_budget"),
])
def test_bad_options_name_the_key(extra, names):
    with pytest.raises(RequestOptionsError, match=names):
        request_options_from_extra_args(extra)


def test_options_round_trip_through_extra_args():
    options = RequestOptions(keep_ratio=0.3, min_keep=4)
    assert request_options_from_extra_args(options.to_extra_args()) == options
    assert RequestOptions().to_extra_args() == {}


@pytest.mark.parametrize("extra, enabled, budget", [
    (None, False, None),
    (None, True, 512),
    ({"asymvlm_text_eviction": "on"}, False, 512),
    ({"asymvlm_text_budget": 48}, False, 48),
    ({"asymvlm_text_budget": 48}, True, 48),
    ({"asymvlm_text_eviction": "off"}, True, None),
    ({"asymvlm": "off"}, True, None),
])
def test_text_eviction_budget_per_request(extra, enabled, budget):
    from asymvlm_vllm.core.config import TextEvictionConfig

    configured = TextEvictionConfig(enabled=enabled, budget_tokens=512)
    assert request_options_from_extra_args(extra).text_eviction_budget(configured) == budget
    options = request_options_from_extra_args(extra)
    assert request_options_from_extra_args(options.to_extra_args()) == options
