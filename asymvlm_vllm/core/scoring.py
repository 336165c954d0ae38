"""Vision-token importance (Eq. 1 of the paper) and the inter-quartile importance gap.

All scores are computed in float32 whatever the input dtype, so that every implementation
(this reference, the Triton kernels, the HF and vLLM paths) ranks the same float32 values.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "importance_gap",
    "importance_gaps_packed",
    "score_vision_tokens",
    "score_vision_tokens_packed",
]

# Rows with a smaller norm are treated as zero vectors (score 0) rather than blown up.
_NORM_EPS = 1e-12


def _check_matrix(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, hidden), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _normalize_rows(x: Tensor) -> Tensor:
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _check_weight(weight: Tensor | None, hidden: int, device: torch.device) -> Tensor | None:
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or weight.shape != (hidden,):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape ({hidden},) to match the embeddings, got {shape}")
    return weight.to(device=device, dtype=torch.float32)


def score_vision_tokens(vision: Tensor, text: Tensor, weight: Tensor | None = None) -> Tensor:
    """Importance of each vision token for the prompt's text (Eq. 1).

    ``s_i = max_j ((v̂_i ⊙ w) · t̂_j)`` with ``v̂``, ``t̂`` the row-wise l2-normalised inputs.

    Parameters
    ----------
    vision : Tensor, shape (N, D)
        Projector outputs of one image (or several, concatenated), any float dtype.
    text : Tensor, shape (L, D)
        The prompt's text-token input embeddings, any float dtype.
    weight : Tensor, shape (D,), optional
        Learned per-dimension weight ``w``; ``None`` means all ones (cosine similarity).

    Returns
    -------
    Tensor, shape (N,), float32
        Scores. Zero rows (either side) contribute a similarity of 0, never NaN.
        With no text (L = 0) every score is 0: there is nothing to rank against.
    """
    _check_matrix("vision", vision)
    _check_matrix("text", text)
    if vision.shape[1] != text.shape[1]:
        raise ValueError(
            f"vision and text must share the hidden size, got {vision.shape[1]} and {text.shape[1]}"
        )
    w = _check_weight(weight, vision.shape[1], vision.device)
    if text.shape[0] == 0 or vision.shape[0] == 0:
        return torch.zeros(vision.shape[0], dtype=torch.float32, device=vision.device)
    v = _normalize_rows(vision)
    if w is not None:
        v = v * w
    t = _normalize_rows(text.to(vision.device))
    return (v @ t.T).amax(dim=1)


def _check_cu_seqlens(name: str, cu: Tensor, total: int, batch: int | None) -> list[int]:
    if not isinstance(cu, Tensor) or cu.ndim != 1 or cu.is_floating_point() or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D integer tensor of batch + 1 offsets")
    offsets = cu.tolist()
    if batch is not None and len(offsets) != batch + 1:
        raise ValueError(f"{name} has {len(offsets) - 1} requests, expected {batch}")
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at {total} (the packed row count), got {offsets[0]}..{offsets[-1]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    return offsets


def score_vision_tokens_packed(
    vision: Tensor,
    text: Tensor,
    cu_seqlens_vision: Tensor,
    cu_seqlens_text: Tensor,
    weight: Tensor | None = None,
) -> Tensor:
    """:func:`score_vision_tokens` for a packed batch of requests.

    Parameters
    ----------
    vision : Tensor, shape (ΣN, D)
        Vision rows of all requests, request ``b`` at ``cu_seqlens_vision[b]:cu_seqlens_vision[b+1]``.
    text : Tensor, shape (ΣL, D)
        Text rows of all requests, request ``b`` at ``cu_seqlens_text[b]:cu_seqlens_text[b+1]``.
    cu_seqlens_vision, cu_seqlens_text : Tensor, shape (B + 1,), integer
        Cumulative offsets starting at 0 (flash-attention's ``cu_seqlens`` convention).
    weight : Tensor, shape (D,), optional
        Shared learned weight; ``None`` is cosine.

    Returns
    -------
    Tensor, shape (ΣN,), float32
        Each vision row scored against its own request's text only.
    """
    _check_matrix("vision", vision)
    _check_matrix("text", text)
    vo = _check_cu_seqlens("cu_seqlens_vision", cu_seqlens_vision, vision.shape[0], None)
    to = _check_cu_seqlens("cu_seqlens_text", cu_seqlens_text, text.shape[0], len(vo) - 1)
    out = torch.empty(vision.shape[0], dtype=torch.float32, device=vision.device)
    for b in range(len(vo) - 1):
        out[vo[b] : vo[b + 1]] = score_vision_tokens(
            vision[vo[b] : vo[b + 1]], text[to[b] : to[b + 1]], weight
        )
    return out


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.ndim != 1:
        raise ValueError("scores must be a 1-D tensor")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the vision or text embeddings are not finite")


def importance_gap(scores: Tensor) -> float:
    """Inter-quartile importance gap of one image's scores.

    With ``k = max(1, ⌊N/4⌋)`` and ``s(1) ≥ … ≥ s(N)`` the sorted scores, the gap is
    ``s(k) − s(N−k+1)``, computed in the scores' dtype. A large gap means importance is
    concentrated in few tokens, so more can be pruned.

    Parameters
    ----------
    scores : Tensor, shape (N,), N ≥ 1

    Returns
    -------
    float
        ``≥ 0``; ``0.0`` for N = 1.
    """
    _check_scores(scores)
    n = scores.shape[0]
    if n == 0:
        raise ValueError("importance_gap needs at least one score")
    k = max(1, n // 4)
    ordered = torch.sort(scores, descending=True).values
    return float(ordered[k - 1] - ordered[n - k])


def importance_gaps_packed(scores: Tensor, cu_seqlens: Tensor) -> Tensor:
    """:func:`importance_gap` per request of a packed batch.

    Parameters
    ----------
    scores : Tensor, shape (ΣN,)
    cu_seqlens : Tensor, shape (B + 1,), integer; every request needs N ≥ 1.

    Returns
    -------
    Tensor, shape (B,), in the scores' dtype.
    """
    _check_scores(scores)
    offsets = _check_cu_seqlens("cu_seqlens", cu_seqlens, scores.shape[0], None)
    gaps = [importance_gap(scores[a:b]) for a, b in zip(offsets, offsets[1:])]
    return torch.tensor(gaps, dtype=scores.dtype, device=scores.device)
