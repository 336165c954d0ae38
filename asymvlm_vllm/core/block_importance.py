"""Per-block attention mass over vLLM's paged KV cache, in plain torch.

The oracle for the Triton kernel ``asymvlm_vllm.kernels.block_importance``. FlashAttention
returns no attention probabilities, only the softmax log-sum-exp (LSE) of each query head, so
the attention a decode step paid to a cached token is recomputed from that step's query, the
token's key and the LSE: ``p = exp(scale · q·k − lse)``. Summed over a block's live tokens and
averaged over query heads it is the block importance that
:meth:`asymvlm_vllm.core.eviction.BlockEviction.evict_generated_blocks` ranks (the paged twin of
:func:`asymvlm_vllm.core.eviction.block_attention_mass`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_attention_mass_paged", "softmax_lse"]


def _live_keys(key_cache: Tensor, table: Tensor, seq_len: int) -> Tensor:
    """The first ``seq_len`` keys of one request, (seq_len, KVH, d), gathered through ``table``."""
    block_size = key_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    keys = key_cache[table[:num_blocks].long()]
    return keys.reshape(num_blocks * block_size, *key_cache.shape[2:])[:seq_len]


def softmax_lse(query: Tensor, key_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float) -> Tensor:
    """Natural-log log-sum-exp of each query head's scaled logits over all of its request's keys,
    as FlashAttention's ``return_softmax_lse`` gives it.

    Parameters
    ----------
    query : Tensor, shape (R, H, d)
    key_cache : Tensor, shape (num_blocks, block_size, KVH, d), H a multiple of KVH
    block_tables : Tensor, int32, shape (R, max_blocks)
    seq_lens : Tensor, int32, shape (R,)
    scale : float

    Returns
    -------
    Tensor, shape (R, H), float32: ``log Σ_t exp(scale · q[r, h]·k[t, h // G])`` over the
    request's ``seq_lens[r]`` tokens (``-inf`` for a request with none).
    """
    num_heads, group = query.shape[1], query.shape[1] // key_cache.shape[2]
    lse = torch.empty(query.shape[0], num_heads, dtype=torch.float32, device=query.device)
    for r, seq_len in enumerate(seq_lens.tolist()):
        keys = _live_keys(key_cache, block_tables[r], seq_len).double().repeat_interleave(group, dim=1)
        logits = scale * torch.einsum("hd,thd->ht", query[r].double(), keys)
        lse[r] = torch.logsumexp(logits, dim=1).float()
    return lse


def block_attention_mass_paged(
    query: Tensor,
    key_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    lse: Tensor,
    scale: float,
    candidate_start: Tensor,
    num_candidates: Tensor,
    max_candidates: int,
    out: Tensor | None = None,
) -> Tensor:
    """Head-mean attention mass of each candidate KV block, recomputed from the LSE.

    ``block_mass[r, c] = mean_h Σ_t exp(scale · q[r, h]·k[t, h // G] − lse[r, h])`` over the
    tokens ``t`` of the block at table index ``candidate_start[r] + c`` whose logical position is
    below ``seq_lens[r]``; ``0`` for ``c ≥ num_candidates[r]``. Logits in float64.

    Parameters
    ----------
    query : Tensor, shape (R, H, d), fp16/bf16/fp32
        The current decode step's final-layer query of each request, unscaled.
    key_cache : Tensor, shape (num_blocks, block_size, KVH, d)
        vLLM's paged key cache; query head ``h`` reads kv head ``h // G``, ``G = H / KVH``.
    block_tables : Tensor, int32, shape (R, max_blocks)
    seq_lens : Tensor, int32, shape (R,)
        Live tokens of each request; the last block may be partial.
    lse : Tensor, float32, shape (R, H)
        Natural-log LSE of ``scale · q·k`` over all of the request's keys (:func:`softmax_lse`).
    scale : float
        Softmax scale, typically ``d ** -0.5``.
    candidate_start, num_candidates : Tensor, int32, shape (R,)
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
    num_requests, num_heads, _ = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_requests, max_candidates, dtype=torch.float32, device=query.device)
    out.zero_()
    for r in range(num_requests):
        start, count, seq_len = int(candidate_start[r]), int(num_candidates[r]), int(seq_lens[r])
        if count == 0:
            continue
        table_idx = torch.arange(start, start + count, device=key_cache.device)
        keys = key_cache[block_tables[r, table_idx].long()].double()  # (count, block_size, KVH, d)
        keys = keys.repeat_interleave(group, dim=2)
        logits = scale * torch.einsum("hd,cthd->hct", query[r].double(), keys)
        positions = table_idx[:, None] * block_size + torch.arange(block_size, device=key_cache.device)
        probs = torch.exp(logits - lse[r].double()[:, None, None])
        # where, not multiply: keys past seq_len are stale and may hold inf/NaN.
        probs = torch.where(positions < seq_len, probs, 0.0)
        out[r, :count] = probs.sum(dim=2).mean(dim=0).float()
    return out
