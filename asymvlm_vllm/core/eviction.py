"""Text-eviction policies over one request's live KV entries: pure functions of tensors.

Conventions shared by every policy:

* The request's cache holds ``T`` live tokens in order; the first ``num_prompt_tokens`` are the
  prompt (text and vision), the rest were generated. Entries already evicted are gone, so
  "position" means position among the live tokens.
* ``attention`` is the importance of each live token, shape ``(T,)`` or ``(heads, T)``; with a
  heads dim it is averaged over heads first. For AsymVLM it is the current decode step's
  final-layer attention; for H2O the attention accumulated over all steps so far.
* ``evict`` returns the live positions to drop: int64, unique, ascending. Ties evict the older
  (lower) position first, so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .scoring import score_vision_tokens

__all__ = [
    "BlockEviction",
    "EvictionPolicy",
    "H2OEviction",
    "MultiTurnEviction",
    "StreamingLLMEviction",
    "ThresholdEviction",
    "accumulate_attention",
    "answer_image_similarity",
    "block_attention_mass",
    "head_mean_attention",
    "keep_mask",
]


def _nonneg_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def head_mean_attention(attention: Tensor) -> Tensor:
    """Per-token importance (T,) float32 from attention of shape (T,) or (heads, T)."""
    if not isinstance(attention, Tensor) or attention.ndim not in (1, 2):
        raise ValueError("attention must be a tensor of shape (T,) or (heads, T)")
    importance = attention.float().mean(dim=0) if attention.ndim == 2 else attention.float()
    if torch.isnan(importance).any():
        raise ValueError("attention contains NaN")
    return importance


def _lowest(importance: Tensor, candidates: Tensor, count: int) -> Tensor:
    """The ``count`` candidates with the lowest importance (older first on ties), ascending."""
    order = torch.sort(importance[candidates], stable=True).indices
    return torch.sort(candidates[order[:count]]).values


def _empty(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


def keep_mask(num_tokens: int, evicted: Tensor) -> Tensor:
    """Boolean (num_tokens,) mask of the positions that survive ``evicted``, for compacting
    per-token state (accumulated attention, positions) after an eviction."""
    mask = torch.ones(num_tokens, dtype=torch.bool, device=evicted.device)
    mask[evicted] = False
    return mask


@runtime_checkable
class EvictionPolicy(Protocol):
    def evict(self, attention: Tensor, num_prompt_tokens: int) -> Tensor:
        """Live positions (int64, ascending) to evict now; see the module docstring."""
        ...


def _check_prompt(num_prompt_tokens: int, num_tokens: int) -> None:
    _nonneg_int("num_prompt_tokens", num_prompt_tokens)
    if num_prompt_tokens > num_tokens:
        raise ValueError(f"num_prompt_tokens ({num_prompt_tokens}) exceeds the live tokens ({num_tokens})")


@dataclass(frozen=True)
class ThresholdEviction:
    """The paper's rule, token-granular.

    Nothing is evicted while the generated tokens number at most ``budget``; past it, the
    least important generated tokens are evicted to bring them back to ``budget``. Prompt and
    vision tokens and the newest ``recent`` generated tokens are never candidates.
    """

    budget: int
    recent: int = 1

    def __post_init__(self) -> None:
        _nonneg_int("budget", self.budget)
        _nonneg_int("recent", self.recent)

    def evict(self, attention: Tensor, num_prompt_tokens: int) -> Tensor:
        importance = head_mean_attention(attention)
        total = importance.shape[0]
        _check_prompt(num_prompt_tokens, total)
        excess = total - num_prompt_tokens - self.budget
        candidates = torch.arange(num_prompt_tokens, max(num_prompt_tokens, total - self.recent), device=importance.device)
        if excess <= 0 or candidates.numel() == 0:
            return _empty(importance.device)
        return _lowest(importance, candidates, min(excess, candidates.numel()))


def block_attention_mass(attention: Tensor, block_size: int) -> Tensor:
    """Attention mass per KV block: head-mean attention summed over each block's tokens.

    Parameters
    ----------
    attention : Tensor, shape (T,) or (heads, T)
    block_size : int

    Returns
    -------
    Tensor, shape (⌈T / block_size⌉,), float32; the last block may be partial.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    importance = head_mean_attention(attention)
    num_blocks = math.ceil(importance.shape[0] / block_size)
    padded = torch.zeros(num_blocks * block_size, dtype=torch.float32, device=importance.device)
    padded[: importance.shape[0]] = importance
    return padded.view(num_blocks, block_size).sum(dim=1)


@dataclass(frozen=True)
class BlockEviction:
    """The paper's rule at KV-block granularity, as a paged cache can free memory.

    Live tokens are laid out in blocks of ``block_size`` (all full but the last). Once the
    generated tokens exceed ``budget``, the fewest whole blocks that bring them back to the
    budget are evicted, lowest attention mass first. Candidates are blocks holding only
    generated tokens: never the block with the last prompt token, never the block with the
    newest token, never the ``protected_recent_blocks`` blocks before it.
    """

    budget: int
    block_size: int = 16
    protected_recent_blocks: int = 1

    def __post_init__(self) -> None:
        _nonneg_int("budget", self.budget)
        _nonneg_int("protected_recent_blocks", self.protected_recent_blocks)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")

    def _candidate_blocks(self, num_prompt_tokens: int, num_tokens: int) -> tuple[int, int]:
        """Live block indices ``[first, end)`` that may be evicted."""
        num_blocks = math.ceil(num_tokens / self.block_size)
        return math.ceil(num_prompt_tokens / self.block_size), num_blocks - 1 - self.protected_recent_blocks

    def due(self, num_prompt_tokens: int, num_tokens: int) -> bool:
        """Whether :meth:`evict_generated_blocks` evicts something for these live tokens: the
        generated ones exceed the budget and some block may be evicted. An engine scores
        blocks only for requests that are due."""
        first, end = self._candidate_blocks(num_prompt_tokens, num_tokens)
        return num_tokens - num_prompt_tokens > self.budget and end > first

    def evict_generated_blocks(self, block_importance: Tensor, num_prompt_tokens: int, num_tokens: int) -> Tensor:
        """Live block indices (int64, ascending) to evict.

        Parameters
        ----------
        block_importance : Tensor, shape (⌈num_tokens / block_size⌉,)
            Attention mass of each live block (:func:`block_attention_mass` or the kernel).
        num_prompt_tokens, num_tokens : int
            Prompt tokens and all live tokens of the request.
        """
        _nonneg_int("num_tokens", num_tokens)
        _check_prompt(num_prompt_tokens, num_tokens)
        num_blocks = math.ceil(num_tokens / self.block_size)
        if block_importance.shape != (num_blocks,):
            raise ValueError(
                f"block_importance must have shape ({num_blocks},) for {num_tokens} tokens in blocks "
                f"of {self.block_size}, got {tuple(block_importance.shape)}"
            )
        if torch.isnan(block_importance).any():
            raise ValueError("block_importance contains NaN")
        device = block_importance.device
        if not self.due(num_prompt_tokens, num_tokens):
            return _empty(device)
        excess = num_tokens - num_prompt_tokens - self.budget
        first, end = self._candidate_blocks(num_prompt_tokens, num_tokens)
        candidates = torch.arange(first, end, device=device)
        count = min(math.ceil(excess / self.block_size), candidates.numel())
        return _lowest(block_importance.float(), candidates, count)

    def evict(self, attention: Tensor, num_prompt_tokens: int) -> Tensor:
        importance = head_mean_attention(attention)
        blocks = self.evict_generated_blocks(
            block_attention_mass(importance, self.block_size), num_prompt_tokens, importance.shape[0]
        )
        offsets = torch.arange(self.block_size, device=blocks.device)
        return (blocks[:, None] * self.block_size + offsets).flatten()


def accumulate_attention(accumulated: Tensor | None, attention: Tensor) -> Tensor:
    """H2O's running score: ``accumulated`` (T_prev,) plus this step's head-mean attention (T,),
    ``T ≥ T_prev`` (new tokens start from 0). ``None`` starts a new sum."""
    step = head_mean_attention(attention)
    if accumulated is None:
        return step.clone()
    if accumulated.ndim != 1 or accumulated.shape[0] > step.shape[0]:
        raise ValueError(f"accumulated has shape {tuple(accumulated.shape)}, this step covers {step.shape[0]} tokens")
    out = step.clone()
    out[: accumulated.shape[0]] += accumulated.float()
    return out


@dataclass(frozen=True)
class H2OEviction:
    """Baseline: Heavy-Hitter Oracle (Zhang et al., 2023).

    Keeps the ``recent`` newest tokens and the ``heavy`` tokens with the largest accumulated
    attention among the rest; evicts everything else. Every token, prompt included, is a
    candidate. ``attention`` is the accumulated score (:func:`accumulate_attention`).
    """

    heavy: int
    recent: int

    def __post_init__(self) -> None:
        _nonneg_int("heavy", self.heavy)
        _nonneg_int("recent", self.recent)

    def evict(self, attention: Tensor, num_prompt_tokens: int) -> Tensor:
        importance = head_mean_attention(attention)
        total = importance.shape[0]
        _check_prompt(num_prompt_tokens, total)
        candidates = torch.arange(max(0, total - self.recent), device=importance.device)
        excess = candidates.numel() - self.heavy
        if excess <= 0:
            return _empty(importance.device)
        return _lowest(importance, candidates, excess)


@dataclass(frozen=True)
class StreamingLLMEviction:
    """Baseline: StreamingLLM (Xiao et al., 2024): keep ``sinks`` first tokens and the
    ``recent`` newest, evict the middle. Attention is not consulted."""

    sinks: int = 4
    recent: int = 1020

    def __post_init__(self) -> None:
        _nonneg_int("sinks", self.sinks)
        _nonneg_int("recent", self.recent)

    def evict(self, attention: Tensor, num_prompt_tokens: int) -> Tensor:
        total = head_mean_attention(attention).shape[0]
        _check_prompt(num_prompt_tokens, total)
        start = min(self.sinks, total)
        return torch.arange(start, max(start, total - self.recent), device=attention.device)


def answer_image_similarity(answer: Tensor, images: Tensor) -> float:
    """Cross-modal relevance of a previous answer to the current images: the mean over the
    answer's tokens (La, D) of their best cosine match among the image tokens (N, D)."""
    if answer.shape[0] == 0:
        return 0.0
    return float(score_vision_tokens(answer, images).mean())


@dataclass(frozen=True)
class MultiTurnEviction:
    """Multi-turn rule: drop whole previous answers, least relevant to the current images first.

    While the previous answers hold more than ``answer_budget`` tokens, the answer with the
    lowest :func:`answer_image_similarity` is dropped (older first on ties). The newest
    ``protected_recent_answers`` answers are kept, since a follow-up question usually refers to
    them. Questions and images are never candidates: only the given answer spans are.
    """

    answer_budget: int
    protected_recent_answers: int = 1

    def __post_init__(self) -> None:
        _nonneg_int("answer_budget", self.answer_budget)
        _nonneg_int("protected_recent_answers", self.protected_recent_answers)

    def select_answers(
        self, answer_spans: Sequence[tuple[int, int]], token_embeddings: Tensor, image_embeddings: Tensor
    ) -> list[int]:
        """Indices into ``answer_spans`` of the answers to drop, ascending.

        Parameters
        ----------
        answer_spans : sequence of (start, end)
            Half-open token ranges of the previous answers, in conversation order,
            non-overlapping, within ``token_embeddings``.
        token_embeddings : Tensor, shape (T, D)
            Input embeddings of the conversation's tokens.
        image_embeddings : Tensor, shape (N, D)
            Projector outputs of the current turn's images.
        """
        spans = [(int(a), int(b)) for a, b in answer_spans]
        for i, (a, b) in enumerate(spans):
            if not 0 <= a < b <= token_embeddings.shape[0]:
                raise ValueError(f"answer span {i} = [{a}, {b}) is empty or outside the {token_embeddings.shape[0]} tokens")
            if i and a < spans[i - 1][1]:
                raise ValueError(f"answer spans must be in order and not overlap: {spans[i - 1]} then {(a, b)}")
        total = sum(b - a for a, b in spans)
        candidates = list(range(max(0, len(spans) - self.protected_recent_answers)))
        relevance = {i: answer_image_similarity(token_embeddings[spans[i][0] : spans[i][1]], image_embeddings) for i in candidates}
        dropped: list[int] = []
        for i in sorted(candidates, key=lambda i: (relevance[i], i)):
            if total <= self.answer_budget:
                break
            dropped.append(i)
            total -= spans[i][1] - spans[i][0]
        return sorted(dropped)

    def evict_answers(
        self, answer_spans: Sequence[tuple[int, int]], token_embeddings: Tensor, image_embeddings: Tensor
    ) -> Tensor:
        """Token positions (int64, ascending) of the dropped answers."""
        chosen = self.select_answers(answer_spans, token_embeddings, image_embeddings)
        ranges = [torch.arange(*answer_spans[i], device=token_embeddings.device) for i in chosen]
        return torch.cat(ranges) if ranges else _empty(token_embeddings.device)
