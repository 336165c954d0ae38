"""Block-table compaction after KV-block eviction, in plain torch: the kernel's reference.

When a whole KV block of generated tokens is evicted, vLLM's KV manager replaces its entry in
the request's block table with the null block id 0, a "hole". The attention kernels read a
block table and a sequence length, so before attention each row's live blocks are packed to the
front and the length shortened by ``block_size`` per hole. Keys are stored after RoPE, so
packing them closer together does not change their positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_compaction_args", "compact_block_tables"]


def check_compaction_args(
    block_tables: Tensor,
    seq_lens: Tensor,
    block_size: int,
    out_block_tables: Tensor | None = None,
    out_seq_lens: Tensor | None = None,
) -> None:
    """Raise ValueError unless shapes, dtypes and devices fit :func:`compact_block_tables`.

    Looks at metadata only (never at values), so it never synchronises with the device.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if block_tables.ndim != 2 or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 of shape (R, max_blocks), got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if seq_lens.shape != block_tables.shape[:1] or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be int32 of shape ({block_tables.shape[0]},), got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    for name, out, like in (("out_block_tables", out_block_tables, block_tables), ("out_seq_lens", out_seq_lens, seq_lens)):
        if out is not None and (out.shape != like.shape or out.dtype != torch.int32):
            raise ValueError(f"{name} must be int32 of shape {tuple(like.shape)}, got {out.dtype} {tuple(out.shape)}")
    devices = {t.device for t in (block_tables, seq_lens, out_block_tables, out_seq_lens) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def compact_block_tables(
    block_tables: Tensor,
    seq_lens: Tensor,
    block_size: int,
    out_block_tables: Tensor | None = None,
    out_seq_lens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pack each row's live blocks to the front and drop the holes from its length.

    Row ``r`` has ``nb = ⌈seq_lens[r] / block_size⌉`` meaningful entries; the rest of the row is
    padding and is ignored. Meaningful entries equal to 0 are holes (evicted blocks).

    Parameters
    ----------
    block_tables : Tensor, shape (R, max_blocks), int32
        Physical block ids; 0 marks a hole.
    seq_lens : Tensor, shape (R,), int32
        Logical lengths: tokens in the cache counting the holes as if they were still there.
        ``0`` is an empty row.
    block_size : int
        Tokens per KV block, ``≥ 1``.
    out_block_tables : Tensor, shape (R, max_blocks), int32, optional
        Written in place and returned; may be ``block_tables`` itself.
    out_seq_lens : Tensor, shape (R,), int32, optional
        Written in place and returned; may be ``seq_lens`` itself.

    Returns
    -------
    out_block_tables : Tensor, shape (R, max_blocks), int32
        Row ``r``: its non-zero entries among the first ``nb``, in their original order, then 0.
    out_seq_lens : Tensor, shape (R,), int32
        ``seq_lens[r] - block_size * holes[r]``: a partial last block stays partial (block size
        16, length 70 in 5 blocks, 2 holes: 38).

    Raises
    ------
    ValueError
        On bad shapes or dtypes, a negative length, a length needing more than ``max_blocks``
        blocks, or a hole at index ``nb - 1`` (the block holding the newest token is never
        evicted; the kernel assumes this and does not check it).
    """
    check_compaction_args(block_tables, seq_lens, block_size, out_block_tables, out_seq_lens)
    num_rows, max_blocks = block_tables.shape
    lens = seq_lens.long()
    num_blocks = (lens + block_size - 1) // block_size
    if (lens < 0).any():
        raise ValueError(f"seq_lens must be >= 0, got rows {_rows(lens < 0)}")
    if (num_blocks > max_blocks).any():
        raise ValueError(f"rows {_rows(num_blocks > max_blocks)} need more than max_blocks={max_blocks} blocks")
    # Past the check above, max_blocks == 0 means every row is empty.
    last = block_tables.gather(1, (num_blocks - 1).clamp(min=0)[:, None]).squeeze(1) if max_blocks else num_blocks
    bad = (num_blocks > 0) & (last == 0)
    if bad.any():
        raise ValueError(f"rows {_rows(bad)}: the last meaningful entry (the newest token's block) is a hole")

    cols = torch.arange(max_blocks, device=block_tables.device)
    live = (cols < num_blocks[:, None]) & (block_tables != 0)
    num_live = live.sum(dim=1)
    # A stable sort on "is not live" brings the live entries to the front in their order.
    order = torch.sort((~live).to(torch.uint8), dim=1, stable=True).indices
    packed = torch.where(cols < num_live[:, None], block_tables.gather(1, order), 0).to(torch.int32)
    new_lens = (lens - block_size * (num_blocks - num_live)).to(torch.int32)

    if out_block_tables is None:
        out_block_tables = packed
    else:
        out_block_tables.copy_(packed)
    if out_seq_lens is None:
        out_seq_lens = new_lens
    else:
        out_seq_lens.copy_(new_lens)
    return out_block_tables, out_seq_lens


def _rows(mask: Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()
