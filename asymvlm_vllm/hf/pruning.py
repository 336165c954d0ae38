"""Pruned prompts: run the vision tower, score, decide, and physically remove vision tokens.

The result is what the language model receives: shorter ``inputs_embeds`` (left-padded
across the batch), their attention mask and positions (the convention of
:mod:`asymvlm_vllm.core.positions`), and the per-image decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.budget import BudgetRule
from ..core.errors import AsymVLMError
from ..core.positions import kept_mrope_positions, next_position, pruned_positions, text_query_mask
from ..core.rankers import VisionTokenRanker
from ..core.selection import PruningDecision, decide_vision_pruning
from .families import FamilyAdapter

__all__ = ["ImageDecision", "PrunedPrompt", "language_model_inputs", "prune_prompt"]


@dataclass(frozen=True)
class ImageDecision:
    """The decision for one image of one sample.

    Attributes
    ----------
    sample : int
        Batch row.
    positions : Tensor, shape (P,)
        Its placeholder positions in the sample's unpadded prompt.
    prunable : Tensor, shape (P,), bool
        False for structural rows, which are always kept.
    scores : Tensor, shape (N,), float32
        Scores of the N prunable rows.
    decision : PruningDecision
        Over the prunable rows (``keep_indices`` index them).
    grid_shape : tuple or None
        Patch grid of the prunable rows.
    """

    sample: int
    positions: Tensor
    prunable: Tensor
    scores: Tensor
    decision: PruningDecision
    grid_shape: tuple[int, ...] | None

    @property
    def kept_rows(self) -> Tensor:
        """(P,) bool: which placeholder rows survive."""
        keep = ~self.prunable.clone()
        prunable_idx = self.prunable.nonzero().flatten()
        keep[prunable_idx[self.decision.keep_indices.to(prunable_idx.device)]] = True
        return keep

    @property
    def kept_prunable(self) -> Tensor:
        """(N,) bool over the prunable rows, in patch order (for heatmaps)."""
        mask = torch.zeros(self.decision.num_tokens, dtype=torch.bool)
        mask[self.decision.keep_indices.cpu()] = True
        return mask


@dataclass
class PrunedPrompt:
    """What the language model receives for a batch, and how it came about.

    Attributes
    ----------
    inputs_embeds : Tensor, shape (B, T', D)
        Left-padded, vision tokens removed.
    attention_mask : Tensor, shape (B, T'), int64
    position_ids : Tensor, shape (B, T') or (3, B, T') for M-RoPE
    token_type_ids : Tensor or None, shape (B, T')
        1 at kept image tokens (Gemma 3's bidirectional image attention follows the pruned span).
    next_positions : Tensor, shape (B,)
        Position of each sample's first generated token.
    keep_masks : list of Tensor, shape (T_b,), bool
        Which tokens of each unpadded original prompt survive.
    images : list of list of ImageDecision
        Per sample, its images in prompt order.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    token_type_ids: Tensor | None
    next_positions: Tensor
    keep_masks: list[Tensor]
    images: list[list[ImageDecision]]
    input_ids: list[Tensor] = field(default_factory=list)

    @property
    def prompt_lengths(self) -> list[int]:
        """Unpruned prompt lengths."""
        return [int(m.shape[0]) for m in self.keep_masks]

    @property
    def lm_lengths(self) -> list[int]:
        """Tokens the language model receives per sample."""
        return [int(m.sum()) for m in self.keep_masks]

    @property
    def vision_tokens(self) -> list[int]:
        return [sum(int(d.positions.shape[0]) for d in imgs) for imgs in self.images]

    @property
    def vision_tokens_kept(self) -> list[int]:
        return [sum(int(d.kept_rows.sum()) for d in imgs) for imgs in self.images]

    def model_inputs(self) -> dict:
        """The keyword arguments that feed this prompt to the model (no cache options)."""
        return language_model_inputs(self.inputs_embeds, self.attention_mask, self.position_ids, self.token_type_ids)

    def vision_mask(self, sample: int) -> Tensor:
        """(T_b,) bool over sample ``sample``'s unpadded original prompt: its image rows."""
        mask = torch.zeros_like(self.keep_masks[sample])
        for image in self.images[sample]:
            mask[image.positions] = True
        return mask

    @property
    def kept_token_ids(self) -> list[Tensor]:
        """Each sample's prompt ids with the pruned placeholders removed (T'_b,)."""
        return [ids[m] for ids, m in zip(self.input_ids, self.keep_masks)]


def language_model_inputs(inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                          token_type_ids: Tensor | None) -> dict:
    """Model keyword arguments for prepared embeddings; ``token_type_ids`` only where the family
    uses them (Gemma 3's bidirectional image attention)."""
    kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return kwargs


def _rows(inputs, key: str) -> Tensor:
    value = inputs.get(key) if hasattr(inputs, "get") else None
    if value is None:
        raise AsymVLMError(f"processor output has no {key!r}")
    return value


def prune_prompt(
    model,
    adapter: FamilyAdapter,
    inputs,
    ranker: VisionTokenRanker,
    budgets: BudgetRule | Sequence[BudgetRule],
    min_keep: int = 1,
    drop: Sequence[Tensor | None] | None = None,
    features: Sequence[Tensor] | None = None,
) -> PrunedPrompt:
    """Build the pruned language-model input for a processor batch.

    Parameters
    ----------
    model : a supported ``*ForConditionalGeneration``
    adapter : FamilyAdapter
    inputs : BatchFeature
        The processor's output (``input_ids``, ``attention_mask``, pixel inputs).
    ranker : VisionTokenRanker
    budgets : BudgetRule or one per sample
    min_keep : int
    drop : optional, per sample a (T_b,) bool mask of further tokens to remove (the
        multi-turn rule's dropped answers), over the unpadded prompt.
    features : optional, the adapter's ``image_features`` of ``inputs`` when the caller already
        ran the vision tower (list of (P_i, D)).
    """
    input_ids = _rows(inputs, "input_ids")
    batch = input_ids.shape[0]
    attention = inputs.get("attention_mask")
    if attention is None:
        attention = torch.ones_like(input_ids)
    if not isinstance(budgets, Sequence):
        budgets = [budgets] * batch
    if len(budgets) != batch:
        raise ValueError(f"got {len(budgets)} budget rules for a batch of {batch}")
    image_token = adapter.image_token_id(model)
    device = input_ids.device
    embed = model.get_input_embeddings()
    structure = adapter.structure_token_ids(model)

    if features is None:
        features = adapter.image_features(model, inputs) if inputs.get("pixel_values") is not None else []
    features = list(features)
    prunable = adapter.prunable_rows(model, inputs, features) if features else []
    grids = adapter.grid_shapes(model, inputs, features) if features else []
    rope = adapter.rope_positions(model, inputs) if (adapter.uses_mrope and features) else None

    samples, keep_masks, all_images, positions, types, next_pos, ids_out = [], [], [], [], [], [], []
    image_iter = 0
    for b in range(batch):
        live = attention[b].bool()
        ids = input_ids[b][live]
        vision = ids == image_token
        emb = embed(ids.masked_fill(vision, 0)[None])[0]
        placeholder_pos = vision.nonzero().flatten()
        keep = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
        text = text_query_mask(ids, vision, structure)
        text_emb = emb[text]
        if text_emb.shape[0] == 0 and placeholder_pos.numel():
            raise AsymVLMError(f"sample {b} has no text tokens to score its images against; give a question")
        decisions, used = [], 0
        while used < placeholder_pos.shape[0]:
            if image_iter >= len(features):
                raise AsymVLMError(f"sample {b} has {placeholder_pos.shape[0]} image placeholders but the images ran out")
            rows, mask, grid = features[image_iter], prunable[image_iter], grids[image_iter]
            pos = placeholder_pos[used : used + rows.shape[0]]
            if pos.shape[0] != rows.shape[0]:
                raise AsymVLMError(f"image {image_iter} has {rows.shape[0]} features but {pos.shape[0]} placeholders")
            emb = emb.index_put((pos,), rows.to(emb.dtype))
            scores = ranker.score(rows[mask], text_emb, grid)
            decision = decide_vision_pruning(scores, budgets[b], min_keep)
            image = ImageDecision(b, pos, mask, scores, decision, grid)
            keep[pos] = image.kept_rows.to(device)
            decisions.append(image)
            used += rows.shape[0]
            image_iter += 1
        if drop is not None and drop[b] is not None:
            if drop[b].shape != keep.shape:
                raise ValueError(f"drop mask of sample {b} has shape {tuple(drop[b].shape)}, prompt has {keep.shape[0]} tokens")
            keep &= ~drop[b].to(device)
        samples.append(emb[keep])
        keep_masks.append(keep)
        all_images.append(decisions)
        ids_out.append(ids)
        if rope is not None:
            pos3 = kept_mrope_positions(rope[:, b][:, live], keep)
            positions.append(pos3)
            next_pos.append(next_position(rope[:, b][:, live]))
        else:
            positions.append(pruned_positions(int(keep.sum()), device))
            next_pos.append(int(keep.sum()))
        types.append(vision[keep].long())
    if image_iter != len(features):
        raise AsymVLMError(f"{len(features)} images were given but the prompts have placeholders for {image_iter}")

    width = max(s.shape[0] for s in samples)
    dim = samples[0].shape[-1]
    embeds = samples[0].new_zeros(batch, width, dim)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    type_ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    pos_ids = torch.ones((3, batch, width) if rope is not None else (batch, width), dtype=torch.long, device=device)
    for b, s in enumerate(samples):
        n = s.shape[0]
        embeds[b, width - n :] = s
        mask[b, width - n :] = 1
        type_ids[b, width - n :] = types[b]
        if rope is not None:
            pos_ids[:, b, width - n :] = positions[b]
        else:
            pos_ids[b, width - n :] = positions[b]
    return PrunedPrompt(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=pos_ids,
        token_type_ids=type_ids if adapter.uses_token_type_ids else None,
        next_positions=torch.tensor(next_pos, dtype=torch.long, device=device),
        keep_masks=keep_masks,
        images=all_images,
        input_ids=ids_out,
    )
