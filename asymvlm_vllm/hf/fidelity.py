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
from .pruning import PrunedPrompt, prune_prompt

__all__ = ["last_hidden_states", "text_hidden_states", "hidden_state_discrepancy"]


def last_hidden_states(model, prompt: PrunedPrompt) -> Tensor:
    """Last-layer hidden states (after the final norm) of a pruned prompt: (B, T', D)."""
    kwargs = dict(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                  position_ids=prompt.position_ids, use_cache=False)
    if prompt.token_type_ids is not None:
        kwargs["token_type_ids"] = prompt.token_type_ids
    return model.model(**kwargs).last_hidden_state


def text_hidden_states(model, prompt: PrunedPrompt) -> list[Tensor]:
    """Per sample, the hidden states (L_b, D) of the prompt's non-vision tokens, in prompt order.

    Text tokens are never pruned, so the same L_b rows exist with and without pruning.
    """
    hidden = last_hidden_states(model, prompt)
    out = []
    width = hidden.shape[1]
    for b, keep in enumerate(prompt.keep_masks):
        vision = torch.zeros_like(keep)
        for image in prompt.images[b]:
            vision[image.positions] = True
        text_in_kept = (~vision)[keep]  # over the kept tokens, in order
        offset = width - int(keep.sum())
        rows = text_in_kept.nonzero().flatten() + offset
        out.append(hidden[b, rows])
    return out


def hidden_state_discrepancy(vlm, inputs, budget: BudgetRule | Sequence[BudgetRule]) -> Tensor:
    """Mean squared difference (over text tokens and hidden dims) between the last hidden
    states of the pruned and the unpruned prompt, per sample: (B,) float32.

    Parameters
    ----------
    vlm : PrunedVLM
    inputs : BatchFeature
    budget : the budget rule(s) of the pruned run
    """
    with torch.inference_mode():
        full = prune_prompt(vlm.model, vlm.adapter, inputs, vlm.ranker, UniformBudget(1.0), 1)
        pruned = prune_prompt(vlm.model, vlm.adapter, inputs, vlm.ranker, budget, vlm.vision_config.min_keep)
        base = text_hidden_states(vlm.model, full)
        cut = text_hidden_states(vlm.model, pruned)
    return torch.stack([(a.float() - b.float()).pow(2).mean() for a, b in zip(cut, base)])
