"""Rewrite a prompt to its pruned form: the placeholder-level half of a pruning decision.

A serving engine holds a prompt as token ids plus, per image, a placeholder span
``(offset, length, is_embed)``: ``length`` positions starting at ``offset``, of which those
with ``is_embed`` take one row of the image's encoder output each (the others are text
structure inside the span, such as Gemma 3's begin/end-of-image tokens). Pruning an image
keeps some of its rows; this module removes the other rows' placeholder tokens and moves the
spans. Plain Python, no tensors: the engine's scheduler calls it for every decision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["PlaceholderSpan", "RewrittenPrompt", "pruned_identifier", "rewrite_prompt"]


@dataclass(frozen=True)
class PlaceholderSpan:
    """One image's placeholder positions in a prompt.

    Attributes
    ----------
    offset, length : int
        The span ``[offset, offset + length)``.
    is_embed : tuple of bool or None
        Per position, whether it takes an encoder-output row; ``None`` means all do.
    """

    offset: int
    length: int
    is_embed: tuple[bool, ...] | None = None

    @property
    def num_rows(self) -> int:
        """Encoder-output rows the span takes."""
        return self.length if self.is_embed is None else sum(self.is_embed)


@dataclass(frozen=True)
class RewrittenPrompt:
    """A pruned prompt.

    Attributes
    ----------
    prompt_token_ids : list of int, length T'
    spans : list of PlaceholderSpan
        The images' spans in the pruned prompt, same order.
    kept_positions : list of int, length T'
        For each pruned-prompt token, its position in the original prompt (strictly increasing).
    """

    prompt_token_ids: list[int]
    spans: list[PlaceholderSpan]
    kept_positions: list[int]

    @property
    def num_removed(self) -> int:
        return self.kept_positions[-1] + 1 - len(self.kept_positions) if self.kept_positions else 0


def rewrite_prompt(
    prompt_token_ids: Sequence[int],
    spans: Sequence[PlaceholderSpan],
    keep_rows: Mapping[int, Sequence[int]],
    drop_ranges: Sequence[tuple[int, int]] = (),
) -> RewrittenPrompt:
    """Remove the placeholders of the rows each image does not keep, and the ``drop_ranges``.

    Parameters
    ----------
    prompt_token_ids : sequence of int, length T
    spans : the images' spans, in prompt order; they may share structure positions
        (``is_embed`` false) but not image rows
    keep_rows : image index → kept encoder-output rows (ascending, unique, in
        ``[0, span.num_rows)``); images not in the mapping keep everything.
    drop_ranges : half-open text ranges ``(start, end)`` to remove as well (the multi-turn
        rule's dropped answers); they may not touch an image's span.

    Returns
    -------
    RewrittenPrompt
    """
    total = len(prompt_token_ids)
    drop = bytearray(total)
    last_row_of_previous = -1
    for index, span in enumerate(spans):
        if span.length < 0 or span.offset < 0 or span.offset + span.length > total:
            raise ValueError(f"placeholder span {index} ({span.offset}, {span.length}) leaves the prompt of {total} tokens")
        if span.is_embed is not None and len(span.is_embed) != span.length:
            raise ValueError(f"placeholder span {index}: is_embed has {len(span.is_embed)} entries for length {span.length}")
        rows = [span.offset + i for i in range(span.length) if span.is_embed is None or span.is_embed[i]]
        # Spans may share structure tokens (Gemma 3 merges the newlines between two adjacent
        # images into one token that vLLM puts in both spans); their image rows may not overlap.
        if rows and rows[0] <= last_row_of_previous:
            raise ValueError(f"placeholder span {index} ({span.offset}, {span.length}) overlaps the image rows of span {index - 1}")
        last_row_of_previous = rows[-1] if rows else last_row_of_previous
        if index not in keep_rows:
            continue
        rows = list(keep_rows[index])
        if any(b <= a for a, b in zip(rows, rows[1:])) or (rows and not 0 <= rows[0] <= rows[-1] < span.num_rows):
            raise ValueError(f"image {index}: kept rows must be ascending, unique and in [0, {span.num_rows}), got {rows[:8]}...")
        kept = set(rows)
        row = 0
        for i in range(span.length):
            if span.is_embed is None or span.is_embed[i]:
                if row not in kept:
                    drop[span.offset + i] = 1
                row += 1
    unknown = sorted(set(keep_rows) - set(range(len(spans))))
    if unknown:
        raise ValueError(f"keep_rows names images {unknown}, the prompt has {len(spans)}")
    for start, end in drop_ranges:
        if not 0 <= start < end <= total:
            raise ValueError(f"drop range [{start}, {end}) is empty or outside the prompt of {total} tokens")
        for index, span in enumerate(spans):
            if start < span.offset + span.length and span.offset < end:
                raise ValueError(f"drop range [{start}, {end}) overlaps image {index}'s span")
        drop[start:end] = b"\x01" * (end - start)

    kept_positions = [p for p in range(total) if not drop[p]]
    new_index = {}
    for new, old in enumerate(kept_positions):
        new_index[old] = new
    new_spans = []
    for span in spans:
        inside = [p for p in range(span.offset, span.offset + span.length) if not drop[p]]
        if not inside:
            raise ValueError("an image would lose every placeholder; keep at least one row")
        offset = new_index[inside[0]]
        is_embed = None if span.is_embed is None else tuple(span.is_embed[p - span.offset] for p in inside)
        new_spans.append(PlaceholderSpan(offset, len(inside), is_embed))
    return RewrittenPrompt([int(prompt_token_ids[p]) for p in kept_positions], new_spans, kept_positions)


def pruned_identifier(identifier: str, keep_rows: Sequence[int], num_rows: int) -> str:
    """The cache identifier of an image's pruned embeddings: the original identifier plus a
    digest of the kept rows, so equal keep sets share entries and different ones never do."""
    digest = hashlib.sha256(f"{num_rows}:{','.join(map(str, keep_rows))}".encode()).hexdigest()[:16]
    return f"{identifier}#asymvlm{len(keep_rows)}of{num_rows}-{digest}"
