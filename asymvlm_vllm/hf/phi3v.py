"""Phi-3.5-Vision (``Phi3VForCausalLM``) in transformers, written for AsymVLM's reference path.

transformers has no Phi-3-V class: the hub checkpoint ships its model as remote code, written
for transformers 4.x. This module is the architecture as vLLM's ``phi3v.py`` runs it, built from
transformers' own ``Phi3Model`` and ``CLIPVisionModel``, and it loads a checkpoint's safetensors
under their hub names (``model.embed_tokens``, ``model.layers.*``, ``model.vision_embed_tokens.*``,
``lm_head``). Only the *processor* of a Phi-3-V directory is remote code; loading it is the
caller's choice (``trust_remote_code``), never this module's.

The image encoder is CLIP ViT-L/14 at 336 px, as vLLM hard-codes it; ``img_processor.layer_idx``
(default -2) decides how many of its 24 layers run. Each image becomes, in prompt order: its
HD crops' features merged 2 x 2 (``12·h_crop`` rows of ``12·w_crop`` patches, each row followed by
the learned newline ``sub_GN``), one ``glb_GN`` separator, then the 336-px global view the same
way (12 rows of 12 patches and a newline each), all projected by a 2-layer MLP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationMixin, Phi3Config
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3Model, Phi3PreTrainedModel

from ..core.errors import AsymVLMError
from ..core.layouts import HD_CROP_PX, HD_MERGED_SIDE, hd_image_layout

__all__ = ["IMAGE_TOKEN_ID", "Phi3VForCausalLM", "clip_vit_l_336_config", "hd_transformed_picture", "hub_name",
           "hub_state_dict", "load_phi3v", "phi3v_text_config"]

IMAGE_TOKEN_ID = 32044  # "<|image|>": the id vLLM's phi3v.py writes for every image token
CLIP_LAYERS = 24


def clip_vit_l_336_config(layer_idx: int = -2) -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 truncated after the feature layer ``layer_idx`` (vLLM's rule: a negative
    index counts from the end, so -2 runs 23 layers; a non-negative one runs ``layer_idx + 1``)."""
    layers = CLIP_LAYERS + layer_idx + 1 if layer_idx < 0 else layer_idx + 1
    if not 1 <= layers <= CLIP_LAYERS:
        raise AsymVLMError(f"img_processor.layer_idx={layer_idx} selects no layer of CLIP ViT-L/14's {CLIP_LAYERS}")
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=layers,
                            patch_size=14, image_size=HD_CROP_PX, hidden_act="quick_gelu", projection_dim=768,
                            layer_norm_eps=1e-5)


def phi3v_text_config(raw: dict) -> Phi3Config:
    """A transformers ``Phi3Config`` from a Phi-3-V ``config.json`` dict, keeping ``img_processor``
    and ``embd_layer`` (the checkpoint's rope scaling ``su`` is transformers' ``longrope``)."""
    rope = dict(raw.get("rope_scaling") or {})
    rope_type = rope.pop("type", rope.pop("rope_type", "default"))
    rope_type = "longrope" if rope_type == "su" else rope_type
    rope_parameters = {"rope_type": rope_type, "rope_theta": float(raw.get("rope_theta", 10000.0)), **rope}
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
             "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
             "initializer_range")
    config = Phi3Config(**{k: raw[k] for k in names if k in raw and raw[k] is not None},
                        rope_parameters=rope_parameters)
    config.img_processor = dict(raw.get("img_processor") or {})
    config.embd_layer = dict(raw.get("embd_layer") or {})
    config.architectures = ["Phi3VForCausalLM"]
    return config


class Phi3HDImageEmbedding(nn.Module):
    """CLIP features of the HD crops and the global view, laid out with separators and projected."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        img = config.img_processor
        if img.get("image_dim_out", 1024) != 1024 or img.get("num_img_tokens", 144) != HD_MERGED_SIDE ** 2:
            raise AsymVLMError("Phi-3-V's image encoder is CLIP ViT-L/14-336 (image_dim_out 1024, 144 tokens per crop)")
        if config.embd_layer.get("hd_transform_order", "sub_glb") != "sub_glb":
            raise AsymVLMError("only Phi-3-V's 'sub_glb' HD transform order exists in vLLM")
        self.img_processor = CLIPVisionModel(clip_vit_l_336_config(img.get("layer_idx", -2)))
        self.type_feature = img.get("type_feature", "patch")
        dim = 4 * 1024
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(nn.Linear(dim, config.hidden_size), nn.GELU(),
                                            nn.Linear(config.hidden_size, config.hidden_size))

    def separator_embeddings(self) -> Tensor:
        """(2, hidden): the projected ``sub_GN`` (newline) and ``glb_GN`` rows."""
        return self.img_projection(torch.cat([self.sub_GN.reshape(1, -1), self.glb_GN.reshape(1, -1)]))

    def _merged(self, features: Tensor, h_crop: int, w_crop: int) -> Tensor:
        # (crops, 576, C) -> (12·h_crop, 12·w_crop, 4C), each 2 x 2 patch block on the channels
        n, length, c = features.shape
        side = int(length ** 0.5)
        half = side // 2
        grid = (features.reshape(n, half, 2, half, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, half * half, 4 * c)
                .reshape(h_crop, w_crop, half, half, 4 * c).permute(0, 2, 1, 3, 4)
                .reshape(h_crop * half, w_crop * half, 4 * c))
        newline = self.sub_GN.reshape(1, 1, -1).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, newline], dim=1).reshape(-1, 4 * c)

    def forward(self, pixel_values: Tensor, image_sizes: Tensor) -> list[Tensor]:
        """Image embeddings.

        Parameters
        ----------
        pixel_values : Tensor, shape (I, crops, 3, 336, 336)
            The global view first, then the HD crops (zero-padded to the same count).
        image_sizes : Tensor, shape (I, 2)
            Height and width of each HD-transformed image (multiples of 336).

        Returns
        -------
        list of Tensor, shape (P_i, hidden)
            ``P_i = hd_image_layout(h, w).num_rows``.
        """
        out = []
        dtype = self.img_projection[0].weight.dtype
        for pixels, (h, w) in zip(pixel_values, image_sizes.tolist()):
            layout = hd_image_layout(int(h), int(w))
            crops = pixels[: 1 + layout.h_crop * layout.w_crop].to(dtype)
            features = self.img_processor(pixel_values=crops).last_hidden_state
            if self.type_feature == "patch":
                features = features[:, 1:]
            rows = torch.cat([self._merged(features[1:], layout.h_crop, layout.w_crop), self.glb_GN.reshape(1, -1),
                              self._merged(features[:1], 1, 1)])
            out.append(self.img_projection(rows))
        return out


class Phi3VModel(nn.Module):
    """The Phi-3 language model and the image embedding (``model.*`` of the checkpoint)."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.language_model = Phi3Model(config)
        self.vision_embed_tokens = Phi3HDImageEmbedding(config)

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed_tokens(input_ids)
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3PreTrainedModel, GenerationMixin):
    """Phi-3-V for causal generation. ``input_ids`` mark image tokens either as the processor
    does (``-k`` for image ``k``) or as vLLM does (:data:`IMAGE_TOKEN_ID`)."""

    config_class = Phi3Config
    # Layers of CLIP past the feature layer, and its unused final norm, are in real checkpoints.
    _keys_to_ignore_on_load_unexpected = [r"img_processor\.(vision_model\.)?(encoder\.layers\.\d+|post_layernorm)\."]
    _tied_weights_keys = {}

    def __init__(self, config: Phi3Config):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: Tensor, image_sizes: Tensor) -> list[Tensor]:
        """Per image (P_i, hidden): see :meth:`Phi3HDImageEmbedding.forward`."""
        return self.model.vision_embed_tokens(pixel_values, image_sizes)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None, image_sizes: Tensor | None = None) -> Tensor:
        """(B, T, hidden): token embeddings with the image features at the image tokens."""
        image = (input_ids < 0) | (input_ids == IMAGE_TOKEN_ID)
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image, 0))
        if pixel_values is not None:
            features = torch.cat(self.get_image_features(pixel_values, image_sizes))
            if features.shape[0] != int(image.sum()):
                raise AsymVLMError(f"{int(image.sum())} image tokens for {features.shape[0]} image features")
            embeds = embeds.masked_scatter(image[..., None], features.to(embeds.dtype))
        return embeds

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, logits_to_keep=0, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        out = self.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, past_key_values=past_key_values,
                                        use_cache=use_cache, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)


def hd_transformed_picture(picture, height: int, width: int):
    """``picture`` as the HD transform lays it out on its ``height`` x ``width`` pixel canvas
    (the processor's ``image_sizes``): resized, keeping its aspect ratio, so its longer side
    fills the canvas, then padded with white equally before and after on the shorter side
    (the odd pixel after). The HD crops tile this image in 336-px squares.

    Parameters
    ----------
    picture : PIL.Image
    height, width : int
        The HD-transformed size, multiples of 336.

    Returns
    -------
    PIL.Image, RGB, ``width`` x ``height``.
    """
    from PIL import Image

    hd_image_layout(height, width)  # checks the canvas is whole crops
    # As the processor does: work on the wide orientation (a tall picture is transposed, and
    # the result transposed back), resize so the width fills the canvas, pad the height.
    tall = picture.size[0] < picture.size[1]
    wide = picture.convert("RGB")
    wide = wide.transpose(Image.TRANSPOSE) if tall else wide
    canvas_w, canvas_h = (height, width) if tall else (width, height)
    pw, ph = wide.size
    resized_h = int(canvas_w / (pw / ph))
    if resized_h > canvas_h:
        raise AsymVLMError(f"a {picture.size[0]} x {picture.size[1]} picture does not fit the HD canvas "
                           f"{width} x {height}")
    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    canvas.paste(wide.resize((canvas_w, resized_h), Image.BILINEAR), (0, (canvas_h - resized_h) // 2))
    canvas = canvas.transpose(Image.TRANSPOSE) if tall else canvas
    return canvas


# checkpoint name -> module name: the language model sits one level deeper here, and
# transformers 5's CLIPVisionModel has no ``vision_model`` level of its own.
KEY_MAPPING = {r"^model\.(embed_tokens|layers|norm)\.": r"model.language_model.\1.",
               r"\.img_processor\.vision_model\.": ".img_processor."}


def hub_name(key: str) -> str:
    """The hub checkpoint's name of the module weight ``key`` (the inverse of :data:`KEY_MAPPING`)."""
    key = key.replace("model.language_model.", "model.", 1)
    if ".img_processor." in key and ".img_processor.vision_model." not in key:
        key = key.replace(".img_processor.", ".img_processor.vision_model.", 1)
    return key


def hub_state_dict(model: Phi3VForCausalLM) -> dict[str, Tensor]:
    """The model's weights under the hub checkpoint's names (what vLLM's loader expects)."""
    return {hub_name(key): value.contiguous() for key, value in model.state_dict().items()}


def load_phi3v(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa") -> Phi3VForCausalLM:
    """Load a local Phi-3-V directory (its ``config.json`` and safetensors) without remote code."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AsymVLMError(f"{model_dir} is not a model directory (no config.json)")
    raw = json.loads((model_dir / "config.json").read_text())
    if "Phi3VForCausalLM" not in (raw.get("architectures") or []):
        raise AsymVLMError(f"{model_dir} is not a Phi-3-V checkpoint (architectures: {raw.get('architectures')})")
    if not any(model_dir.glob("*.safetensors")):
        raise AsymVLMError(f"{model_dir} has no safetensors weights; AsymVLM never loads pickled checkpoints")
    model, info = Phi3VForCausalLM.from_pretrained(model_dir, config=phi3v_text_config(raw), key_mapping=KEY_MAPPING,
                                                   dtype=dtype, attn_implementation=attn_implementation,
                                                   local_files_only=True, use_safetensors=True,
                                                   output_loading_info=True)
    # transformers would leave a weight the checkpoint lacks uninitialised (the separators have
    # no init rule): a checkpoint under other names must fail here, not answer with garbage.
    missing = sorted(hub_name(key) for key in info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AsymVLMError(f"{model_dir}: the checkpoint lacks {len(missing)} weight(s) of Phi3VForCausalLM: {shown}")
    return model
