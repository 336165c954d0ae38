"""How much pruning changes what the language model computes: the hidden-state discrepancy.

The paper trains the scorer to keep the last-layer hidden states of the text tokens close to
those of the unpruned model; the same measure, with real (hard) pruning, is the held-out
objective of training and the label-free objective of calibration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.budget import BudgetRule, UniformBudget
from ..core.rankers import VisionTokenRanker
from .pruning import PrunedPrompt, prune_prompt

__all__ = ["hidden_state_discrepancy", "last_hidden_states", "text_hidden_states", "text_state_discrepancy"]


def last_hidden_states(model, prompt: PrunedPrompt) -> Tensor:
    """Last-layer hidden states (after the final norm) of a pruned prompt: (B, T', D)."""
    return model.model(**prompt.model_inputs(), use_cache=False).last_hidden_state


def text_hidden_states(model, prompt: PrunedPrompt) -> list[Tensor]:
    """Per sample, the hidden states (L_b, D) of the prompt's non-vision tokens, in prompt order.

    Text tokens are never pruned, so the same L_b rows exist with and without pruning.
    """
    hidden = last_hidden_states(model, prompt)
    out = []
    width = hidden.shape[1]
    for b, keep in enumerate(prompt.keep_masks):
        text_in_kept = (~prompt.vision_mask(b))[keep]  # over the kept tokens, in order
        offset = width - int(keep.sum())
        rows = text_in_kept.nonzero().flatten() + offset
        out.append(hidden[b, rows])
    return out


def text_state_discrepancy(pruned: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """Per sample, the mean over text tokens and hidden dims of ``(h_pruned − h_full)²``.

    Parameters
    ----------
    pruned, reference : per sample (L_b, D), from :func:`text_hidden_states`

    Returns
    -------
    Tensor, shape (B,), float32
    """
    return torch.stack([(a.float() - b.float()).pow(2).mean() for a, b in zip(pruned, reference)])


def hidden_state_discrepancy(vlm, inputs, budget: BudgetRule | Sequence[BudgetRule],
                             ranker: VisionTokenRanker | None = None) -> Tensor:
    """:func:`text_state_discrepancy` of the pruned prompt against the unpruned one: (B,) float32.

    Parameters
    ----------
    vlm : PrunedVLM
    inputs : BatchFeature
    budget : the budget rule(s) of the pruned run
    ranker : optional, ranks the vision tokens instead of ``vlm.ranker``
    """
    ranker = ranker if ranker is not None else vlm.ranker
    with torch.inference_mode():
        features = vlm.image_features(inputs)  # once, for both prompts
        full = prune_prompt(vlm.model, vlm.adapter, inputs, ranker, UniformBudget(1.0), 1, features=features)
        pruned = prune_prompt(vlm.model, vlm.adapter, inputs, ranker, budget, vlm.vision_config.min_keep,
                              features=features)
        return text_state_discrepancy(text_hidden_states(vlm.model, pruned), text_hidden_states(vlm.model, full))
