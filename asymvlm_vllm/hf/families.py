"""What differs between VLM families: where image features come from, which of their rows
are structure, and how positions work. Everything else is shared (:mod:`.pruning`).

One small adapter per family; :func:`adapter_for` picks it by the model's class name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FamilyAdapter", "SUPPORTED_ARCHITECTURES", "adapter_for"]


def _features_per_image(features) -> list[Tensor]:
    if isinstance(features, Tensor):
        features = features.reshape(-1, *features.shape[-2:]) if features.ndim == 3 else [features]
    return [f.reshape(-1, f.shape[-1]) for f in features]


@dataclass(frozen=True)
class FamilyAdapter:
    """Base adapter: one placeholder token per feature row, every row prunable, 1-D RoPE."""

    architecture: str = ""
    uses_mrope: bool = False
    uses_token_type_ids: bool = False

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def structure_token_ids(self, model) -> frozenset[int]:
        """Image structure tokens (never scored as text, never pruned)."""
        return frozenset()

    def image_features(self, model, inputs) -> list[Tensor]:
        """Projector outputs per image, in prompt order across the batch: list of (P_i, D)."""
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype), return_dict=True)
        return _features_per_image(out.pooler_output)

    def prunable_rows(self, model, inputs, features: list[Tensor]) -> list[Tensor]:
        """Per image a (P_i,) bool mask: False for structural rows (e.g. LLaVA-NeXT newlines)."""
        return [torch.ones(f.shape[0], dtype=torch.bool, device=f.device) for f in features]

    def grid_shapes(self, model, inputs, features: list[Tensor]) -> list[tuple[int, ...] | None]:
        """Patch grid of each image's prunable rows, for position-based rankers and heatmaps."""
        shapes = []
        for f in features:
            side = math.isqrt(f.shape[0])
            shapes.append((side, side) if side * side == f.shape[0] else None)
        return shapes

    def rope_positions(self, model, inputs) -> Tensor | None:
        """(3, B, T) M-RoPE positions of the unpruned batch, or None for 1-D RoPE."""
        return None

    def forward_kwargs(self, model, inputs) -> dict:
        return {}


@dataclass(frozen=True)
class Gemma3Adapter(FamilyAdapter):
    architecture: str = "Gemma3ForConditionalGeneration"
    uses_token_type_ids: bool = True

    def structure_token_ids(self, model) -> frozenset[int]:
        return frozenset({int(model.config.boi_token_index), int(model.config.eoi_token_index)})


@dataclass(frozen=True)
class LlavaAdapter(FamilyAdapter):
    architecture: str = "LlavaForConditionalGeneration"

    def image_features(self, model, inputs) -> list[Tensor]:
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(model.dtype), image_sizes=inputs.get("image_sizes"), return_dict=True
        )
        return _features_per_image(out.pooler_output)


@dataclass(frozen=True)
class LlavaNextAdapter(FamilyAdapter):
    architecture: str = "LlavaNextForConditionalGeneration"

    def image_features(self, model, inputs) -> list[Tensor]:
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(model.dtype), image_sizes=inputs["image_sizes"], return_dict=True
        )
        return _features_per_image(out.pooler_output)

    def prunable_rows(self, model, inputs, features: list[Tensor]) -> list[Tensor]:
        # Re-run the model's own packing on a one-channel marker (0 = patch, 1 = newline): the
        # newline rows land exactly where the real packing put image_newline.
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        tile = cfg.vision_config.image_size // cfg.vision_config.patch_size
        markers = []
        for size in inputs["image_sizes"]:
            tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            markers.append(torch.zeros(tiles, tile * tile, 1))
        packed, _ = model.model.pack_image_features(
            markers, inputs["image_sizes"], cfg.vision_feature_select_strategy, image_newline=torch.ones(1)
        )
        masks = [(p[:, 0] == 0).to(f.device) for p, f in zip(packed, features)]
        for m, f in zip(masks, features):
            if m.shape[0] != f.shape[0]:
                raise RuntimeError(f"LLaVA-NeXT packing gave {m.shape[0]} rows for an image of {f.shape[0]} features")
        return masks

    def grid_shapes(self, model, inputs, features: list[Tensor]) -> list[tuple[int, ...] | None]:
        return [None for _ in features]  # base tile + unpadded high-res grid: no single grid


@dataclass(frozen=True)
class Qwen2_5_VLAdapter(FamilyAdapter):
    architecture: str = "Qwen2_5_VLForConditionalGeneration"
    uses_mrope: bool = True

    def structure_token_ids(self, model) -> frozenset[int]:
        return frozenset({int(model.config.vision_start_token_id), int(model.config.vision_end_token_id)})

    def image_features(self, model, inputs) -> list[Tensor]:
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
        )
        return _features_per_image(out.pooler_output)

    def grid_shapes(self, model, inputs, features: list[Tensor]) -> list[tuple[int, ...] | None]:
        merge = model.config.vision_config.spatial_merge_size
        return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in inputs["image_grid_thw"].tolist()]

    def rope_positions(self, model, inputs) -> Tensor:
        ids = inputs["input_ids"]
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id(model)).int()
        positions, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs.get("attention_mask")
        )
        return positions


@dataclass(frozen=True)
class Phi3VAdapter(FamilyAdapter):
    """Phi-3.5-Vision (``Phi3VForCausalLM``), which transformers can only load as remote code.

    Image placeholders are negative ids; ``vision_embed_tokens`` merges the features, whose
    sub-image newline (``sub_GN``) and global separator (``glb_GN``) rows are structure.
    Untested here: no offline checkpoint of this architecture can be built without its code.
    """

    architecture: str = "Phi3VForCausalLM"

    def image_token_id(self, model) -> int:
        return -1

    def image_features(self, model, inputs) -> list[Tensor]:
        ids = inputs["input_ids"]
        embed = model.model.vision_embed_tokens(ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        rows = embed[ids < 0]
        counts = []
        for sample in ids:
            run = (sample < 0).int()
            starts = ((run[1:] == 1) & (run[:-1] == 0)).nonzero().flatten().tolist()
            bounds = ([0] if run[0] else []) + [s + 1 for s in starts]
            ends = [int(e) + 1 for e in ((run[:-1] == 1) & (run[1:] == 0)).nonzero().flatten().tolist()]
            if run[-1]:
                ends.append(len(run))
            counts += [e - s for s, e in zip(bounds, ends)]
        return list(torch.split(rows, counts))

    def prunable_rows(self, model, inputs, features: list[Tensor]) -> list[Tensor]:
        emb = model.model.vision_embed_tokens
        separators = torch.stack([emb.img_projection(emb.sub_GN.reshape(1, -1)), emb.img_projection(emb.glb_GN.reshape(1, -1))])
        separators = separators.reshape(2, -1).to(features[0].dtype)
        return [~(f[:, None, :] == separators[None]).all(-1).any(-1) for f in features]


_ADAPTERS = {a.architecture: a for a in (Gemma3Adapter(), LlavaAdapter(), LlavaNextAdapter(), Qwen2_5_VLAdapter(), Phi3VAdapter())}
SUPPORTED_ARCHITECTURES = tuple(sorted(_ADAPTERS))


def adapter_for(model) -> FamilyAdapter:
    """The adapter for ``model``'s class; a clear error for anything else."""
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise ValueError(f"{name} is not supported by AsymVLM's transformers path; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _ADAPTERS[name]
