"""From scores to a keep set: deterministic top-k, the decision record, and the training mask."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .budget import BudgetRule, num_tokens_to_keep
from .scoring import _check_scores, importance_gap

__all__ = ["PruningDecision", "decide_vision_pruning", "select_keep_indices", "soft_score_mask"]


def select_keep_indices(scores: Tensor, num_keep: int) -> Tensor:
    """Positions of the ``num_keep`` highest scores, in ascending position order.

    Ties go to the lower position, so the result is a pure function of the score values
    (every implementation must select on the same float32 scores to agree).

    Parameters
    ----------
    scores : Tensor, shape (N,)
    num_keep : int, ``0 ≤ num_keep ≤ N``

    Returns
    -------
    Tensor, shape (num_keep,), int64, strictly increasing.
    """
    _check_scores(scores)
    n = scores.shape[0]
    if isinstance(num_keep, bool) or int(num_keep) != num_keep or not 0 <= num_keep <= n:
        raise ValueError(f"num_keep must be an integer in [0, {n}], got {num_keep}")
    # A stable descending sort keeps equal scores in position order: lower positions first.
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[: int(num_keep)]).values


@dataclass(frozen=True)
class PruningDecision:
    """What was decided for one image (or one request's prunable vision tokens).

    Attributes
    ----------
    num_tokens : int
        Prunable vision tokens in.
    gap : float
        :func:`~asymvlm_vllm.core.importance_gap` of the scores.
    keep_ratio : float
        The budget rule's ratio for ``gap``.
    keep_indices : Tensor, shape (num_keep,), int64
        Kept positions in ascending order, relative to the prunable tokens.
    """

    num_tokens: int
    gap: float
    keep_ratio: float
    keep_indices: Tensor

    @property
    def num_keep(self) -> int:
        return int(self.keep_indices.shape[0])


def decide_vision_pruning(scores: Tensor, budget: BudgetRule, min_keep: int = 1) -> PruningDecision:
    """Gap → keep ratio → count → kept positions, the per-image decision of AsymVLM.

    Parameters
    ----------
    scores : Tensor, shape (N,), N ≥ 1
        Importance of each prunable vision token.
    budget : BudgetRule
        Maps the gap to a keep ratio.
    min_keep : int
        Keep at least this many tokens (all of them when ``N ≤ min_keep``).
    """
    gap = importance_gap(scores)
    ratio = budget.keep_ratio(gap)
    num_keep = num_tokens_to_keep(scores.shape[0], ratio, min_keep)
    return PruningDecision(scores.shape[0], gap, ratio, select_keep_indices(scores, num_keep))


def soft_score_mask(
    scores: Tensor, keep_ratio: float, strength: float = 5.0, temperature: float = 1.0
) -> Tensor:
    """Differentiable pruning mask for scorer training (Appendix C).

    ``m_i = −C · sigmoid((θ − s_i) / τ)`` where ``θ`` is the ``k``-th highest score,
    ``k = max(1, ⌊N · r⌋)``. ``θ`` is detached: gradients reach the scores only through
    ``s_i``. The mask is added to attention logits at vision positions, so tokens well above
    the threshold get ≈ 0 and tokens well below ≈ −C.

    Parameters
    ----------
    scores : Tensor, shape (..., N)
        Scores (a graph leading to the scorer's weight), N ≥ 1.
    keep_ratio : float in (0, 1]
    strength : float ≥ 0
        ``C``.
    temperature : float > 0
        ``τ``.

    Returns
    -------
    Tensor, shape (..., N), the scores' dtype, values in ``[−C, 0]``.
    """
    if not (math.isfinite(keep_ratio) and 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if not (math.isfinite(strength) and strength >= 0.0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have at least one element on the last dim, got {tuple(scores.shape)}")
    k = num_tokens_to_keep(scores.shape[-1], keep_ratio, min_keep=1)
    theta = torch.topk(scores.detach(), k, dim=-1).values[..., -1:]
    return -strength * torch.sigmoid((theta - scores) / temperature)
