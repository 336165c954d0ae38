"""TEST-ONLY: pure-torch stand-ins for the ``torch.ops._C`` CPU ops that the PyPI vLLM wheel lacks.

Not part of the ``asymvlm_vllm`` product; never install or import it outside the tests.

Why it exists
-------------
The PyPI vLLM 0.33 wheel is a CUDA build: it ships no compiled CPU kernels (``vllm._C`` is
absent and the CUDA extensions need ``libcuda``), so on a machine without a GPU the real engine
fails at start-up (``'_OpNamespace' '_C' object has no attribute 'init_cpu_memory_env'``).
The engine tests still want the *real* vLLM scheduler, KV-cache manager, CPU model runner and
model code, so this module fills exactly the missing op names with slow, simple torch code:
attention over the paged KV cache, KV writes, slot mapping, rotary embedding, a few activations
and the two sampling kernels. Correctness over speed; tiny models only.

How it is loaded
----------------
The folder holding this file also holds ``asymvlm_test_cpu_shim-0.0.1.dist-info`` with a
``vllm.general_plugins`` entry point, so putting the folder on ``sys.path`` (in-process tests,
see ``tests/engine/conftest.py``) or on ``PYTHONPATH`` (``vllm serve`` subprocesses) makes vLLM
call :func:`register` in every process it starts. The conftest also calls it directly.

:func:`register` is re-entrant and only fills gaps: an op that already resolves (a real build,
or an earlier call) is left alone. Not supported: ALiBi, attention sinks, ``dynamic_causal``,
fp8 KV cache, tensor parallelism. Gemma 3's bidirectional image attention is not reproduced:
vLLM's CPU attention backend does not pass those ranges to the op, so CPU vLLM is causal there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["call_counts", "register", "reset_call_counts"]


_CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    _CALLS[name] = _CALLS.get(name, 0) + 1


def call_counts() -> dict[str, int]:
    """How often each stand-in ran in this process (a copy); proves the engine used them."""
    return dict(_CALLS)


def reset_call_counts() -> None:
    _CALLS.clear()


# ---------------------------------------------------------------- memory / metadata


def init_cpu_memory_env(nodes):
    _count("init_cpu_memory_env")


def get_scheduler_metadata(*args, **kwargs):
    _count("get_scheduler_metadata")
    return torch.empty(0, dtype=torch.uint8)


# ---------------------------------------------------------------- paged KV cache and attention


def cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa,
                               k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"):
    """Write ``key``/``value`` [T, Hkv, D] into the caches [num_blocks, Hkv, block_size, D] at
    ``slot_mapping`` (slot = block * block_size + offset; negative slots are padding)."""
    _count("cpu_attn_reshape_and_cache")
    if kv_cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise NotImplementedError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported by the test shim")
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].to(torch.long)
    valid = slots >= 0
    slots = slots[valid]
    bs = key_cache.shape[2]
    blk, off = slots // bs, slots % bs
    key_cache[blk, :, off, :] = key[:n][valid].to(key_cache.dtype)
    value_cache[blk, :, off, :] = value[:n][valid].to(value_cache.dtype)


def cpu_attention_with_kv_cache(query, key_cache, value_cache, output, query_start_loc, seq_lens,
                                scale, causal, alibi_slopes, sliding_window, block_table, softcap,
                                scheduler_metadata, s_aux, dynamic_causal=None, k_scale=1.0,
                                v_scale=1.0, kv_cache_dtype="auto"):
    """Varlen attention of ``query`` [T, Hq, D] over each request's cached keys (GQA, causal,
    sliding window, softcap), written into ``output``; one request at a time, in float32."""
    _count("cpu_attention_with_kv_cache")
    if alibi_slopes is not None or s_aux is not None:
        raise NotImplementedError("ALiBi / attention sinks are not supported by the test shim")
    if dynamic_causal is not None:
        raise NotImplementedError("dynamic_causal is not supported by the test shim")
    T, Hq, D = query.shape[0], query.shape[1], query.shape[-1]
    out = output.view(T, Hq, D)
    bs = key_cache.shape[2]
    Hkv = key_cache.shape[1]
    qsl = query_start_loc.tolist()
    sl = seq_lens.tolist()
    for i in range(len(sl)):
        qs, qe = qsl[i], qsl[i + 1]
        q_len, s_len = qe - qs, sl[i]
        if q_len == 0:
            continue
        nblk = (s_len + bs - 1) // bs
        blocks = block_table[i, :nblk].to(torch.long)
        k = key_cache[blocks].permute(0, 2, 1, 3).reshape(-1, Hkv, D)[:s_len]  # [S, Hkv, D]
        v = value_cache[blocks].permute(0, 2, 1, 3).reshape(-1, Hkv, D)[:s_len]
        q = query[qs:qe].float().transpose(0, 1)  # [Hq, q, D]
        k = k.float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)  # [Hq, S, D]
        v = v.float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        s = (q @ k.transpose(1, 2)) * scale  # [Hq, q, S]
        if softcap and softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        qpos = torch.arange(s_len - q_len, s_len).unsqueeze(1)  # absolute positions of the queries
        kpos = torch.arange(s_len).unsqueeze(0)
        mask = torch.ones(q_len, s_len, dtype=torch.bool)
        if causal:
            mask &= kpos <= qpos
        if sliding_window is not None and sliding_window > 0:
            mask &= kpos > qpos - sliding_window
            if not causal:
                mask &= kpos < qpos + sliding_window
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[qs:qe] = (p @ v).transpose(0, 1).to(out.dtype)


def compute_slot_mapping_kernel_impl(query_start_loc, positions, block_table, slot_mapping, block_size):
    _count("compute_slot_mapping_kernel_impl")
    qsl = query_start_loc.tolist()
    num_tokens = qsl[-1]
    lens = torch.tensor([qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)])
    req_idx = torch.repeat_interleave(torch.arange(len(qsl) - 1), lens)
    pos = positions[:num_tokens].to(torch.long)
    blk = block_table[req_idx, pos // block_size].to(torch.long)
    slot_mapping[:num_tokens] = blk * block_size + pos % block_size
    slot_mapping[num_tokens:] = -1


# ---------------------------------------------------------------- rotary embedding


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    """In-place RoPE (only reached without ``custom_ops: ["none"]``)."""
    _count("rotary_embedding")
    cs = cos_sin_cache.index_select(0, positions.flatten().long())
    rot = cs.shape[-1]
    cos, sin = cs.chunk(2, dim=-1)
    if inverse:
        sin = -sin
    for x in (query, key):
        if x is None:
            continue
        xv = x.view(positions.numel(), -1, head_size)
        part = xv[..., rope_dim_offset:rope_dim_offset + rot].float()
        c, s_ = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
        if is_neox:
            x1, x2 = part.chunk(2, dim=-1)
            new = torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1)
        else:
            x1, x2 = part[..., 0::2], part[..., 1::2]
            new = torch.stack((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1).flatten(-2)
        xv[..., rope_dim_offset:rope_dim_offset + rot] = new.to(x.dtype)


# ---------------------------------------------------------------- sampling


def greedy_argmax(logits):
    _count("greedy_argmax")
    return logits.argmax(dim=-1).view(-1)


def fused_gumbel_argmax(logits_f32, seeds):
    """Per-row Gumbel-max sampling with per-row seeds (deterministic for a given seed)."""
    _count("fused_gumbel_argmax")
    out = torch.empty(logits_f32.shape[0], dtype=torch.long)
    for i in range(logits_f32.shape[0]):
        g = torch.Generator().manual_seed(int(seeds[i]))
        u = torch.rand(logits_f32.shape[1], generator=g).clamp_(1e-20, 1.0)
        out[i] = torch.argmax(logits_f32[i] - torch.log(-torch.log(u)))
    return out


# ---------------------------------------------------------------- activations, op(out, x)
# Some vLLM activation classes fetch torch.ops._C.<op> in __init__ on CPU even when it is never
# called (LLaVA's CLIP: gelu_quick).


def _act(name, fn, gated=False):
    def op(out, x, *args):
        _count(name)
        if gated:
            d = x.shape[-1] // 2
            out.copy_(fn(x[..., :d]) * x[..., d:])
        else:
            out.copy_(fn(x))

    op.__name__ = name
    return op


_ACTS = [
    _act("gelu_quick", lambda x: x * torch.sigmoid(1.702 * x)),
    _act("gelu_new", lambda x: F.gelu(x, approximate="tanh")),
    _act("gelu_fast", lambda x: F.gelu(x, approximate="tanh")),
    _act("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    _act("relu", F.relu),
    _act("silu_and_mul", F.silu, gated=True),
    _act("gelu_and_mul", F.gelu, gated=True),
    _act("gelu_tanh_and_mul", lambda x: F.gelu(x, approximate="tanh"), gated=True),
]

_OPS = {f.__name__: f for f in (*_ACTS, greedy_argmax, fused_gumbel_argmax, init_cpu_memory_env,
                                get_scheduler_metadata, cpu_attn_reshape_and_cache, cpu_attention_with_kv_cache,
                                compute_slot_mapping_kernel_impl, rotary_embedding)}


def _resolves(ns, name: str) -> bool:
    try:
        getattr(ns, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register() -> list[str]:
    """Fill the missing ``torch.ops._C`` names with the stand-ins; return the names filled now.

    Re-entrant: a second call (vLLM loads general plugins once per process, the conftest calls
    it too) finds every name resolved and fills nothing.
    """
    ns = torch.ops._C
    filled = []
    for name, fn in _OPS.items():
        if not _resolves(ns, name):
            setattr(ns, name, fn)
            filled.append(name)
    return filled
