import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asymvlm_vllm.core import importance_gap, importance_gaps_packed, score_vision_tokens, score_vision_tokens_packed

from .reference import cosine_max_reference, gap_reference

# Entries are 0 or at least 1e-3 in magnitude: no subnormal-norm rows whose normalisation
# would legitimately depend on the epsilon.
entry = st.one_of(st.just(0.0), st.floats(1e-3, 10.0), st.floats(-10.0, -1e-3))


@st.composite
def problems(draw, max_n=24, max_l=8, max_d=12):
    n = draw(st.integers(1, max_n))
    l = draw(st.integers(1, max_l))
    d = draw(st.integers(1, max_d))
    v = torch.tensor(draw(st.lists(entry, min_size=n * d, max_size=n * d))).view(n, d)
    t = torch.tensor(draw(st.lists(entry, min_size=l * d, max_size=l * d))).view(l, d)
    w = torch.tensor(draw(st.lists(st.floats(0.0, 3.0), min_size=d, max_size=d)))
    return v, t, w


@given(problems())
def test_unit_weight_is_cosine_max(problem):
    v, t, _ = problem
    got = score_vision_tokens(v, t)
    assert got.dtype == torch.float32 and got.shape == (v.shape[0],)
    np.testing.assert_allclose(got.numpy(), cosine_max_reference(v, t), atol=1e-5)
    assert torch.equal(got, score_vision_tokens(v, t, torch.ones(v.shape[1])))


@given(problems())
def test_weighted_scores_match_reference(problem):
    v, t, w = problem
    np.testing.assert_allclose(score_vision_tokens(v, t, w).numpy(), cosine_max_reference(v, t, w), atol=3e-5)


@given(problems(), st.randoms(use_true_random=False))
def test_equivariant_in_vision_rows_invariant_in_text_rows(problem, rnd):
    v, t, w = problem
    base = score_vision_tokens(v, t, w)
    pv = torch.tensor(rnd.sample(range(v.shape[0]), v.shape[0]))
    pt = torch.tensor(rnd.sample(range(t.shape[0]), t.shape[0]))
    torch.testing.assert_close(score_vision_tokens(v[pv], t, w), base[pv], atol=1e-6, rtol=0)
    torch.testing.assert_close(score_vision_tokens(v, t[pt], w), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "dtype, atol",
    [(torch.float64, 1e-6), (torch.float32, 1e-6), (torch.float16, 1e-6), (torch.bfloat16, 1e-6)],
)
def test_any_float_dtype_in_float32_out(dtype, atol):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(37, 24, generator=g).to(dtype)
    t = torch.randn(5, 24, generator=g).to(dtype)
    w = torch.rand(24, generator=g) * 3
    got = score_vision_tokens(v, t, w)
    assert got.dtype == torch.float32
    # Against the exact scores of the inputs as they are (already rounded to `dtype`).
    np.testing.assert_allclose(got.numpy(), cosine_max_reference(v.double(), t.double(), w), atol=atol)


def test_zero_rows_score_zero_not_nan():
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -2.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    got = score_vision_tokens(v, t)
    assert torch.isfinite(got).all()
    assert got.tolist() == [0.0, 1.0, 0.0]  # row 2 is orthogonal to the only non-zero text row
    assert score_vision_tokens(v, torch.zeros(2, 2)).tolist() == [0.0, 0.0, 0.0]


def test_empty_text_or_vision():
    assert score_vision_tokens(torch.randn(4, 3), torch.empty(0, 3)).tolist() == [0.0] * 4
    assert score_vision_tokens(torch.empty(0, 3), torch.randn(2, 3)).shape == (0,)


@pytest.mark.parametrize(
    "v, t, w, err, match",
    [
        (torch.randn(3), torch.randn(2, 3), None, ValueError, "vision must be 2-D"),
        (torch.randn(3, 4), torch.randn(2, 3), None, ValueError, "share the hidden size"),
        (torch.randn(3, 4), torch.randn(2, 4), torch.ones(3), ValueError, r"weight must have shape \(4,\)"),
        (torch.ones(3, 4, dtype=torch.long), torch.randn(2, 4), None, TypeError, "floating-point"),
        ([[1.0]], torch.randn(2, 1), None, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_are_refused(v, t, w, err, match):
    with pytest.raises(err, match=match):
        score_vision_tokens(v, t, w)


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 5)), min_size=1, max_size=6), st.integers(0, 2**16))
def test_packed_scores_each_request_against_its_own_text(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    d = 6
    vs = [torch.randn(n, d, generator=g) for n, _ in lengths]
    ts = [torch.randn(l, d, generator=g) for _, l in lengths]
    w = torch.rand(d, generator=g) * 3
    cu_v = torch.tensor([0] + np.cumsum([n for n, _ in lengths]).tolist())
    cu_t = torch.tensor([0] + np.cumsum([l for _, l in lengths]).tolist())
    got = score_vision_tokens_packed(torch.cat(vs), torch.cat(ts), cu_v, cu_t, w)
    want = np.concatenate([cosine_max_reference(v, t, w) for v, t in zip(vs, ts)])
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)


@pytest.mark.parametrize(
    "cu_v, cu_t, match",
    [
        ([0, 2, 5], [0, 1], "cu_seqlens_text has 1 requests, expected 2"),
        ([1, 5], [0, 3], "must start at 0 and end at 5"),
        ([0, 4], [0, 3], "must start at 0 and end at 5"),
        ([0, 3, 2, 5], [0, 1, 2, 3], "non-decreasing"),
        ([0.0, 5.0], [0, 3], "integer tensor"),
    ],
)
def test_packed_offsets_are_checked(cu_v, cu_t, match):
    with pytest.raises(ValueError, match=match):
        score_vision_tokens_packed(torch.randn(5, 2), torch.randn(3, 2), torch.tensor(cu_v), torch.tensor(cu_t))


@pytest.mark.parametrize(
    "scores, gap",
    [
        ([0.7], 0.0),  # N = 1
        ([0.2, 0.9], 0.7),  # N = 2..7: k = 1, max - min
        ([0.5, 0.1, 0.3], 0.4),
        ([0.4, 0.4, 0.4, 0.4], 0.0),
        ([0.9, 0.1, 0.5, 0.3, 0.7], 0.8),
        ([8, 7, 6, 5, 4, 3, 2, 1], 7 - 2),  # N = 8: k = 2, 2nd largest - 2nd smallest
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], 8 - 2),  # N = 9: k = 2
    ],
)
def test_gap_small_n(scores, gap):
    assert importance_gap(torch.tensor(scores, dtype=torch.float64)) == pytest.approx(gap, abs=1e-12)


@given(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=80), st.floats(-2, 2, width=32))
def test_gap_is_nonnegative_and_shift_invariant(values, shift):
    s = torch.tensor(values, dtype=torch.float32)
    gap = importance_gap(s)
    assert gap >= 0.0
    assert gap == pytest.approx(gap_reference(values), abs=1e-6)
    assert importance_gap(s + shift) == pytest.approx(gap, abs=1e-5)


def test_gap_refuses_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        importance_gap(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="at least one"):
        importance_gap(torch.empty(0))


def test_packed_gaps_match_per_request():
    s = torch.rand(30, generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 1, 9, 30])
    got = importance_gaps_packed(s, cu)
    assert got.dtype == torch.float32
    assert got.tolist() == [importance_gap(s[0:1]), importance_gap(s[1:9]), importance_gap(s[9:30])]
