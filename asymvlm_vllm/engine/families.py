"""What the vLLM glue must know per model family: the image structure tokens of the text
query, which encoder-output rows are structure, and whether positions are M-RoPE.

Everything is read from the HF config vLLM already loaded. LLaVA-NeXT's structure rows are
found by value (its ``image_newline`` goes into the output unchanged); Phi-3-V's by position in
the HD layout of the image's ``image_sizes``: its separators pass through the projector with
the patches, so their values differ from a separately projected separator in the last bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.errors import AsymVLMError
from ..core.layouts import HD_MERGED_SIDE, HDImageLayout, hd_image_layout

__all__ = ["SUPPORTED_ARCHITECTURES", "VisionFamily", "family_for"]


@dataclass(frozen=True)
class VisionFamily:
    """Per-architecture facts for pruning inside vLLM."""

    architecture: str
    structure_token_ids: frozenset[int] = field(default_factory=frozenset)
    uses_mrope: bool = False
    merge_size: int = 1

    def structural_rows(self, model: Any, feature: Any, rows: Tensor) -> Tensor:
        """(R,) bool: rows of an image's encoder output that are structure, never pruned.

        On the host when the layout decides (no device work, no synchronisation); on the rows'
        device when the rows' values do (LLaVA-NeXT).

        Raises
        ------
        AsymVLMError
            When the image's layout cannot be known (the request then runs unpruned).
        """
        if self.architecture == "Phi3VForCausalLM":
            return _phi3v_layout(feature, rows.shape[0]).separator_mask("cpu")
        separators = self._separators(model)
        if separators is None:
            return torch.zeros(rows.shape[0], dtype=torch.bool)
        separators = separators.to(device=rows.device, dtype=rows.dtype).reshape(-1, rows.shape[-1])
        return (rows[:, None, :] == separators[None]).all(-1).any(-1)

    def _separators(self, model: Any) -> Tensor | None:
        if self.architecture == "LlavaNextForConditionalGeneration":
            return model.image_newline.detach()
        return None

    def grid_shape(self, feature: Any, num_rows: int) -> tuple[int, ...] | None:
        """Patch grid of an image's rows for position-based rankers, when it is known."""
        if self.architecture == "Phi3VForCausalLM":
            return None  # the HD crops' grid and the global view's grid: no single grid
        if self.uses_mrope and feature is not None and feature.data is not None:
            try:
                t, h, w = (int(x) for x in feature.data["image_grid_thw"].data.tolist())
                if t * (h // self.merge_size) * (w // self.merge_size) == num_rows:
                    return (t, h // self.merge_size, w // self.merge_size)
            except (KeyError, AttributeError, TypeError, ValueError):
                return None
            return None
        side = int(round(num_rows ** 0.5))
        return (side, side) if side * side == num_rows else None


def _phi3v_layout(feature: Any, num_rows: int) -> HDImageLayout:
    """The HD layout of a Phi-3-V image: from its ``image_sizes`` (the processor's padded size),
    or, where the engine holds no image data, from its row count when only one layout has it."""
    data = getattr(feature, "data", None)
    try:
        size = data["image_sizes"].data if data is not None else None
    except (KeyError, TypeError):
        size = None
    if size is not None:
        height, width = (int(x) for x in torch.as_tensor(size).reshape(-1).tolist())
        return hd_image_layout(height, width, num_rows)
    candidates = [HDImageLayout(h, w) for h in range(1, num_rows // HD_MERGED_SIDE ** 2 + 1)
                  for w in range(1, num_rows // (h * HD_MERGED_SIDE ** 2) + 1)
                  if HDImageLayout(h, w).num_rows == num_rows]
    if len(candidates) != 1:
        raise AsymVLMError(f"the layout of a Phi-3-V image of {num_rows} rows is unknown "
                           f"({len(candidates)} crop grids fit and the engine has no image_sizes)")
    return candidates[0]


def _ids(config: Any, *names: str) -> frozenset[int]:
    found = set()
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            found.add(value)
    return frozenset(found)


SUPPORTED_ARCHITECTURES = (
    "Gemma3ForConditionalGeneration",
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Phi3VForCausalLM",
    "Qwen2_5_VLForConditionalGeneration",
)


def family_for(hf_config: Any) -> VisionFamily | None:
    """The family of a model's HF config, or None when AsymVLM does not support it."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch == "Gemma3ForConditionalGeneration":
            return VisionFamily(arch, _ids(hf_config, "boi_token_index", "eoi_token_index", "boi_token_id", "eoi_token_id"))
        if arch in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Phi3VForCausalLM"):
            return VisionFamily(arch)
        if arch == "Qwen2_5_VLForConditionalGeneration":
            merge = getattr(getattr(hf_config, "vision_config", None), "spatial_merge_size", 2)
            return VisionFamily(arch, _ids(hf_config, "vision_start_token_id", "vision_end_token_id"),
                                uses_mrope=True, merge_size=int(merge))
    return None
