"""Where the tokens of a pruned prompt sit: the one position convention of every path.

AsymVLM removes vision tokens before the language model runs, so the LM sees a shorter
sequence. Both the transformers reference path and the vLLM engine place the survivors the
same way:

* **1-D RoPE models** (Gemma 3, LLaVA-1.5, LLaVA-NeXT, Phi-3.5-Vision): the shortened
  sequence gets contiguous positions ``0 … T'−1``, exactly as if the pruned prompt had been
  submitted as is. Generated tokens continue at ``T'``, ``T'+1``, …
* **M-RoPE models** (Qwen2.5-VL): every kept token keeps the 3-D (temporal, height, width)
  position it had in the unpruned prompt, text tokens included, so the image's geometry is
  unchanged. Generated tokens continue at ``max(position) + 1`` on all three axes, as in the
  unpruned model.

Generated tokens keep advancing from there even when text eviction removes cache entries:
positions count tokens produced, not tokens cached.

The text query for scoring is the prompt's tokens that are neither vision placeholders nor
image structure tokens (begin/end-of-image markers, vision start/end).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kept_mrope_positions", "next_position", "pruned_positions", "text_query_mask"]


def pruned_positions(num_kept_tokens: int, device: torch.device | str | None = None) -> Tensor:
    """1-D positions of a pruned prompt of ``num_kept_tokens`` tokens: ``arange`` (T',) int64."""
    if num_kept_tokens < 0:
        raise ValueError(f"num_kept_tokens must be >= 0, got {num_kept_tokens}")
    return torch.arange(num_kept_tokens, dtype=torch.long, device=device)


def kept_mrope_positions(positions: Tensor, keep: Tensor) -> Tensor:
    """M-RoPE positions of the kept tokens.

    Parameters
    ----------
    positions : Tensor, shape (3, T), int64
        The unpruned prompt's (temporal, height, width) positions.
    keep : Tensor, shape (T,), bool
        Which prompt tokens survive.

    Returns
    -------
    Tensor, shape (3, T'), the kept tokens' original positions.
    """
    if positions.ndim != 2 or positions.shape[0] != 3:
        raise ValueError(f"M-RoPE positions must have shape (3, T), got {tuple(positions.shape)}")
    if keep.shape != positions.shape[1:] or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask of shape ({positions.shape[1]},), got {keep.dtype} {tuple(keep.shape)}")
    return positions[:, keep]


def next_position(positions: Tensor) -> int:
    """The position of the first generated token after a prompt with ``positions``,
    (T',) for 1-D RoPE or (3, T') for M-RoPE: one past the largest."""
    if positions.numel() == 0:
        return 0
    return int(positions.max()) + 1


def text_query_mask(input_ids: Tensor, vision_mask: Tensor, structure_token_ids: frozenset[int] | set[int]) -> Tensor:
    """Which prompt tokens form the text query ``t`` of Eq. 1.

    Parameters
    ----------
    input_ids : Tensor, shape (T,)
    vision_mask : Tensor, shape (T,), bool
        Vision placeholder positions (all of them, structural rows included).
    structure_token_ids : set of int
        Image structure token ids (begin/end-of-image, vision start/end, padding).

    Returns
    -------
    Tensor, shape (T,), bool.
    """
    if input_ids.shape != vision_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and vision_mask {tuple(vision_mask.shape)} differ in shape")
    structural = torch.zeros_like(vision_mask)
    for token_id in structure_token_ids:
        structural |= input_ids == token_id
    return ~vision_mask & ~structural
