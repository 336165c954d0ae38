"""Fused scoring + selection kernel against the core's torch functions.

Scores may differ from the reference by rounding (tolerance per dtype); everything selected
from them must be exactly what the core decides on the same float32 scores.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asymvlm_vllm.core import LinearBudget, ThresholdBudget, UniformBudget
from asymvlm_vllm.kernels.vision_selection import (
    VisionSelection,
    empty_selection,
    pack_budget_rules,
    select_from_scores,
    select_vision_tokens,
    select_vision_tokens_reference,
)

RULES = [
    UniformBudget(0.5),
    UniformBudget(0.29),
    ThresholdBudget(gap_low=0.1, gap_high=0.3, ratio_conservative=0.6, ratio_moderate=0.4, ratio_aggressive=0.2),
    LinearBudget(target_ratio=0.35, slope=-2.0, gap_mean=0.218, min_ratio=0.15, max_ratio=0.6),
]
# dtype and score tolerance in one parameter. On GPU half-precision inputs go through a
# half-precision dot (fp32 accumulation); under the interpreter everything is fp32.
DTYPES = [
    pytest.param((torch.float32, 1e-5), id="fp32"),
    pytest.param((torch.float16, 2e-3), id="fp16"),
    pytest.param((torch.bfloat16, 2e-2), id="bf16"),
]


def _prefilled(batch, total, device):
    out = empty_selection(batch, total, device)
    for t in (out.scores, out.gaps, out.keep_ratios):
        t.fill_(float("nan"))
    out.num_keep.fill_(-7)
    out.keep_indices.fill_(-7)
    out.keep_mask.fill_(True)
    return out


def _cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _check(out: VisionSelection, ref: VisionSelection, exact: VisionSelection, atol: float):
    torch.testing.assert_close(out.scores.cpu(), ref.scores, atol=atol, rtol=0)
    for name in ("gaps", "keep_ratios", "num_keep", "keep_mask", "keep_indices"):
        assert torch.equal(getattr(out, name).cpu(), getattr(exact, name)), name


def _run(lengths_v, lengths_t, dim, dtype, atol, device, rules=None, min_keep=1, weighted=True, seed=0, vision=None):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(sum(lengths_v), dim, generator=g).to(dtype) if vision is None else vision.to(dtype)
    t = torch.randn(sum(lengths_t), dim, generator=g).to(dtype)
    w = torch.rand(dim, generator=g) * 3 if weighted else None
    rules = rules or [RULES[i % len(RULES)] for i in range(len(lengths_v))]
    ids, params = pack_budget_rules(rules, device)
    cu_v, cu_t = _cu(lengths_v, device), _cu(lengths_t, device)
    out = _prefilled(len(lengths_v), sum(lengths_v), device)
    got = select_vision_tokens(
        v.to(device), t.to(device), cu_v, cu_t, max(lengths_v), ids, params, min_keep,
        None if w is None else w.to(device), out=out,
    )
    assert got is out
    ref = select_vision_tokens_reference(v, t, cu_v.cpu(), cu_t.cpu(), rules, min_keep, w)
    exact = select_vision_tokens_reference(v, t, cu_v.cpu(), cu_t.cpu(), rules, min_keep, w, scores=got.scores.cpu())
    _check(got, ref, exact, atol)
    return got


@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize(
    "lengths_v, lengths_t, dim",
    [
        ([1], [1], 8),  # N = 1, L = 1
        ([5], [3], 24),
        ([130], [45], 100),  # several score tiles, text chunks and D chunks; D not a power of two
        ([7, 0, 64, 1, 33], [4, 2, 1, 5, 0], 40),  # mixed lengths, an empty request, empty text
    ],
)
def test_kernel_matches_reference(device, dtype_tol, lengths_v, lengths_t, dim):
    dtype, atol = dtype_tol
    _run(lengths_v, lengths_t, dim, dtype, atol, device)


def test_long_request_crosses_selection_chunks(device):
    got = _run([2500], [40], 16, torch.float32, 1e-5, device, rules=[UniformBudget(0.25)], min_keep=4)
    assert int(got.num_keep[0]) == 625


def test_cosine_and_min_keep(device):
    got = _run([20, 9], [3, 2], 16, torch.float32, 1e-5, device, rules=[UniformBudget(0.1)] * 2, min_keep=5, weighted=False)
    assert got.num_keep.tolist() == [5, 5]


def test_identical_vision_rows_tie_to_the_first_positions(device):
    row = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    got = _run([12], [3], 16, torch.float32, 1e-5, device, rules=[UniformBudget(0.25)], vision=row.repeat(12, 1))
    assert got.keep_indices[:3].tolist() == [0, 1, 2] and int(got.num_keep[0]) == 3


def test_zero_vision_rows_score_zero(device):
    vision = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    vision[[1, 4]] = 0
    got = _run([6], [2], 8, torch.float32, 1e-5, device, vision=vision)
    assert got.scores[1].item() == 0.0 and got.scores[4].item() == 0.0


tied = st.lists(st.sampled_from([-1.5, -0.25, -0.0, 0.0, 0.25, 0.5, 2.0]), min_size=0, max_size=40)


# Each interpreted launch costs ~1 s (96 radix passes in Python), so fewer, fuller examples.
@settings(max_examples=15)
@given(requests=st.lists(st.tuples(tied, st.integers(0, 3), st.integers(0, 6)), min_size=1, max_size=6))
def test_selection_is_exact_on_ties_and_signed_zeros(requests):
    """Selection alone (CPU interpreter) against the core, where ties and ±0.0 abound."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter variant of this property runs on CPU-only machines")
    scores = torch.tensor([s for values, _, _ in requests for s in values], dtype=torch.float32)
    lengths = [len(values) for values, _, _ in requests]
    rules = [RULES[r] for _, r, _ in requests]
    min_keep = [m for _, _, m in requests]
    ids, params = pack_budget_rules(rules)
    cu = _cu(lengths, "cpu")
    got = select_from_scores(scores, cu, ids, params, torch.tensor(min_keep, dtype=torch.int32),
                             out=_prefilled(len(lengths), len(scores), "cpu"))
    exact = select_vision_tokens_reference(None, None, cu, cu, rules, min_keep, scores=scores)
    _check(got, exact, exact, 0.0)


def test_budget_packing_refuses_unknown_rules():
    class Halve:
        def keep_ratio(self, gap):
            return 0.5

    with pytest.raises(TypeError, match="no kernel encoding for budget rule Halve"):
        pack_budget_rules([Halve()])


# ---- real shapes, bf16, on a GPU ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize(
    "lengths_v, lengths_t, dim",
    [
        ([2500], [40], 3072),  # Phi-3.5-V on DocVQA
        ([2500] * 64, [40] * 64, 3072),  # a packed batch of 64
        ([16384, 1, 577], [512, 1, 7], 5120),  # the extremes the issue names
        ([256, 2304, 576], [30, 60, 20], 3840),  # Gemma 3 12B, mixed
    ],
)
def test_real_shapes_on_gpu(dtype_tol, lengths_v, lengths_t, dim):
    dtype, atol = dtype_tol
    _run(lengths_v, lengths_t, dim, dtype, atol, torch.device("cuda"))
