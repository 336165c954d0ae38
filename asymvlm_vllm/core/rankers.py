"""Vision-token rankers: the learned scorer and the baselines, behind one ``score`` method.

Each ranker maps one request's vision tokens (and its prompt text) to per-token scores;
higher means keep. The budget and selection code never knows which ranker it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .scoring import score_vision_tokens

__all__ = [
    "CosineRanker",
    "LearnedRanker",
    "RandomRanker",
    "SpiralRanker",
    "VisionTokenRanker",
    "spiral_order",
]


@runtime_checkable
class VisionTokenRanker(Protocol):
    def score(self, vision: Tensor, text: Tensor, grid_shape: tuple[int, ...] | None = None) -> Tensor:
        """Scores (N,) float32 for ``vision`` (N, D) given ``text`` (L, D).

        ``grid_shape`` is the patch grid of the image tokens, ``(h, w)`` or ``(t, h, w)`` with
        ``t · h · w = N``; only position-based rankers need it.
        """
        ...


@dataclass(frozen=True)
class LearnedRanker:
    """The paper's scorer: weighted cosine with a trained per-dimension ``weight`` (D,)."""

    weight: Tensor

    def score(self, vision: Tensor, text: Tensor, grid_shape: tuple[int, ...] | None = None) -> Tensor:
        return score_vision_tokens(vision, text, self.weight)


@dataclass(frozen=True)
class CosineRanker:
    """Untrained baseline: plain cosine similarity (``w = 1``)."""

    def score(self, vision: Tensor, text: Tensor, grid_shape: tuple[int, ...] | None = None) -> Tensor:
        return score_vision_tokens(vision, text)


def spiral_order(height: int, width: int) -> Tensor:
    """Row-major patch indices of an ``height × width`` grid in clockwise spiral order,
    starting at the top-left corner and ending at the centre. Shape (height · width,), int64."""
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
    grid = torch.arange(height * width).view(height, width)
    order: list[Tensor] = []
    while grid.numel():
        order.append(grid[0])  # top row, left to right
        grid = grid[1:].T.flip(0)  # rotate the rest counter-clockwise: the right column becomes the top row
    return torch.cat(order)


@dataclass(frozen=True)
class SpiralRanker:
    """Position-only baseline: drops tokens from the image border inwards.

    Scores follow the clockwise spiral from the top-left corner to the centre, so the centre
    scores highest and the first border patches lowest. Frames of a ``(t, h, w)`` grid get the
    same spatial scores.
    """

    def score(self, vision: Tensor, text: Tensor, grid_shape: tuple[int, ...] | None = None) -> Tensor:
        if grid_shape is None or len(grid_shape) not in (2, 3):
            raise ValueError("SpiralRanker needs grid_shape=(h, w) or (t, h, w)")
        t, h, w = (1, *grid_shape) if len(grid_shape) == 2 else grid_shape
        if t * h * w != vision.shape[0]:
            raise ValueError(f"grid_shape {tuple(grid_shape)} has {t * h * w} patches, vision has {vision.shape[0]} rows")
        rank = torch.empty(h * w, dtype=torch.float32)
        rank[spiral_order(h, w)] = torch.arange(1, h * w + 1, dtype=torch.float32) / (h * w)
        return rank.repeat(t).to(vision.device)


@dataclass(frozen=True)
class RandomRanker:
    """Content-free baseline: uniform random scores, the same for the same ``seed`` and N."""

    seed: int = 0

    def score(self, vision: Tensor, text: Tensor, grid_shape: tuple[int, ...] | None = None) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(vision.shape[0], generator=generator).to(vision.device)
