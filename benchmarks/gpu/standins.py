"""Pure-torch stand-ins for the ``torch.ops._C`` ops vLLM 0.33 reaches on CUDA without its compiled
``vllm/_C_stable_libtorch`` (benchmark tooling for the lent GPU, never product code).

The lent image has torch 2.11; vLLM 0.33's extensions are built against 2.14 and are not carried.
Under the settings ``run.sh`` uses (eager or piecewise graphs, ``custom_ops: ["none"]``, Triton
attention, the V1 runner, no FlashInfer sampler, TP 1, no quantization) these are the ops left:
RMSNorm (vLLM IR prefers ``vllm_c`` on CUDA), the MLP and CLIP activations (looked up at
construction), repetition penalties and rotary embedding (only when used). Each is a real
dispatcher op with the compiled extension's schema, so ``hasattr(torch.ops._C, name)`` and fake
registration behave as with the real build. :func:`register` defines only the missing ones (a
real build wins) and may run many times. ``CALLS`` counts calls, so a run can say which it used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CALLS", "SCHEMAS", "register"]

SCHEMAS = {  # from vLLM 0.33.0's _C_stable_libtorch
    "rms_norm": "rms_norm(Tensor! result, Tensor input, Tensor? weight, float epsilon) -> ()",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor? weight, float epsilon) -> ()",
    "silu_and_mul": "silu_and_mul(Tensor! result, Tensor input) -> ()",
    "gelu_quick": "gelu_quick(Tensor! out, Tensor input) -> ()",
    "apply_repetition_penalties_": ("apply_repetition_penalties_(Tensor! logits, Tensor prompt_mask, "
                                    "Tensor output_mask, Tensor repetition_penalties) -> ()"),
    "rotary_embedding": ("rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
                         "Tensor cos_sin_cache, bool is_neox, int rope_dim_offset=0, bool inverse=False) -> ()"),
}
CALLS: dict[str, int] = {}
_library = None


def _counted(fn):
    def op(*args, **kwargs):
        CALLS[fn.__name__] = CALLS.get(fn.__name__, 0) + 1
        return fn(*args, **kwargs)

    op.__name__ = fn.__name__
    return op


def _normalised(x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """vLLM IR's native RMSNorm: float32 statistics, the weight applied in its own dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y.to(weight.dtype) * weight
    return y.to(dtype)


@_counted
def rms_norm(result, input, weight, epsilon):
    result.copy_(_normalised(input, weight, epsilon, input.dtype))


@_counted
def fused_add_rms_norm(input, residual, weight, epsilon):
    total = input.float() + residual.float()
    residual.copy_(total.to(residual.dtype))
    input.copy_(_normalised(total, weight, epsilon, input.dtype))


@_counted
def silu_and_mul(result, input):
    half = input.shape[-1] // 2
    result.copy_(F.silu(input[..., :half]) * input[..., half:])


@_counted
def gelu_quick(out, input):
    out.copy_(input * torch.sigmoid(1.702 * input))


@_counted
def apply_repetition_penalties_(logits, prompt_mask, output_mask, repetition_penalties):
    penalty = repetition_penalties.unsqueeze(1).expand_as(logits)
    penalty = torch.where(prompt_mask | output_mask, penalty, torch.ones_like(penalty))
    logits.mul_(torch.where(logits > 0, 1.0 / penalty, penalty))


@_counted
def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    cos_sin = cos_sin_cache.index_select(0, positions.flatten().long())
    width = cos_sin.shape[-1]
    cos, sin = cos_sin.chunk(2, dim=-1)
    if inverse:
        sin = -sin
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(positions.numel(), -1, head_size)
        part = heads[..., rope_dim_offset: rope_dim_offset + width].float()
        if is_neox:
            x1, x2 = part.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = part[..., 0::2], part[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        heads[..., rope_dim_offset: rope_dim_offset + width] = rotated.to(x.dtype)


_IMPLS = {f.__name__: f for f in (rms_norm, fused_add_rms_norm, silu_and_mul, gelu_quick, apply_repetition_penalties_,
                                  rotary_embedding)}


def _defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"_C::{name}", "")
        return True
    except RuntimeError:
        return False


def register() -> list[str]:
    """Define the ``_C`` ops that are missing; return the names defined by this call."""
    global _library
    if _library is None:
        _library = torch.library.Library("_C", "FRAGMENT")
    defined = []
    for name, schema in SCHEMAS.items():
        if _defined(name):
            continue
        _library.define(schema)
        _library.impl(name, _IMPLS[name], "CompositeExplicitAutograd")
        defined.append(name)
    return defined
