"""Block-table compaction as one Triton launch, run before attention on every decode step.

Reference: :func:`asymvlm_vllm.core.block_table.compact_block_tables`, re-exported here as
``compact_block_tables_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from asymvlm_vllm.core.block_table import check_compaction_args
from asymvlm_vllm.core.block_table import compact_block_tables as compact_block_tables_reference

__all__ = ["compact_block_tables", "compact_block_tables_reference"]

MAX_CHUNK = 1024


@triton.jit
def _compact_block_tables_kernel(
    tables_ptr,
    lens_ptr,
    out_tables_ptr,
    out_lens_ptr,
    max_blocks,
    table_stride,
    out_table_stride,
    block_size,
    CHUNK: tl.constexpr,
):
    """One program per row r, with nb = ⌈seq_lens[r] / block_size⌉:

        out_block_tables[r, :live]  = the non-zero entries of block_tables[r, :nb], in order
        out_block_tables[r, live:]  = 0
        out_seq_lens[r]             = seq_lens[r] - block_size * (nb - live)

    Used before attention on each decode step, after BlockEviction has turned evicted blocks
    into holes (id 0). The row's first nb entries are read in chunks of CHUNK, in order, each
    chunk loaded before anything is stored: an entry only moves left, to at most its own column,
    so with the output aliasing the input every store lands on a column already read (and on GPU
    after it was read: a store's column comes from the prefix sum over the loads of every column
    it can land on). The zero tail is written after all chunks, once the live count is known.
    """
    row = tl.program_id(0).to(tl.int64)
    seq_len = tl.load(lens_ptr + row)
    # min() only keeps a broken precondition (length beyond the table) from reading out of bounds.
    num_blocks = tl.minimum(tl.cdiv(seq_len, block_size), max_blocks)
    src = tables_ptr + row * table_stride
    dst = out_tables_ptr + row * out_table_stride
    offs = tl.arange(0, CHUNK)

    num_live = tl.zeros((), dtype=tl.int32)
    for start in range(0, num_blocks, CHUNK):
        cols = start + offs
        entries = tl.load(src + cols, mask=cols < num_blocks, other=0)
        live = (entries != 0).to(tl.int32)
        tl.store(dst + num_live + tl.cumsum(live, 0) - 1, entries, mask=live != 0)
        num_live += tl.sum(live, 0)

    for start in range(num_live, max_blocks, CHUNK):
        cols = start + offs
        tl.store(dst + cols, tl.zeros_like(offs), mask=cols < max_blocks)
    tl.store(out_lens_ptr + row, seq_len - block_size * (num_blocks - num_live))


def compact_block_tables(
    block_tables: Tensor,
    seq_lens: Tensor,
    block_size: int,
    out_block_tables: Tensor | None = None,
    out_seq_lens: Tensor | None = None,
    *,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pack each row's live blocks to the front and drop the holes from its length.

    Same results as :func:`compact_block_tables_reference`, whose docstring defines them, for
    inputs meeting its preconditions, which are not checked here: lengths in
    ``[0, max_blocks * block_size]`` and no hole at index ``⌈seq_lens[r] / block_size⌉ - 1``.

    Parameters
    ----------
    block_tables : Tensor, shape (R, max_blocks), int32
        Physical block ids, 0 marking a hole; rows may be strided, columns contiguous.
    seq_lens : Tensor, shape (R,), int32
        Logical lengths, holes counted as if still there.
    block_size : int
        Tokens per KV block.
    out_block_tables : Tensor, shape (R, max_blocks), int32, optional
        Written and returned. Either ``block_tables`` itself (in-place compaction) or memory
        not overlapping it.
    out_seq_lens : Tensor, shape (R,), int32, optional
        Written and returned; may be ``seq_lens`` itself.
    chunk : int, optional
        Table entries a program handles per loop step, a power of two; by default the next
        power of two of ``max_blocks``, at most 1024.

    Returns
    -------
    out_block_tables : Tensor, shape (R, max_blocks), int32
    out_seq_lens : Tensor, shape (R,), int32

    Notes
    -----
    With both ``out_*`` given nothing is allocated and nothing synchronises with the device,
    so the call can be captured in a CUDA graph.
    """
    check_compaction_args(block_tables, seq_lens, block_size, out_block_tables, out_seq_lens)
    num_rows, max_blocks = block_tables.shape
    if out_block_tables is None:
        out_block_tables = torch.empty_like(block_tables)
    if out_seq_lens is None:
        out_seq_lens = torch.empty_like(seq_lens)
    if any(t.shape[1] > 1 and t.stride(1) != 1 for t in (block_tables, out_block_tables)):
        raise ValueError("block table columns must be contiguous (stride 1)")
    if not (seq_lens.is_contiguous() and out_seq_lens.is_contiguous()):
        raise ValueError("seq_lens and out_seq_lens must be contiguous")
    if chunk is None:
        chunk = min(triton.next_power_of_2(max(max_blocks, 16)), MAX_CHUNK)
    elif chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    if num_rows == 0:
        return out_block_tables, out_seq_lens
    _compact_block_tables_kernel[(num_rows,)](
        block_tables,
        seq_lens,
        out_block_tables,
        out_seq_lens,
        max_blocks,
        block_tables.stride(0),
        out_block_tables.stride(0),
        block_size,
        CHUNK=chunk,
        num_warps=max(1, min(4, chunk // 256)),
    )
    return out_block_tables, out_seq_lens
