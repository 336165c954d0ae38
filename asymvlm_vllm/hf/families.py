"""What differs between VLM families: where image features come from, which of their rows
are structure, and how positions work. Everything else is shared (:mod:`.pruning`).

One small adapter per family; :func:`adapter_for` picks it by the model's class name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FamilyAdapter", "HeatmapLayout", "SUPPORTED_ARCHITECTURES", "adapter_for"]


def _features_per_image(features) -> list[Tensor]:
    if isinstance(features, Tensor):
        features = features.reshape(-1, *features.shape[-2:]) if features.ndim == 3 else [features]
    return [f.reshape(-1, f.shape[-1]) for f in features]


@dataclass(frozen=True)
class HeatmapLayout:
    """How one image's prunable rows are drawn over its picture.

    Attributes
    ----------
    grid : tuple of int
        (h, w), or (t, h, w) averaged over t: the first ``prod(grid)`` prunable rows tile it
        row-major; rows past them are not drawn.
    canvas : (height, width) or None
        The pixel size of the image the grid tiles when the processor resized the picture and
        padded it (Phi-3-V's HD transform, see :func:`.phi3v.hd_transformed_picture`); None
        when the grid tiles the picture itself.
    undrawn : str or None
        What the rows past the grid are, for the demo's note.
    """

    grid: tuple[int, ...]
    canvas: tuple[int, int] | None = None
    undrawn: str | None = None


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

    def render(self, processor, messages, add_generation_prompt: bool) -> str:
        """The chat template's text for ``messages`` (content: a string or a list of parts)."""
        return processor.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)

    def tokenise(self, processor, texts: list[str], images: list[list]):
        """Processor batch, left-padded: ``texts[b]`` with its images ``images[b]``."""
        processor.tokenizer.padding_side = "left"
        return processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True)

    def heatmap_layouts(self, model, inputs, features: list[Tensor]) -> list[HeatmapLayout | None]:
        """Per image, how its prunable rows are drawn over the picture (None: they form no grid)."""
        return [HeatmapLayout(tuple(g)) if g is not None else None for g in self.grid_shapes(model, inputs, features)]

    def heatmap_picture(self, picture, layout: HeatmapLayout):
        """The picture a heatmap of ``layout`` is drawn over: ``picture`` as the processor laid it
        out on ``layout.canvas`` (the picture itself when the canvas is None)."""
        if layout.canvas is not None:
            raise NotImplementedError(f"{type(self).__name__} gives a canvas but does not lay pictures out on it")
        return picture


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
    """Phi-3.5-Vision (``Phi3VForCausalLM``, :mod:`.phi3v`).

    Its chat template takes string content with ``<|image_k|>`` tags, and its (remote-code)
    processor takes one prompt at a time and marks image ``k``'s tokens ``-k``; batches are
    collated here with every image token written as vLLM writes it (``<|image|>``). The
    newline (``sub_GN``) and global-separator (``glb_GN``) rows are structure, found by their
    place in the HD layout of each image's ``image_sizes``.
    """

    architecture: str = "Phi3VForCausalLM"

    def image_token_id(self, model) -> int:
        from .phi3v import IMAGE_TOKEN_ID

        return IMAGE_TOKEN_ID

    def render(self, processor, messages, add_generation_prompt: bool) -> str:
        return processor.tokenizer.apply_chat_template(string_content_messages(messages),
                                                       add_generation_prompt=add_generation_prompt, tokenize=False)

    def tokenise(self, processor, texts: list[str], images: list[list]):
        from transformers import BatchFeature

        samples = [processor(text, images=list(imgs) if imgs else None, return_tensors="pt")
                   for text, imgs in zip(texts, images)]
        width = max(s["input_ids"].shape[-1] for s in samples)
        pad = processor.tokenizer.pad_token_id or 0
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for b, sample in enumerate(samples):  # left padding
            row = sample["input_ids"].reshape(-1)
            ids[b, width - row.shape[0]:] = row.masked_fill(row < 0, self.image_token_id(None))
            mask[b, width - row.shape[0]:] = 1
        data = {"input_ids": ids, "attention_mask": mask}
        with_images = [s for s in samples if "pixel_values" in s]
        if with_images:
            data["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            data["image_sizes"] = torch.cat([torch.as_tensor(s["image_sizes"]).reshape(-1, 2) for s in with_images])
        return BatchFeature(data=data)

    def image_features(self, model, inputs) -> list[Tensor]:
        return list(model.get_image_features(inputs["pixel_values"].to(model.dtype), inputs["image_sizes"]))

    def _layouts(self, inputs, features: list[Tensor]):
        from ..core.layouts import hd_image_layout

        sizes = inputs["image_sizes"].tolist()
        return [hd_image_layout(int(h), int(w), f.shape[0]) for (h, w), f in zip(sizes, features)]

    def prunable_rows(self, model, inputs, features: list[Tensor]) -> list[Tensor]:
        return [~layout.separator_mask(f.device) for layout, f in zip(self._layouts(inputs, features), features)]

    def grid_shapes(self, model, inputs, features: list[Tensor]) -> list[tuple[int, ...] | None]:
        return [None for _ in features]  # the HD crops' grid, then the global view's: no single grid

    def heatmap_layouts(self, model, inputs, features: list[Tensor]) -> list[HeatmapLayout | None]:
        # The crops' patches (the first of the prunable rows) tile the HD-transformed image; the
        # global view's 12 x 12 patches that follow cover the whole image again, coarser.
        from ..core.layouts import HD_MERGED_SIDE

        side = HD_MERGED_SIDE
        return [HeatmapLayout(layout.sub_grid, canvas=layout.size_px,
                              undrawn=f"the global view's {side * side} tokens ({side} x {side} patches of the whole "
                                      "image, downscaled to 336 px)")
                for layout in self._layouts(inputs, features)]

    def heatmap_picture(self, picture, layout: HeatmapLayout):
        from .phi3v import hd_transformed_picture

        return hd_transformed_picture(picture, *layout.canvas)


def string_content_messages(messages) -> list[dict]:
    """Chat messages with list content rendered as one string, as vLLM renders them for a
    "string" chat template: an image part becomes ``<|image_k|>`` (numbered across the whole
    conversation), and a message's image tags come first, then its text parts, joined by newlines."""
    out, count = [], 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            tags, texts = [], []
            for part in content:
                if part.get("type") in ("image", "image_url", "image_pil"):
                    count += 1
                    tags.append(f"<|image_{count}|>")
                elif part.get("type") == "text":
                    texts.append(part.get("text", ""))
            content = "\n".join(tags + ["\n".join(texts)])
        out.append({**message, "content": content})
    return out


_ADAPTERS = {a.architecture: a for a in (Gemma3Adapter(), LlavaAdapter(), LlavaNextAdapter(), Qwen2_5_VLAdapter(), Phi3VAdapter())}
SUPPORTED_ARCHITECTURES = tuple(sorted(_ADAPTERS))


def adapter_for(model) -> FamilyAdapter:
    """The adapter for ``model``'s class; a clear error for anything else."""
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise ValueError(f"{name} is not supported by AsymVLM's transformers path; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _ADAPTERS[name]
