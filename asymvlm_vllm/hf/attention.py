"""An attention implementation that sees what SDPA hides.

SDPA and flash attention return no weights, yet text eviction needs the final layer's
current-step attention and scorer training adds a soft mask to the attention logits of every
layer. :class:`AttentionTap` registers ``"asymvlm_sdpa"`` with transformers'
``AttentionInterface``: it calls transformers' own SDPA function unchanged (so outputs are
bit-identical to ``"sdpa"``) and, only when asked,

* recomputes the final LM layer's attention of the newest query from that layer's query and
  the cached keys (``softmax(q·Kᵀ·scale + mask)``, per head), and
* adds a per-key logit bias (B, K) in every LM layer, computing that attention eagerly so the
  bias gets gradients.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ATTENTION_NAME", "AttentionTap", "final_full_attention_layer", "language_model_layers"]

ATTENTION_NAME = "asymvlm_sdpa"


def _additive_mask(attention_mask: Tensor | None, q_len: int, kv_len: int, batch: int, dtype, device) -> Tensor:
    """(B or 1, 1, Q, K) float mask with 0 where attention is allowed."""
    if attention_mask is None:  # SDPA's causal shortcut: build the causal mask it stands for
        q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k = torch.arange(kv_len, device=device)[None, :]
        allowed = (k <= q)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, :, -q_len:, :kv_len]
    else:
        return attention_mask[:, :, -q_len:, :kv_len].to(dtype)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    tap: AttentionTap | None = getattr(module, "_asymvlm_tap", None)
    if tap is None or (tap.logit_bias is None and not (tap.recording and module is tap.final_layer)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)
    keys, values = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, _, q_len, _ = query.shape
    kv_len = keys.shape[2]
    if tap.logit_bias is None:  # recording only: keep the SDPA output, add the weights beside it
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        mask = _additive_mask(attention_mask, q_len, kv_len, batch, torch.float32, query.device)[:, :, -1:]
        logits = torch.matmul(query[:, :, -1:].float(), keys.float().transpose(2, 3)) * scaling + mask
        tap.final_attention = torch.softmax(logits, dim=-1)[:, :, 0]  # (B, H, K)
        return out
    mask = _additive_mask(attention_mask, q_len, kv_len, batch, torch.float32, query.device)
    logits = torch.matmul(query.float(), keys.float().transpose(2, 3)) * scaling + mask
    logits = logits + tap.logit_bias[:, None, None, :kv_len].float()
    weights = torch.softmax(logits, dim=-1)
    if tap.recording and module is tap.final_layer:
        tap.final_attention = weights[:, :, -1].detach()
    out = torch.matmul(weights.to(values.dtype), values)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def language_model_layers(model) -> list:
    """The decoder layers of a VLM's language model (``model.model.language_model.layers``)."""
    lm = getattr(getattr(model, "model", model), "language_model", None)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.language_model.layers; not a supported VLM")
    return list(layers)


def final_full_attention_layer(model) -> int:
    """Index of the LM layer whose attention eviction reads: the last layer, or in a hybrid
    model (Gemma 3) the last full-attention layer.

    Real Gemma 3 checkpoints end in sliding-window layers, whose attention is exactly 0 for
    every entry older than the window; ranking by it would evict by age, not by attention.
    """
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
    count = len(language_model_layers(model))
    if layer_types:
        full = [i for i, kind in enumerate(layer_types[:count]) if kind != "sliding_attention"]
        if full:
            return full[-1]
    return count - 1


class AttentionTap:
    """Installs :data:`ATTENTION_NAME` on ``model`` and exposes its two extra abilities.

    Attributes
    ----------
    final_attention : Tensor or None, shape (B, heads, K)
        After a forward pass in :meth:`record`: the final LM layer's attention of the newest
        query over all K cached keys (padding and evicted entries get 0). "Final" is the last
        full-attention layer (:func:`final_full_attention_layer`), the last layer unless the
        model ends in sliding-window layers.
    logit_bias : Tensor or None, shape (B, K)
        While set (:meth:`bias`), added to every LM layer's attention logits at each key.
    """

    def __init__(self, model):
        layers = language_model_layers(model)
        self.final_layer = layers[final_full_attention_layer(model)].self_attn
        for layer in layers:
            layer.self_attn._asymvlm_tap = self
        if model.config._attn_implementation not in ("sdpa", ATTENTION_NAME):
            raise ValueError(
                f"AsymVLM's attention tap wraps SDPA; load the model with attn_implementation='sdpa' "
                f"(it has {model.config._attn_implementation!r})"
            )
        model.set_attn_implementation(ATTENTION_NAME)
        self.recording = False
        self.logit_bias: Tensor | None = None
        self.final_attention: Tensor | None = None

    @contextmanager
    def record(self):
        """Record the final layer's newest-query attention during the enclosed forward passes."""
        self.recording, self.final_attention = True, None
        try:
            yield self
        finally:
            self.recording = False

    @contextmanager
    def bias(self, logit_bias: Tensor):
        """Add ``logit_bias`` (B, K) to every LM layer's attention logits inside the block."""
        if logit_bias.ndim != 2:
            raise ValueError(f"logit_bias must have shape (batch, keys), got {tuple(logit_bias.shape)}")
        self.logit_bias = logit_bias
        try:
            yield self
        finally:
            self.logit_bias = None
