import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asymvlm_vllm.core import (
    ThresholdBudget,
    UniformBudget,
    decide_vision_pruning,
    importance_gap,
    num_tokens_to_keep,
    select_keep_indices,
    soft_score_mask,
)

from .reference import top_k_reference

# Few distinct values, so ties are common.
tied_scores = st.lists(st.sampled_from([-1.0, -0.0, 0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=64)


@given(tied_scores, st.data())
def test_keep_indices_are_the_top_k_with_ties_to_lower_positions(values, data):
    k = data.draw(st.integers(0, len(values)))
    got = select_keep_indices(torch.tensor(values), k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert got.tolist() == top_k_reference(values, k)
    assert torch.all(got[1:] > got[:-1])  # sorted and unique


@given(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=300), st.data())
def test_keep_indices_are_top_k_for_distinct_floats(values, data):
    k = data.draw(st.integers(0, len(values)))
    assert select_keep_indices(torch.tensor(values), k).tolist() == top_k_reference(values, k)


def test_all_equal_scores_keep_the_first_positions():
    assert select_keep_indices(torch.full((10,), 0.3), 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("k", [-1, 4, 1.5, True])
def test_keep_count_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match=r"num_keep must be an integer in \[0, 3\]"):
        select_keep_indices(torch.zeros(3), k)


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        select_keep_indices(torch.tensor([0.1, float("nan"), 0.2]), 1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 64, 577])
def test_decision_composes_gap_budget_count_and_selection(n):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    budget = ThresholdBudget(gap_low=0.3, gap_high=0.6, ratio_conservative=0.8, ratio_moderate=0.5, ratio_aggressive=0.2)
    d = decide_vision_pruning(scores, budget, min_keep=2)
    assert d.num_tokens == n and d.gap == importance_gap(scores)
    assert d.keep_ratio == budget.keep_ratio(d.gap)
    assert d.num_keep == num_tokens_to_keep(n, d.keep_ratio, 2)
    assert torch.equal(d.keep_indices, select_keep_indices(scores, d.num_keep))


def test_decision_for_a_single_token_keeps_it():
    d = decide_vision_pruning(torch.tensor([0.4]), UniformBudget(0.1))
    assert (d.gap, d.num_keep, d.keep_indices.tolist()) == (0.0, 1, [0])


def test_soft_mask_formula():
    s = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    m = soft_score_mask(s, keep_ratio=0.4, strength=5.0, temperature=0.5)  # k = 2, theta = 0.7
    torch.testing.assert_close(m, -5.0 * torch.sigmoid((0.7 - s) / 0.5))
    assert m[4] == pytest.approx(-2.5)  # the threshold token sits at -C/2
    assert bool(((m <= 0) & (m >= -5)).all())


def test_soft_mask_threshold_is_detached():
    s = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7], requires_grad=True)
    soft_score_mask(s, keep_ratio=0.4, strength=5.0, temperature=0.5).sum().backward()
    z = (0.7 - s.detach()) / 0.5
    analytic = 5.0 * torch.sigmoid(z) * (1 - torch.sigmoid(z)) / 0.5  # d/ds_i with theta constant
    torch.testing.assert_close(s.grad, analytic)  # a theta in the graph would add a term at index 4


def test_soft_mask_batched_rows_use_their_own_threshold():
    s = torch.tensor([[0.1, 0.2, 0.3, 0.4], [4.0, 3.0, 2.0, 1.0]])
    m = soft_score_mask(s, keep_ratio=0.5)
    torch.testing.assert_close(m[0], soft_score_mask(s[0], 0.5))
    torch.testing.assert_close(m[1], soft_score_mask(s[1], 0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(keep_ratio=0.5, strength=-1.0), "strength"),
        (dict(keep_ratio=0.5, temperature=0.0), "temperature"),
    ],
)
def test_soft_mask_refuses_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_score_mask(torch.rand(4), **kwargs)
