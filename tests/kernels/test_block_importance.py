import math
from dataclasses import dataclass

import pytest
import torch

from asymvlm_vllm.core.block_importance import block_attention_mass_paged as reference
from asymvlm_vllm.core.block_importance import softmax_lse
from asymvlm_vllm.core.eviction import block_attention_mass
from asymvlm_vllm.kernels.block_importance import block_attention_mass_paged, block_attention_mass_paged_reference

DTYPES = [
    pytest.param((torch.float32, 1e-5), id="fp32"),
    pytest.param((torch.float16, 1e-5), id="fp16"),
    pytest.param((torch.bfloat16, 1e-5), id="bf16"),
]


@dataclass
class Batch:
    query: torch.Tensor
    key_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    lse: torch.Tensor
    scale: float
    candidate_start: torch.Tensor
    num_candidates: torch.Tensor
    max_candidates: int

    def args(self):
        return (
            self.query,
            self.key_cache,
            self.block_tables,
            self.seq_lens,
            self.lse,
            self.scale,
            self.candidate_start,
            self.num_candidates,
            self.max_candidates,
        )


def make_batch(seq_lens, candidates, heads, kv_heads, head_dim, block_size, *, dtype, device, max_candidates=None):
    """Requests with the given seq_lens and (start, count) candidate ranges, their blocks at
    shuffled physical ids; every key slot no live token owns holds NaN, so reading one shows."""
    gen = torch.Generator().manual_seed(0)
    blocks_per_request = [max(-(-n // block_size), s + c) for n, (s, c) in zip(seq_lens, candidates)]
    max_blocks = max(blocks_per_request) + 1
    num_blocks = sum(blocks_per_request) + 3
    ids = torch.randperm(num_blocks, generator=gen)
    key_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for r, n in enumerate(seq_lens):
        owned = ids[used : used + blocks_per_request[r]]
        used += blocks_per_request[r]
        block_tables[r, : owned.numel()] = owned.int()
        block_tables[r, owned.numel() :] = ids[-1]  # padding points at a NaN block
        for t in range(n):
            key_cache[owned[t // block_size], t % block_size] = torch.randn(kv_heads, head_dim, generator=gen)
    # Larger than unit queries make the attention peaky, so a wrong block stands out.
    query = 2 * torch.randn(len(seq_lens), heads, head_dim, generator=gen)
    query, key_cache = query.to(dtype).to(device), key_cache.to(dtype).to(device)
    block_tables = block_tables.to(device)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    starts, counts = zip(*candidates)
    return Batch(
        query=query,
        key_cache=key_cache,
        block_tables=block_tables,
        seq_lens=seq_lens,
        lse=softmax_lse(query, key_cache, block_tables, seq_lens, scale),
        scale=scale,
        candidate_start=torch.tensor(starts, dtype=torch.int32, device=device),
        num_candidates=torch.tensor(counts, dtype=torch.int32, device=device),
        max_candidates=max(counts) if max_candidates is None else max_candidates,
    )


# name -> (seq_lens, candidate (start, count) per request, heads, kv_heads, head_dim, block_size)
CASES = {
    "one-request-one-candidate": ([37], [(1, 1)], 4, 4, 32, 16),
    "one-request-partial-last": ([37], [(0, 3)], 4, 1, 32, 16),
    "gqa-d40-bs32-mixed": ([70, 5, 129, 64], [(0, 3), (0, 1), (2, 3), (1, 0)], 8, 2, 40, 32),
    "mha-d40-bs16-mixed": ([50, 16, 81, 33, 1], [(1, 3), (0, 1), (0, 0), (2, 1), (0, 1)], 4, 4, 40, 16),
    "gqa-bs16-ranges-differ": ([100, 47, 60], [(3, 4), (0, 2), (0, 0)], 8, 2, 64, 16),
    "blocks-past-seq-len": ([20, 40], [(1, 3), (0, 4)], 8, 2, 32, 16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_kernel_matches_reference(case, dtype_tol, device):
    (seq_lens, candidates, *_, block_size), (dtype, tol) = case, dtype_tol
    batch = make_batch(*case, dtype=dtype, device=device)
    expected = reference(*batch.args())
    out = torch.full((len(seq_lens), batch.max_candidates), float("nan"), device=device)
    got = block_attention_mass_paged(*batch.args(), out=out)
    assert got is out
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert (got >= 0).all()
    for r, (start, count) in enumerate(candidates):
        assert (got[r, count:] == 0).all()
        # Candidates holding live tokens carry mass, the rest none: a skipped block would read 0.
        live = torch.arange(start, start + count, device=device) * block_size < seq_lens[r]
        assert (got[r, :count][live] > 0).all() and (got[r, :count][~live] == 0).all()


def test_wider_output_than_any_range_is_zero_filled(device):
    batch = make_batch([40, 33], [(0, 2), (1, 1)], 4, 2, 16, 16, dtype=torch.float32, device=device, max_candidates=5)
    got = block_attention_mass_paged(*batch.args())
    torch.testing.assert_close(got, reference(*batch.args()), atol=1e-5, rtol=1e-5)
    assert got.shape == (2, 5) and (got[0, 2:] == 0).all() and (got[1, 1:] == 0).all()


@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_masses_of_all_blocks_sum_to_one(dtype_tol, device):
    dtype, tol = dtype_tol
    seq_lens, block_size = [1, 16, 17, 75], 16
    candidates = [(0, -(-n // block_size)) for n in seq_lens]
    batch = make_batch(seq_lens, candidates, 8, 2, 24, block_size, dtype=dtype, device=device)
    masses = block_attention_mass_paged(*batch.args())
    torch.testing.assert_close(masses.sum(dim=1), torch.ones(len(seq_lens), device=device), atol=10 * tol, rtol=0)


def test_reference_matches_dense_softmax():
    """The reference against attention probabilities from torch.softmax, no LSE involved."""
    block_size, heads, kv_heads, head_dim = 4, 4, 2, 8
    seq_lens = [10, 7]
    batch = make_batch(seq_lens, [(0, 3), (0, 2)], heads, kv_heads, head_dim, block_size, dtype=torch.float64, device="cpu")
    for r, n in enumerate(seq_lens):
        table = batch.block_tables[r, : math.ceil(n / block_size)].long()
        keys = batch.key_cache[table].reshape(-1, kv_heads, head_dim)[:n]
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        logits = batch.scale * torch.einsum("hd,thd->ht", batch.query[r], keys)
        torch.testing.assert_close(batch.lse[r], torch.logsumexp(logits, dim=1).float())
        dense = block_attention_mass(torch.softmax(logits, dim=1), block_size)
        torch.testing.assert_close(reference(*batch.args())[r, : dense.numel()], dense, atol=1e-6, rtol=1e-6)


def test_kernel_module_reexports_the_reference():
    assert block_attention_mass_paged_reference is reference


def _real_batch(kv_heads, device, num_requests=256, candidates=64, block_size=16, heads=32, head_dim=128):
    gen = torch.Generator(device=device).manual_seed(0)
    starts = torch.randint(0, 8, (num_requests,), generator=gen, device=device, dtype=torch.int32)
    counts = torch.full((num_requests,), candidates, dtype=torch.int32, device=device)
    counts[::7] = torch.randint(0, candidates, counts[::7].shape, generator=gen, device=device, dtype=torch.int32)
    # Live tokens end somewhere in the last candidate block or a few blocks past it.
    shrink = torch.randint(0, 2 * block_size, (num_requests,), generator=gen, device=device)
    grow = torch.randint(0, 4, (num_requests,), generator=gen, device=device) * block_size
    seq_lens = ((starts + candidates) * block_size - shrink + grow).int()
    max_blocks = 8 + candidates + 4
    num_blocks = num_requests * max_blocks
    block_tables = torch.randperm(num_blocks, generator=gen, device=device).view(num_requests, max_blocks).int()
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, device=device).bfloat16()
    query = torch.randn(num_requests, heads, head_dim, generator=gen, device=device).bfloat16()
    scale = head_dim**-0.5
    lse = softmax_lse(query, key_cache, block_tables, seq_lens, scale)
    return (query, key_cache, block_tables, seq_lens, lse, scale, starts, counts, candidates)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [32, 8])
def test_real_shape_on_gpu(kv_heads):
    args = _real_batch(kv_heads, "cuda")
    out = torch.full((256, 64), float("nan"), device="cuda")
    got = block_attention_mass_paged(*args, out=out)
    assert got is out
    torch.testing.assert_close(got, reference(*args), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_real_shape_is_cuda_graph_capturable():
    args = _real_batch(8, "cuda")
    out = torch.full((256, 64), float("nan"), device="cuda")
    block_attention_mass_paged(*args, out=out)  # compile outside the capture
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        block_attention_mass_paged(*args, out=out)
    graph.replay()
    torch.testing.assert_close(out, reference(*args), atol=1e-5, rtol=1e-4)
