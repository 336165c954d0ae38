"""Triton kernel: per-block attention mass over vLLM's paged KV cache, from FlashAttention's LSE.

One program per (request, candidate slot) loads that block's (block_size, d) key tile once per
kv head and serves all ``G`` query heads of the group from it, so every key is read exactly
once: the operation is bound by that read. No tensor cores (``tl.dot``): with one query row per
head a multiply and a row sum are as fast, keep the registers per program low (more programs in
flight to cover memory latency), and stay exact under Triton's interpreter for bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asymvlm_vllm.core.block_importance import block_attention_mass_paged as block_attention_mass_paged_reference

__all__ = ["block_attention_mass_paged", "block_attention_mass_paged_reference"]


@triton.jit
def _block_mass_kernel(
    query_ptr,
    key_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    lse_ptr,
    candidate_start_ptr,
    num_candidates_ptr,
    out_ptr,
    scale,
    stride_qr,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_br,
    stride_bc,
    stride_lr,
    stride_lh,
    stride_or,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    c = tl.program_id(1)
    table_idx = tl.load(candidate_start_ptr + r) + c
    seq_len = tl.load(seq_lens_ptr + r)
    # Live tokens of this block: 0 for an empty slot (c >= num_candidates) or a block past seq_len.
    live = tl.minimum(tl.maximum(seq_len - table_idx * BLOCK_SIZE, 0), BLOCK_SIZE)
    live = tl.where(c < tl.load(num_candidates_ptr + r), live, 0)
    physical = tl.load(block_tables_ptr + r * stride_br + table_idx * stride_bc, mask=live > 0, other=0).to(tl.int64)

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < live
    mask_d = offs_d < HEAD_DIM
    k_ptrs = key_cache_ptr + physical * stride_kb + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd
    q_ptrs = query_ptr + r * stride_qr + offs_d * stride_qd

    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    num_kv = tl.where(live > 0, NUM_KV_HEADS, 0)  # empty slots read no keys at all
    for kvh in range(0, num_kv):
        k = tl.load(k_ptrs + kvh * stride_kh, mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        for g in tl.static_range(GROUP):
            h = kvh * GROUP + g
            q = tl.load(q_ptrs + h * stride_qh, mask=mask_d, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + r * stride_lr + h * stride_lh)
            p = tl.exp(tl.sum(q[None, :] * k, axis=1) * scale - lse)
            # where, not multiply: masked tokens' logits are 0, not -inf.
            acc += tl.where(mask_t, p, 0.0)
    tl.store(out_ptr + r * stride_or + c, tl.sum(acc, axis=0) / (NUM_KV_HEADS * GROUP))


def block_attention_mass_paged(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    candidate_start: torch.Tensor,
    num_candidates: torch.Tensor,
    max_candidates: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean attention mass of each candidate KV block of each request, from the LSE.

    ``block_mass[r, c] = (1/H) Σ_h Σ_t exp(scale · q[r, h]·k[t, h // G] − lse[r, h])`` over the
    tokens ``t`` of the block at table index ``candidate_start[r] + c`` whose logical position is
    below ``seq_lens[r]``; ``0`` for ``c ≥ num_candidates[r]``. This is the AsymVLM paper's
    eviction importance (final layer, current step, mean over heads), summed per KV block;
    :meth:`asymvlm_vllm.core.eviction.BlockEviction.evict_generated_blocks` ranks it to pick
    the generated blocks to evict. Computed in float32 whatever the input dtype. Makes no host
    synchronisation and, with ``out``, no allocation, so it can be captured in a CUDA graph.

    Parameters
    ----------
    query : Tensor, shape (R, H, d), fp16/bf16/fp32
        The current decode step's final-layer query of each request, unscaled.
    key_cache : Tensor, shape (num_blocks, block_size, KVH, d)
        vLLM's paged key cache; query head ``h`` reads kv head ``h // G``, ``G = H / KVH``.
    block_tables : Tensor, int32, shape (R, max_blocks)
        Every candidate index must lie in ``[0, max_blocks)`` (not checked: that would sync).
    seq_lens : Tensor, int32, shape (R,), contiguous
        Live tokens of each request; the last block may be partial.
    lse : Tensor, float32, shape (R, H)
        Natural-log LSE of ``scale · q·k`` over all of the request's keys, as FlashAttention's
        ``return_softmax_lse`` gives it.
    scale : float
        Softmax scale, typically ``d ** -0.5``.
    candidate_start, num_candidates : Tensor, int32, shape (R,), contiguous
        Request ``r``'s candidates are the table indices
        ``[candidate_start[r], candidate_start[r] + num_candidates[r])``.
    max_candidates : int
        Output width ``C ≥ max(num_candidates)``.
    out : Tensor, float32, shape (R, C), optional
        Written in full and returned instead of a new tensor.

    Returns
    -------
    Tensor, shape (R, C), float32
    """
    num_requests, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if num_heads % num_kv_heads or key_cache.shape[3] != head_dim:
        raise ValueError(f"query {tuple(query.shape)} does not match key_cache {tuple(key_cache.shape)}")
    if out is None:
        out = torch.empty(num_requests, max_candidates, dtype=torch.float32, device=query.device)
    elif out.shape != (num_requests, max_candidates) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be float32 ({num_requests}, {max_candidates}) with unit column stride")
    if num_requests == 0 or max_candidates == 0:
        return out
    _block_mass_kernel[(num_requests, max_candidates)](
        query,
        key_cache,
        block_tables,
        seq_lens,
        lse,
        candidate_start,
        num_candidates,
        out,
        scale,
        *query.stride(),
        *key_cache.stride(),
        *block_tables.stride(),
        *lse.stride(),
        out.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_T=triton.next_power_of_2(block_size),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
