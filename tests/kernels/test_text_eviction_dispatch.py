"""What the model runner calls for text eviction (``asymvlm_vllm.engine.text_eviction``), on the
`device` parameter: the torch references on CPU, the Triton kernels (and the batched LSE) on
CUDA (``gpu``-marked), checked against float64 oracles written from the formulas.

* ``block_importance``: the attention mass the newest query gives each candidate block,
  ``mean_h Σ_{t in block} softmax_t(scale · q_h·k_t)`` over the request's live keys, read from
  a paged key cache in each attention backend's layout (``key_cache_blocks``).
* ``compact_for_attention``: live blocks packed to the front, lengths shortened by the holes,
  written into fixed output buffers (what CUDA-graph replay reads).
"""

import math

import numpy as np
import pytest
import torch

from asymvlm_vllm.engine.text_eviction import _softmax_lse_batched, block_importance, compact_for_attention, key_cache_blocks

DTYPES = [pytest.param(torch.float32, 2e-5, id="fp32"), pytest.param(torch.bfloat16, 2e-3, id="bf16")]


def _mass_oracle(query, keys, table, seq_len, scale, start, count):
    """float64 numpy: head-mean attention mass of blocks start .. start+count-1 of one request."""
    q = np.asarray(query.double().cpu())
    k_all = np.asarray(keys.double().cpu())
    heads, kv_heads = q.shape[0], k_all.shape[2]
    block_size = k_all.shape[1]
    rows = [k_all[int(b), t] for b in table[: math.ceil(seq_len / block_size)].tolist() for t in range(block_size)][:seq_len]
    k = np.stack(rows)  # (T, KVH, d)
    out = np.zeros(count)
    for h in range(heads):
        logits = scale * (k[:, h // (heads // kv_heads)] @ q[h])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for c in range(count):
            lo, hi = (start + c) * block_size, min((start + c + 1) * block_size, seq_len)
            out[c] += p[lo:hi].sum() / heads
    return out


@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
def test_block_importance_matches_the_oracle(device, dtype, atol, backend):
    torch.manual_seed(0)
    num_blocks, block_size, kv_heads, heads, head_size = 23, 16, 2, 6, 32
    # The backend's own layout; key_cache_blocks gives (blocks, block_size, kv_heads, d) views.
    if backend == "CPU_ATTN":
        cache = torch.randn(num_blocks, kv_heads, 2 * block_size, head_size, dtype=dtype, device=device)
        cache = cache.view(num_blocks, kv_heads, block_size, 2 * head_size)
    else:
        cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_size, dtype=dtype, device=device)
    keys = key_cache_blocks(cache, backend, head_size)
    assert keys.shape == (num_blocks, block_size, kv_heads, head_size)
    # Three due requests with odd lengths; the tables name live blocks in any physical order.
    lens = [70, 33, 129]
    tables = [[5, 9, 1, 17, 3], [22, 4, 8], [2, 7, 11, 13, 19, 6, 10, 12, 14]]
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    starts = torch.tensor([1, 0, 2], dtype=torch.int32, device=device)
    counts = torch.tensor([2, 2, 5], dtype=torch.int32, device=device)
    query = torch.randn(3, heads, head_size, dtype=dtype, device=device)
    scale = head_size ** -0.5
    mass = block_importance(query, keys, table, seq_lens, scale, starts, counts, 6)
    assert mass.shape == (3, 6) and mass.dtype == torch.float32 and mass.device.type == device.type
    for r in range(3):
        expected = _mass_oracle(query[r], keys, table[r], lens[r], scale, int(starts[r]), int(counts[r]))
        np.testing.assert_allclose(mass[r, : int(counts[r])].cpu().numpy(), expected, rtol=0, atol=atol)
        assert torch.all(mass[r, int(counts[r]):] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_lse_equals_the_reference(device, dtype):
    from asymvlm_vllm.core.block_importance import softmax_lse

    torch.manual_seed(1)
    keys = torch.randn(12, 16, 2, 32, dtype=dtype, device=device)
    table = torch.tensor([[3, 5, 7, 0], [1, 2, 4, 6]], dtype=torch.int32, device=device)
    lens = torch.tensor([40, 64], dtype=torch.int32, device=device)
    query = torch.randn(2, 4, 32, dtype=dtype, device=device)
    ours = _softmax_lse_batched(query, keys, table, lens, 0.2)
    torch.testing.assert_close(ours.cpu(), softmax_lse(query, keys, table, lens, 0.2).cpu(), rtol=0, atol=2e-4)


def test_compaction_writes_into_fixed_buffers(device):
    tables = torch.tensor([[4, 0, 0, 7, 9, 0], [1, 2, 3, 0, 0, 0], [5, 0, 6, 8, 11, 0], [0, 0, 0, 0, 0, 0]],
                          dtype=torch.int32, device=device)
    lens = torch.tensor([70, 40, 80, 0], dtype=torch.int32, device=device)
    out_tables = torch.full((8, 6), -1, dtype=torch.int32, device=device)
    out_lens = torch.full((8,), -1, dtype=torch.int32, device=device)
    got_tables, got_lens = compact_for_attention(tables, lens, 16, out_tables[:4], out_lens[:4])
    assert got_tables.data_ptr() == out_tables.data_ptr() and got_lens.data_ptr() == out_lens.data_ptr()
    # 5 blocks for 70 tokens, 2 holes: 38 (the last block stays partial); no holes; 1 hole; empty.
    assert got_tables[0].tolist() == [4, 7, 9, 0, 0, 0] and int(got_lens[0]) == 38
    assert got_tables[1].tolist() == [1, 2, 3, 0, 0, 0] and int(got_lens[1]) == 40
    assert got_tables[2].tolist() == [5, 6, 8, 11, 0, 0] and int(got_lens[2]) == 64
    assert int(got_lens[3]) == 0
    assert out_lens[4:].tolist() == [-1] * 4  # rows past the batch untouched
