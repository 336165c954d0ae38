"""Block-table compaction: the Triton kernel against the torch reference, and the reference
against a plain python loop."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymvlm_vllm.kernels.block_table import compact_block_tables, compact_block_tables_reference


def loop_oracle(tables, lens, block_size):
    """Row by row in python lists: live entries of the first ⌈len / block_size⌉, then zeros."""
    out_tables, out_lens = [], []
    for row, n in zip(tables, lens):
        nb = -(-n // block_size)
        live = [b for b in row[:nb] if b != 0]
        out_tables.append(live + [0] * (len(row) - len(live)))
        out_lens.append(n - block_size * (nb - len(live)))
    return out_tables, out_lens


def make_table(gen, max_blocks, block_size, lens, holes, garbage=False):
    """Rows of distinct non-zero block ids with holes among the first ⌈len / block_size⌉ entries.

    ``holes`` is "none", "all_but_last" or "random"; the last meaningful entry is never a hole.
    Padding beyond the meaningful entries is 0, or random non-zero ids with ``garbage``.
    """
    rows = []
    for n in lens:
        nb = -(-n // block_size)
        row = (torch.randperm(10 * max_blocks + 10, generator=gen)[:max_blocks] + 1).to(torch.int32)
        if holes == "all_but_last":
            row[: max(nb - 1, 0)] = 0
        elif holes == "random" and nb > 1:
            row[: nb - 1][torch.rand(nb - 1, generator=gen) < 0.5] = 0
        if not garbage:
            row[nb:] = 0
        rows.append(row)
    return torch.stack(rows), torch.tensor(lens, dtype=torch.int32)


def check_kernel(tables, lens, block_size, device, chunk=None):
    """Kernel on ``device`` (outputs pre-filled with -1) equals the reference equals the loop."""
    want_tables, want_lens = compact_block_tables_reference(tables, lens, block_size)
    oracle_tables, oracle_lens = loop_oracle(tables.tolist(), lens.tolist(), block_size)
    assert want_tables.tolist() == oracle_tables and want_lens.tolist() == oracle_lens
    out_tables = torch.full_like(tables, -1, device=device)
    out_lens = torch.full_like(lens, -1, device=device)
    compact_block_tables(tables.to(device), lens.to(device), block_size, out_tables, out_lens, chunk=chunk)
    assert torch.equal(out_tables.cpu(), want_tables)
    assert torch.equal(out_lens.cpu(), want_lens)


def lengths(kind, max_blocks, block_size):
    return {"empty": 0, "full": max_blocks * block_size, "partial": max_blocks * block_size - block_size // 2 - 1}[kind]


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("holes", ["none", "all_but_last", "random"])
@pytest.mark.parametrize("kind", ["empty", "full", "partial"])
@pytest.mark.parametrize("max_blocks", [1, 3, 7, 64, 130])
def test_single_row(device, max_blocks, kind, holes, chunk):
    gen = torch.Generator().manual_seed(max_blocks)
    block_size = 16 if max_blocks % 2 else 32
    tables, lens = make_table(gen, max_blocks, block_size, [lengths(kind, max_blocks, block_size)], holes)
    check_kernel(tables, lens, block_size, device, chunk)


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_batch_of_mixed_lengths_with_garbage_padding(device, block_size, chunk):
    gen = torch.Generator().manual_seed(block_size)
    max_blocks = 130
    lens = torch.randint(0, max_blocks * block_size + 1, (24,), generator=gen).tolist()
    lens[:4] = [0, 1, block_size, max_blocks * block_size]
    tables, lens = make_table(gen, max_blocks, block_size, lens, "random", garbage=True)
    check_kernel(tables, lens, block_size, device, chunk)


@pytest.mark.parametrize("chunk", [None, 16])
def test_in_place(device, chunk):
    gen = torch.Generator().manual_seed(1)
    tables, lens = make_table(gen, 130, 16, [2080, 1000, 0, 17, 2075], "random", garbage=True)
    want_tables, want_lens = compact_block_tables_reference(tables, lens, 16)
    tables, lens = tables.to(device), lens.to(device)
    out_tables, out_lens = compact_block_tables(tables, lens, 16, tables, lens, chunk=chunk)
    assert out_tables is tables and out_lens is lens
    assert torch.equal(tables.cpu(), want_tables) and torch.equal(lens.cpu(), want_lens)


def test_out_buffers_are_returned_and_nothing_else_is_written(device):
    gen = torch.Generator().manual_seed(2)
    tables, lens = make_table(gen, 7, 16, [100, 50], "random")
    tables, lens = tables.to(device), lens.to(device)
    before = tables.clone(), lens.clone()
    out_tables = torch.full((2, 7), -1, dtype=torch.int32, device=device)
    out_lens = torch.full((2,), -1, dtype=torch.int32, device=device)
    ptrs = out_tables.data_ptr(), out_lens.data_ptr()
    got_tables, got_lens = compact_block_tables(tables, lens, 16, out_tables, out_lens)
    assert got_tables is out_tables and got_lens is out_lens
    assert (got_tables.data_ptr(), got_lens.data_ptr()) == ptrs
    assert torch.equal(tables, before[0]) and torch.equal(lens, before[1])  # inputs untouched
    want_tables, want_lens = compact_block_tables_reference(*before, 16)
    assert torch.equal(got_tables, want_tables) and torch.equal(got_lens, want_lens)


def test_strided_rows(device):
    gen = torch.Generator().manual_seed(3)
    tables, lens = make_table(gen, 10, 16, [150, 40, 3], "random")
    wide = torch.zeros(3, 16, dtype=torch.int32, device=device)
    wide[:, :10] = tables.to(device)
    out = torch.full((3, 12), -1, dtype=torch.int32, device=device)
    compact_block_tables(wide[:, :10], lens.to(device), 16, out[:, :10], torch.empty_like(lens, device=device))
    assert torch.equal(out[:, :10].cpu(), compact_block_tables_reference(tables, lens, 16)[0])
    assert (out[:, 10:] == -1).all()  # nothing written past each row's max_blocks


def test_no_rows(device):
    tables = torch.empty(0, 5, dtype=torch.int32, device=device)
    out_tables, out_lens = compact_block_tables(tables, torch.empty(0, dtype=torch.int32, device=device), 16)
    assert out_tables.shape == (0, 5) and out_lens.shape == (0,)


@st.composite
def cases(draw):
    block_size = draw(st.sampled_from([1, 2, 16, 32]))
    max_blocks = draw(st.integers(1, 40))
    tables, lens = [], []
    for _ in range(draw(st.integers(1, 5))):
        nb = draw(st.integers(0, max_blocks))
        lens.append(0 if nb == 0 else (nb - 1) * block_size + draw(st.integers(1, block_size)))
        ids = st.integers(1, 2**31 - 1)
        meaningful = [draw(st.one_of(st.just(0), ids)) for _ in range(nb - 1)] + [draw(ids)] * (nb > 0)
        padding = [draw(st.one_of(st.just(0), ids)) for _ in range(max_blocks - nb)]
        tables.append(meaningful + padding)
    return tables, lens, block_size, draw(st.sampled_from([None, 16])), draw(st.booleans())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_property_against_python_loop(device, case):
    rows, row_lens, block_size, chunk, in_place = case
    want_tables, want_lens = loop_oracle(rows, row_lens, block_size)
    for compact, kwargs in ((compact_block_tables_reference, {}), (compact_block_tables, {"chunk": chunk})):
        tables = torch.tensor(rows, dtype=torch.int32, device=device)
        lens = torch.tensor(row_lens, dtype=torch.int32, device=device)
        outs = (tables, lens) if in_place else (torch.full_like(tables, -1), torch.full_like(lens, -1))
        compact(tables, lens, block_size, *outs, **kwargs)
        assert outs[0].tolist() == want_tables and outs[1].tolist() == want_lens


# The reference alone: the worked example and its preconditions.


def test_reference_worked_example():
    tables = torch.tensor([[11, 0, 12, 0, 13, 99, 98]], dtype=torch.int32)
    out_tables, out_lens = compact_block_tables_reference(tables, torch.tensor([70], dtype=torch.int32), 16)
    assert out_tables.tolist() == [[11, 12, 13, 0, 0, 0, 0]]
    assert out_lens.tolist() == [38]  # 5 blocks, the last holding 6 tokens; 2 holes


@pytest.mark.parametrize("length", [64, 70])
def test_reference_rejects_a_hole_in_the_newest_block(length):
    tables = torch.tensor([[1, 2, 3, 4, 0, 5], [1, 2, 3, 0, 0, 5]], dtype=torch.int32)
    lens = torch.tensor([16, length], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"rows \[1\].*last meaningful entry"):
        compact_block_tables_reference(tables, lens, 16)


@pytest.mark.parametrize(
    "tables, lens, block_size, match",
    [
        (torch.ones(2, 4, dtype=torch.int32), torch.tensor([1, 65], dtype=torch.int32), 16, "more than max_blocks"),
        (torch.ones(2, 4, dtype=torch.int32), torch.tensor([1, -1], dtype=torch.int32), 16, ">= 0"),
        (torch.ones(2, 4, dtype=torch.int64), torch.tensor([1, 1], dtype=torch.int32), 16, "block_tables must be int32"),
        (torch.ones(2, 4, dtype=torch.int32), torch.tensor([1], dtype=torch.int32), 16, "seq_lens must be int32"),
        (torch.ones(2, 4, dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32), 0, "block_size"),
    ],
)
def test_reference_rejects_bad_input(tables, lens, block_size, match):
    with pytest.raises(ValueError, match=match):
        compact_block_tables_reference(tables, lens, block_size)


@pytest.mark.gpu
def test_real_shape_in_a_cuda_graph():
    """256 requests × 512 blocks of 16, ~10% holes, compacted in place by a captured graph."""
    gen = torch.Generator().manual_seed(4)
    lens = torch.randint(0, 512 * 16 + 1, (256,), generator=gen).tolist()
    tables, lens = make_table(gen, 512, 16, lens, "none", garbage=True)
    holes = torch.rand(tables.shape, generator=gen) < 0.1
    holes[torch.arange(256), ((lens.long() + 15) // 16 - 1).clamp(min=0)] = False
    tables[holes] = 0
    want_tables, want_lens = compact_block_tables_reference(tables, lens, 16)

    static_tables, static_lens = tables.cuda(), lens.cuda()
    out_tables, out_lens = torch.empty_like(static_tables), torch.empty_like(static_lens)
    compact_block_tables(static_tables, static_lens, 16, out_tables, out_lens)  # compiles outside the capture
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compact_block_tables(static_tables, static_lens, 16, static_tables, static_lens)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert torch.equal(static_tables.cpu(), want_tables) and torch.equal(static_lens.cpu(), want_lens)

    static_tables.copy_(tables)  # a replay reads whatever the static inputs hold now
    static_lens.copy_(lens)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_tables.cpu(), want_tables) and torch.equal(static_lens.cpu(), want_lens)
