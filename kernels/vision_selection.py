"""Fused vision-token scoring and adaptive top-k selection for a packed batch of requests.

Formula (AsymVLM, Eq. 1 and Eq. 3 / Method B), per request b with vision rows v (N_b, D) and
text rows t (L_b, D):

    s_i    = max_j ((v_i / |v_i|) ⊙ w) · (t_j / |t_j|)                   scores, float32
    gap    = s(k) − s(N−k+1),  k = max(1, ⌊N/4⌋), s sorted descending    float32
    ratio  = budget_b(gap)                                               float64
    keep   = min(N, max(min_keep_b, ⌊N · ratio + 1e-9⌋))
    kept   = the `keep` highest scores, ties to the lower position, in position order

References: ``asymvlm_vllm.core`` (``score_vision_tokens``, ``decide_vision_pruning``); used by
the transformers and vLLM paths to decide which vision tokens to keep before prefill.

Three launches and no host synchronisation: text rows are normalised and weighted once, a tiled
kernel computes the scores, and one program per request selects. Selection runs on the scores
this kernel computed, with the reference's exact rules (the quartiles and the k-th score are
found by a 32-bit radix select over order-preserving integer keys, so there is no
floating-point ambiguity, and ``-0.0`` counts as ``0.0`` as in torch's sort). The gap and the
budget are computed with the same IEEE operations as the Python reference (float32 gap,
float64 budget). Hence the keep set equals ``decide_vision_pruning`` applied to these scores;
the scores themselves differ from ``score_vision_tokens`` by the rounding of a tiled,
possibly half-precision dot product. The one theoretical mismatch is the compiler fusing
``target + slope · x`` into an FMA, which could move ``N · ratio`` across an integer by one
float64 ulp; the 1e-9 slack makes that unreachable unless N · ratio is within 1e-12 of
``integer − 1e-9``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from asymvlm_vllm.core import (
    BudgetRule,
    LinearBudget,
    ThresholdBudget,
    UniformBudget,
    decide_vision_pruning,
    score_vision_tokens_packed,
)
from asymvlm_vllm.envs import triton_interpreted

__all__ = [
    "VisionSelection",
    "empty_selection",
    "pack_budget_rules",
    "select_from_scores",
    "select_vision_tokens",
    "select_vision_tokens_reference",
]

RULE_UNIFORM, RULE_THRESHOLD, RULE_LINEAR = 0, 1, 2
_NORM_EPS = tl.constexpr(1e-12)  # as asymvlm_vllm.core.scoring: rows with a smaller norm score 0
_FLOOR_SLACK = tl.constexpr(1e-9)  # as asymvlm_vllm.core.budget.num_tokens_to_keep


def _interpreting() -> bool:
    return triton_interpreted()


@triton.jit
def _normalize_text_kernel(text_ptr, weight_ptr, out_ptr, D, HAS_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[j] = w ⊙ t_j / max(|t_j|, eps), float32; one program per text row."""
    row = tl.program_id(0).to(tl.int64)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(text_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32)
        sq += x * x
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), _NORM_EPS)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(text_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32) * inv
        if HAS_WEIGHT:
            x = x * tl.load(weight_ptr + d, mask=d < D, other=0.0)
        tl.store(out_ptr + row * D + d, x, mask=d < D)


@triton.jit
def _score_kernel(
    vision_ptr, text_ptr, cu_v_ptr, cu_t_ptr, scores_ptr, D,
    DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """scores[i] = max_j v_i · t'_j / max(|v_i|, eps) over the request's normalised text t'."""
    b = tl.program_id(0)
    v0 = tl.load(cu_v_ptr + b)
    n = tl.load(cu_v_ptr + b + 1) - v0
    t0 = tl.load(cu_t_ptr + b)
    num_text = tl.load(cu_t_ptr + b + 1) - t0
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(1) * BLOCK_N < n:
        row_ok = rows < n
        best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        v_rows = (v0 + rows).to(tl.int64)
        for l0 in range(0, num_text, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            col_ok = cols < num_text
            t_rows = (t0 + cols).to(tl.int64)
            acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                v = tl.load(vision_ptr + v_rows[:, None] * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
                t = tl.load(text_ptr + t_rows[:, None] * D + d[None, :], mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
                if l0 == 0:
                    vf = v.to(tl.float32)
                    sq += tl.sum(vf * vf, axis=1)
                if DOT_FP32:
                    acc += tl.dot(v.to(tl.float32), tl.trans(t), input_precision="ieee")
                else:
                    acc += tl.dot(v, tl.trans(t.to(v.dtype)))
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            best = tl.maximum(best, tl.max(acc, axis=1))
        if num_text == 0:
            score = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            score = best / tl.maximum(tl.sqrt(sq), _NORM_EPS)
        tl.store(scores_ptr + v0 + rows, score, mask=row_ok)


@triton.jit
def _order_key(s):
    """Order-preserving map float32 → [0, 2^32) in int64; -0.0 is first made +0.0."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + 2147483648, -1 - bits)


@triton.jit
def _key_to_float(key):
    bits = tl.where(key >= 2147483648, key - 2147483648, -1 - key)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_key(scores_ptr, start, n, k, BLOCK_S: tl.constexpr):
    """Key of the k-th largest score (1 ≤ k ≤ n): radix select, most significant bit first."""
    prefix = tl.zeros([], dtype=tl.int64)
    for i in range(32):
        candidate = prefix + (tl.full([], 1, tl.int64) << (31 - i))
        count = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, n, BLOCK_S):
            idx = c0 + tl.arange(0, BLOCK_S)
            key = _order_key(tl.load(scores_ptr + start + idx, mask=idx < n, other=0.0))
            count += tl.sum(((key >= candidate) & (idx < n)).to(tl.int32), axis=0)
        prefix = tl.where(count >= k, candidate, prefix)
    return prefix


@triton.jit
def _select_kernel(
    scores_ptr, cu_v_ptr, rule_ptr, params_ptr, min_keep_ptr,
    gap_ptr, ratio_ptr, num_keep_ptr, mask_ptr, index_ptr, BLOCK_S: tl.constexpr,
):
    """Per request: gap → budget → count → keep mask and kept positions (ascending)."""
    b = tl.program_id(0)
    start = tl.load(cu_v_ptr + b)
    n = tl.load(cu_v_ptr + b + 1) - start
    gap = tl.zeros([], dtype=tl.float32)
    if n > 0:
        q = tl.maximum(n // 4, 1)
        high = _key_to_float(_kth_largest_key(scores_ptr, start, n, q, BLOCK_S))
        low = _key_to_float(_kth_largest_key(scores_ptr, start, n, n - q + 1, BLOCK_S))
        gap = high - low
    # Budget rule in float64, the same operations in the same order as core/budget.py.
    rule = tl.load(rule_ptr + b)
    p0 = tl.load(params_ptr + b * 5 + 0)
    p1 = tl.load(params_ptr + b * 5 + 1)
    p2 = tl.load(params_ptr + b * 5 + 2)
    p3 = tl.load(params_ptr + b * 5 + 3)
    p4 = tl.load(params_ptr + b * 5 + 4)
    g = gap.to(tl.float64)
    threshold_ratio = tl.where(g < p0, p2, tl.where(g < p1, p3, p4))
    linear_ratio = tl.minimum(p4, tl.maximum(p3, p0 + p1 * (g - p2)))
    ratio = tl.where(rule == 0, p0, tl.where(rule == 1, threshold_ratio, linear_ratio))
    kept = tl.floor(n.to(tl.float64) * ratio + _FLOOR_SLACK).to(tl.int32)
    kept = tl.minimum(n, tl.maximum(tl.load(min_keep_ptr + b), kept))
    tl.store(gap_ptr + b, gap)
    tl.store(ratio_ptr + b, ratio)
    tl.store(num_keep_ptr + b, kept)
    # Keep every key above the k-th largest, then the first (kept − above) keys equal to it.
    threshold = tl.full([], 4294967296, tl.int64)  # above every key: keeps nothing when kept == 0
    if kept > 0:
        threshold = _kth_largest_key(scores_ptr, start, n, kept, BLOCK_S)
    above = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n, BLOCK_S):
        idx = c0 + tl.arange(0, BLOCK_S)
        key = _order_key(tl.load(scores_ptr + start + idx, mask=idx < n, other=0.0))
        above += tl.sum(((key > threshold) & (idx < n)).to(tl.int32), axis=0)
    ties_left = kept - above
    written = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n, BLOCK_S):
        idx = c0 + tl.arange(0, BLOCK_S)
        valid = idx < n
        key = _order_key(tl.load(scores_ptr + start + idx, mask=valid, other=0.0))
        tie = ((key == threshold) & valid).to(tl.int32)
        tie_rank = tl.cumsum(tie, axis=0) - tie  # ties before this one in the chunk
        keep = valid & ((key > threshold) | ((tie == 1) & (tie_rank < ties_left)))
        ties_left -= tl.sum(tie * keep.to(tl.int32), axis=0)
        keep_i = keep.to(tl.int32)
        slot = written + tl.cumsum(keep_i, axis=0) - 1
        tl.store(mask_ptr + start + idx, keep_i.to(tl.int8), mask=valid)
        tl.store(index_ptr + start + slot, idx, mask=keep)
        written += tl.sum(keep_i, axis=0)
    for c0 in range(0, n, BLOCK_S):  # unused index slots of this request: -1
        idx = c0 + tl.arange(0, BLOCK_S)
        tl.store(index_ptr + start + idx, tl.full([BLOCK_S], -1, tl.int32), mask=(idx >= kept) & (idx < n))


@dataclass(frozen=True)
class VisionSelection:
    """Outputs of :func:`select_vision_tokens` for B requests with ΣN vision rows.

    Attributes
    ----------
    scores : Tensor, (ΣN,) float32
    gaps : Tensor, (B,) float32
    keep_ratios : Tensor, (B,) float64
    num_keep : Tensor, (B,) int32
    keep_mask : Tensor, (ΣN,) bool — True where the row is kept
    keep_indices : Tensor, (ΣN,) int32 — for request b, positions (relative to its first row)
        of its kept rows in ascending order at ``[cu[b], cu[b] + num_keep[b])``, then -1
    """

    scores: Tensor
    gaps: Tensor
    keep_ratios: Tensor
    num_keep: Tensor
    keep_mask: Tensor
    keep_indices: Tensor


def pack_budget_rules(rules: Sequence[BudgetRule], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Budget rules as kernel inputs: rule ids (B,) int32 and parameters (B, 5) float64.

    Layouts: uniform ``[ratio, 0, 0, 0, 0]``; threshold ``[gap_low, gap_high, conservative,
    moderate, aggressive]``; linear ``[target, slope, gap_mean, min_ratio, max_ratio]``.
    """
    ids, params = [], []
    for rule in rules:
        if isinstance(rule, UniformBudget):
            ids.append(RULE_UNIFORM)
            params.append([rule.ratio, 0.0, 0.0, 0.0, 0.0])
        elif isinstance(rule, ThresholdBudget):
            ids.append(RULE_THRESHOLD)
            params.append([rule.gap_low, rule.gap_high, rule.ratio_conservative, rule.ratio_moderate, rule.ratio_aggressive])
        elif isinstance(rule, LinearBudget):
            ids.append(RULE_LINEAR)
            params.append([rule.target_ratio, rule.slope, rule.gap_mean, rule.min_ratio, rule.max_ratio])
        else:
            raise TypeError(f"no kernel encoding for budget rule {type(rule).__name__}")
    return (
        torch.tensor(ids, dtype=torch.int32, device=device),
        torch.tensor(params, dtype=torch.float64, device=device).view(len(ids), 5),
    )


def _check_packed(vision: Tensor, text: Tensor, cu_v: Tensor, cu_t: Tensor, weight: Tensor | None) -> None:
    if vision.ndim != 2 or text.ndim != 2 or vision.shape[1] != text.shape[1]:
        raise ValueError(f"vision (ΣN, D) and text (ΣL, D) must share D, got {tuple(vision.shape)} and {tuple(text.shape)}")
    if not (vision.is_floating_point() and text.is_floating_point()):
        raise TypeError("vision and text must be floating-point")
    if cu_v.shape != cu_t.shape or cu_v.ndim != 1:
        raise ValueError("cu_seqlens_vision and cu_seqlens_text must both have shape (B + 1,)")
    if weight is not None and weight.shape != (vision.shape[1],):
        raise ValueError(f"weight must have shape ({vision.shape[1]},), got {tuple(weight.shape)}")


def select_vision_tokens(
    vision: Tensor,
    text: Tensor,
    cu_seqlens_vision: Tensor,
    cu_seqlens_text: Tensor,
    max_seqlen_vision: int,
    rule_ids: Tensor,
    rule_params: Tensor,
    min_keep: Tensor | int = 1,
    weight: Tensor | None = None,
    out: VisionSelection | None = None,
) -> VisionSelection:
    """Score and select the vision tokens of a packed batch on the device, no host round-trip.

    Parameters
    ----------
    vision : Tensor, (ΣN, D), fp16/bf16/fp32, contiguous
        Projector outputs of all requests, packed.
    text : Tensor, (ΣL, D), same dtype family
        Prompt text embeddings of all requests, packed.
    cu_seqlens_vision, cu_seqlens_text : Tensor, (B + 1,) int32
        Offsets of each request's rows (flash-attention convention).
    max_seqlen_vision : int
        ``max_b N_b`` (the caller knows it; computing it here would synchronise).
    rule_ids, rule_params : Tensor, (B,) int32 and (B, 5) float64
        Each request's budget rule, from :func:`pack_budget_rules`.
    min_keep : Tensor (B,) int32 or int
    weight : Tensor, (D,), optional
        Learned scorer weight; ``None`` is cosine.
    out : VisionSelection, optional
        Preallocated outputs (see :func:`empty_selection`), written in full; the text scratch
        buffer is still allocated.

    Returns
    -------
    VisionSelection
    """
    _check_packed(vision, text, cu_seqlens_vision, cu_seqlens_text, weight)
    device = vision.device
    batch = cu_seqlens_vision.shape[0] - 1
    total, dim = vision.shape
    vision = vision.contiguous()
    cu_v = cu_seqlens_vision.to(device=device, dtype=torch.int32)
    cu_t = cu_seqlens_text.to(device=device, dtype=torch.int32)
    text_normalized = torch.empty(text.shape, dtype=torch.float32, device=device)
    if text.shape[0]:
        w = weight.to(device=device, dtype=torch.float32).contiguous() if weight is not None else text_normalized
        _normalize_text_kernel[(text.shape[0],)](
            text.contiguous(), w, text_normalized, dim, HAS_WEIGHT=weight is not None, BLOCK_D=128
        )
    out = out if out is not None else empty_selection(batch, total, device)
    scores = out.scores
    dot_fp32 = vision.dtype == torch.float32 or _interpreting()  # bf16 tl.dot is wrong in the interpreter
    if batch and max_seqlen_vision:
        grid = (batch, triton.cdiv(max_seqlen_vision, 64))
        _score_kernel[grid](vision, text_normalized, cu_v, cu_t, scores, dim, DOT_FP32=dot_fp32, BLOCK_N=64, BLOCK_L=32, BLOCK_D=64)
    return _select(out, cu_v, rule_ids, rule_params, min_keep)


def empty_selection(batch: int, total: int, device: torch.device | str) -> VisionSelection:
    """Uninitialised output buffers for ``batch`` requests with ``total`` vision rows."""
    return VisionSelection(
        torch.empty(total, dtype=torch.float32, device=device),
        torch.empty(batch, dtype=torch.float32, device=device),
        torch.empty(batch, dtype=torch.float64, device=device),
        torch.empty(batch, dtype=torch.int32, device=device),
        torch.empty(total, dtype=torch.bool, device=device),
        torch.empty(total, dtype=torch.int32, device=device),
    )


def _select(
    out: VisionSelection, cu_v: Tensor, rule_ids: Tensor, rule_params: Tensor, min_keep: Tensor | int
) -> VisionSelection:
    device = out.scores.device
    batch = cu_v.shape[0] - 1
    if isinstance(min_keep, int):
        min_keep = torch.full((batch,), min_keep, dtype=torch.int32, device=device)
    if batch:
        _select_kernel[(batch,)](
            out.scores, cu_v, rule_ids.to(device=device, dtype=torch.int32).contiguous(),
            rule_params.to(device=device, dtype=torch.float64).contiguous(), min_keep.to(device=device, dtype=torch.int32),
            out.gaps, out.keep_ratios, out.num_keep, out.keep_mask.view(torch.int8), out.keep_indices, BLOCK_S=1024,
        )
    return out


def select_from_scores(
    scores: Tensor,
    cu_seqlens: Tensor,
    rule_ids: Tensor,
    rule_params: Tensor,
    min_keep: Tensor | int = 1,
    out: VisionSelection | None = None,
) -> VisionSelection:
    """The selection half of :func:`select_vision_tokens`, on given scores (ΣN,) (cast to float32)."""
    batch = cu_seqlens.shape[0] - 1
    out = out if out is not None else empty_selection(batch, scores.shape[0], scores.device)
    out.scores.copy_(scores)
    cu = cu_seqlens.to(device=scores.device, dtype=torch.int32)
    return _select(out, cu, rule_ids, rule_params, min_keep)


def select_vision_tokens_reference(
    vision: Tensor,
    text: Tensor,
    cu_seqlens_vision: Tensor,
    cu_seqlens_text: Tensor,
    rules: Sequence[BudgetRule],
    min_keep: Sequence[int] | int = 1,
    weight: Tensor | None = None,
    scores: Tensor | None = None,
) -> VisionSelection:
    """The same outputs from the core's torch functions, one request at a time.

    With ``scores`` given, selection runs on them instead of recomputing them (this is how the
    kernel is checked for an exact keep set: both select on the kernel's float32 scores).
    """
    if scores is None:
        scores = score_vision_tokens_packed(vision, text, cu_seqlens_vision, cu_seqlens_text, weight)
    offsets = cu_seqlens_vision.tolist()
    batch = len(offsets) - 1
    mins = [min_keep] * batch if isinstance(min_keep, int) else list(min_keep)
    gaps, ratios, counts = [], [], []
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    indices = torch.full((scores.shape[0],), -1, dtype=torch.int32)
    for b, (a, e) in enumerate(zip(offsets, offsets[1:])):
        if e == a:
            gaps.append(0.0)
            ratios.append(rules[b].keep_ratio(0.0))
            counts.append(0)
            continue
        d = decide_vision_pruning(scores[a:e].cpu(), rules[b], mins[b])
        gaps.append(d.gap)
        ratios.append(d.keep_ratio)
        counts.append(d.num_keep)
        mask[a + d.keep_indices] = True
        indices[a : a + d.num_keep] = d.keep_indices.to(torch.int32)
    return VisionSelection(
        scores.float().cpu(),
        torch.tensor(gaps, dtype=torch.float32),
        torch.tensor(ratios, dtype=torch.float64),
        torch.tensor(counts, dtype=torch.int32),
        mask,
        indices,
    )
