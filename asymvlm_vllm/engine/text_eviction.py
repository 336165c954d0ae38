"""Text eviction in the model runner: choose the generated KV blocks to drop, and keep attention
reading only live blocks.

The runner half of AsymVLM's text eviction (the scheduler half, which returns the blocks to
vLLM's pool, is in :mod:`asymvlm_vllm.engine.scheduler`).

**Due requests.** A request is due in a step when, after the step, its *live* generated tokens
(logical tokens minus the holes) exceed its budget. Only those requests cost anything.

**Importance.** While the model runs, the final full-attention layer's attention implementation
copies its queries into a fixed buffer (:class:`QueryCapture`). After the forward pass, for the
due requests only, the newest token's query scores every candidate block of the request's
compacted key cache: ``mass[c] = mean_h Σ_t exp(scale · q_h·k_t − lse_h)`` (the attention that
query pays the block, averaged over heads), with the Triton kernel
``block_attention_mass_paged`` in one launch for all due requests on CUDA and its torch reference
on CPU. Under tensor parallelism each rank holds a slice of the heads: the per-rank head means
are all-reduced (summed, divided by the ranks) before choosing, so every rank evicts the same
blocks. :class:`~asymvlm_vllm.core.eviction.BlockEviction` then picks the blocks, exactly as the
transformers path does over the same live layout.

**Holes.** The runner zeroes a chosen block's entry (vLLM's null block id 0) in the request's
block ids and in the persistent block table at once, so the next step already attends without
it, and reports the blocks on the step's ``ModelRunnerOutput``; the scheduler then frees them.
Slot mappings keep reading the persistent table with logical block indices, so new tokens are
written where vLLM expects them.

**Compaction before attention.** For each full-attention KV-cache group, the attention metadata
builder gets a block table whose rows have their live blocks packed to the front, and
``seq_lens`` shortened by ``block_size`` per hole (Triton ``compact_block_tables`` on CUDA, its
torch reference on CPU). Keys are cached after RoPE and positions stay logical, so compaction
moves no position (M-RoPE included). Sliding-window groups are not compacted: nothing is evicted
from them, their window stays the model's.

**CUDA graphs.** With piecewise graphs attention runs outside the graph, so everything above
runs eagerly each step. With full graphs the graph replays what was captured, so nothing may
depend on a Python branch at replay: on CUDA the compacted tables and lengths are written
in place, every step, into buffers allocated once (the graph captured their addresses), and the
query capture copies the layer's queries into its fixed buffer at capture time, so each replay
refreshes it. The only host synchronisation is reading the chosen blocks back, in steps where a
request is due (about once per ``block_size`` steps per request past its budget).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.block_importance import block_attention_mass_paged, softmax_lse
from ..core.block_table import compact_block_tables
from ..core.eviction import BlockEviction

__all__ = ["DueRequest", "QueryCapture", "TextEvictionRunnerMixin", "block_importance", "compact_for_attention",
           "key_cache_blocks"]

logger = logging.getLogger("vllm.asymvlm")

_SUPPORTED_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "CPU_ATTN")


def evictable_kind(spec: Any) -> str | None:
    """``"full"`` or ``"sliding"`` for the KV-cache specs text eviction works on, else None.

    Exact types: subclasses (MLA, sinks, R-SWA, ...) lay out or free their blocks differently."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    if type(spec) is FullAttentionSpec and getattr(spec, "sliding_window", None) is None:
        return "full"
    if type(spec) is SlidingWindowSpec or type(spec) is FullAttentionSpec:
        return "sliding"
    return None


def key_cache_blocks(kv_cache: torch.Tensor, backend: str, head_size: int) -> torch.Tensor:
    """The key half of one layer's paged KV cache as (num_blocks, block_size, kv_heads, head_size).

    Parameters
    ----------
    kv_cache : Tensor
        The layer's cache as its attention backend holds it: ``(B, KVH, N, 2·d)`` for
        FLASH_ATTN / TRITON_ATTN, ``(B, KVH, N, 2·d)`` with the keys in the first ``N`` rows of
        its ``(B, KVH, 2N, d)`` view for CPU_ATTN.
    """
    if backend == "CPU_ATTN":
        blocks, heads, block_size, _ = kv_cache.shape
        return kv_cache.view(blocks, heads, 2 * block_size, -1)[:, :, :block_size].permute(0, 2, 1, 3)
    if backend in ("FLASH_ATTN", "TRITON_ATTN"):
        return kv_cache.transpose(1, 2)[..., :head_size]
    raise ValueError(f"text eviction supports the {', '.join(_SUPPORTED_BACKENDS)} attention backends, not {backend}")


def compact_for_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                          out_block_tables: torch.Tensor | None = None,
                          out_seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's live blocks packed to the front, its length shortened by the holes.

    The Triton kernel on CUDA, the torch reference elsewhere; see
    :func:`asymvlm_vllm.core.block_table.compact_block_tables` for shapes.
    """
    if block_tables.is_cuda:
        from ..kernels.block_table import compact_block_tables as kernel

        return kernel(block_tables, seq_lens, block_size, out_block_tables, out_seq_lens)
    return compact_block_tables(block_tables, seq_lens, block_size, out_block_tables, out_seq_lens)


def _softmax_lse_batched(query: torch.Tensor, key_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """(R, H) natural-log LSE of each due query head over its live keys, in one batched pass (CUDA)."""
    max_blocks = tables.shape[1]
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    keys = key_cache[tables.long()].flatten(1, 2)  # (R, max_blocks·bs, KVH, d)
    group = query.shape[1] // kv_heads
    q = query.float().unflatten(1, (kv_heads, group))  # (R, KVH, G, d)
    logits = torch.einsum("rkgd,rtkd->rkgt", q, keys.float()).flatten(1, 2) * scale  # (R, H, T)
    valid = torch.arange(max_blocks * block_size, device=query.device)[None, :] < lens[:, None]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.logsumexp(logits, dim=-1)


def block_importance(query: torch.Tensor, key_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                     scale: float, candidate_start: torch.Tensor, num_candidates: torch.Tensor,
                     max_candidates: int) -> torch.Tensor:
    """Head-mean attention mass of each candidate block of each due request.

    Parameters
    ----------
    query : Tensor, shape (R, H, d)
        The newest token's final-layer query of each due request.
    key_cache : Tensor, shape (num_blocks, block_size, KVH, d)
    tables : Tensor, int32, shape (R, max_blocks)
        Compacted block tables (live blocks only).
    lens : Tensor, int32, shape (R,)
        Live tokens.
    candidate_start, num_candidates : Tensor, int32, shape (R,)
        Candidate blocks are the compacted indices ``[start, start + num)``.

    Returns
    -------
    Tensor, shape (R, max_candidates), float32
    """
    if query.is_cuda:
        from ..kernels.block_importance import block_attention_mass_paged as kernel

        lse = _softmax_lse_batched(query, key_cache, tables, lens, scale)
        return kernel(query, key_cache, tables, lens, lse, scale, candidate_start, num_candidates, max_candidates)
    lse = softmax_lse(query, key_cache, tables, lens, scale)
    return block_attention_mass_paged(query, key_cache, tables, lens, lse, scale, candidate_start, num_candidates,
                                      max_candidates)


class QueryCapture:
    """Wraps one attention layer's ``impl.forward`` to keep its queries for the step.

    Eager and piecewise-graph steps copy only when asked (a request is due); under CUDA-graph
    capture it always copies, so that full-graph replays refresh the buffer too.
    """

    def __init__(self, layer: Any, buffer: torch.Tensor):
        self.layer = layer
        self.wanted = False
        self.buffer = buffer
        """(max tokens, heads, head size), allocated before any graph is captured."""
        self.kv_cache: torch.Tensor | None = None
        original = layer.impl.forward

        def forward(layer_, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
            if (self.wanted or capturing) and attn_metadata is not None:
                query_rows = query.reshape(query.shape[0], *self.buffer.shape[1:])
                if query_rows.dtype != self.buffer.dtype and not capturing:
                    self.buffer = torch.empty(self.buffer.shape, dtype=query.dtype, device=self.buffer.device)
                n = min(query.shape[0], self.buffer.shape[0])
                self.buffer[:n].copy_(query_rows[:n])
                self.kv_cache = kv_cache
            return original(layer_, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

        layer.impl.forward = forward


@dataclass
class RequestEviction:
    """The runner's record of one request whose generated tokens may be evicted."""

    policy: BlockEviction
    num_prompt_tokens: int


@dataclass
class DueRequest:
    request_id: str
    row: int
    """Row of the request in the persistent batch."""
    query_row: int
    """Index of its newest scheduled token among the step's tokens."""
    num_tokens: int
    """Logical tokens in its cache after the step."""


@dataclass
class EvictionChoice:
    """What the runner evicted for one request in one step (``ModelRunnerOutput.asymvlm_evictions``)."""

    block_indices: list[int]
    """Logical indices into the request's block list (same in every full-attention group)."""
    block_ids: list[int]
    """Physical ids in KV-cache group ``group``, for the scheduler's check."""
    group: int
    num_live_tokens: int
    """Live tokens before this eviction."""
    importance: list[float] = field(default_factory=list)
    """Head-mean attention mass of each live block before the eviction (0 for non-candidates)."""
    seconds: float = 0.0
    """This request's share of the step's time choosing (importance and choice), in seconds."""


class TextEvictionRunnerMixin:
    """Text eviction for :class:`~asymvlm_vllm.engine.runner.AsymVLMRunnerMixin`."""

    def _text_init(self) -> None:
        self._text_requests: dict[str, RequestEviction] = {}
        self._text_due: list[DueRequest] = []
        self._text_hole_rows: list[int] = []
        self._text_choices: dict[str, EvictionChoice] = {}
        self._text_capture: QueryCapture | None = None
        self._text_groups: list[int] = []
        self._text_query_group = 0
        self._text_block_size = 0
        self._text_backend = ""
        self._text_disabled: str | None = None
        self._text_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------ set-up
    def _text_setup(self) -> None:
        """After the KV cache exists: find the final full-attention layer and the groups to evict from."""
        groups = self.kv_cache_config.kv_cache_groups
        kinds = [evictable_kind(group.kv_cache_spec) for group in groups]
        layers = self.compilation_config.static_forward_context
        candidates = []
        for g, kind in enumerate(kinds):
            for name in groups[g].layer_names if kind == "full" else ():
                layer = layers.get(name)
                if layer is None or getattr(layer, "sliding_window", None) is not None or not hasattr(layer, "impl"):
                    continue
                match = re.findall(r"\.(\d+)\.", name)
                candidates.append((int(match[-1]) if match else -1, g, name, layer))
        reason = None
        if not candidates:
            reason = "the model has no full-attention layer with a paged KV cache"
        elif None in kinds:
            reason = "the model has KV-cache groups other than full and sliding-window attention"
        elif self.speculative_config is not None:
            reason = "speculative decoding is on"
        elif self.cache_config.cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
            reason = f"the KV cache is quantized ({self.cache_config.cache_dtype})"
        elif len({group.kv_cache_spec.block_size for group in groups}) > 1:
            reason = "its KV-cache groups have different block sizes"
        if reason is None:
            _, query_group, name, layer = max(candidates, key=lambda c: c[0])
            backend = layer.get_attn_backend().get_name()
            if backend not in _SUPPORTED_BACKENDS:
                reason = f"attention backend {backend} is not one of {', '.join(_SUPPORTED_BACKENDS)}"
        if reason is not None:
            self._text_disabled = reason
            logger.info("AsymVLM: text eviction is unavailable on this engine: %s", reason)
            return
        self._text_backend = backend
        self._text_groups = list(range(len(groups)))
        self._text_query_group = query_group
        self._text_block_size = groups[query_group].kv_cache_spec.block_size
        impl = layer.impl
        buffer = torch.empty((self.max_num_tokens, impl.num_heads, impl.head_size), dtype=self.model_config.dtype,
                             device=self.device)
        self._text_capture = QueryCapture(layer, buffer)
        for g in self._text_groups:
            for attn_group in self.attn_groups[g]:
                self._wrap_attention_group(attn_group)
        logger.debug("AsymVLM: text eviction reads layer %s (%s)", name, backend)

    def _wrap_attention_group(self, attn_group: Any) -> None:
        original = attn_group._with_kernel_block_table
        for builder in attn_group.metadata_builders:
            # Its shortcut reuses another group's metadata with only the block table swapped,
            # which would keep that group's (possibly uncompacted) lengths.
            builder.supports_update_block_table = False

        def with_live_blocks(common_attn_metadata, ubatch_idx: int = 0):
            return original(self._compacted(common_attn_metadata, attn_group.kv_cache_group_id), ubatch_idx)

        attn_group._with_kernel_block_table = with_live_blocks

    def _compacted(self, cm: Any, group: int) -> Any:
        from dataclasses import replace

        if cm.block_table_tensor.is_cuda:
            # Fixed buffers every step, so that a captured full graph reads what this step wrote.
            rows, width = cm.block_table_tensor.shape
            tables, lens = self._text_buffers.get(group, (None, None))
            if tables is None or tables.shape[0] < rows or tables.shape[1] < width:
                tables = torch.zeros((max(rows, self.max_num_reqs), width), dtype=torch.int32,
                                     device=cm.block_table_tensor.device)
                lens = torch.zeros(tables.shape[0], dtype=torch.int32, device=tables.device)
                self._text_buffers[group] = (tables, lens)
            out_tables, out_lens = compact_for_attention(cm.block_table_tensor, cm.seq_lens, self._text_block_size,
                                                         tables[:rows, :width], lens[:rows])
            return replace(cm, block_table_tensor=out_tables, seq_lens=out_lens)
        rows = [r for r in self._text_hole_rows if r < cm.block_table_tensor.shape[0]]
        if not rows:
            return cm
        # Only the rows with holes change: compact those (the torch reference) into copies.
        index = torch.tensor(rows, dtype=torch.long)
        tables, lens = cm.block_table_tensor.clone(), cm.seq_lens.clone()
        packed, packed_lens = compact_for_attention(tables[index], lens[index], self._text_block_size)
        tables[index], lens[index] = packed, packed_lens
        return replace(cm, block_table_tensor=tables, seq_lens=lens)

    # ------------------------------------------------------------ per step
    def _text_update_states(self, scheduler_output: Any, policies: dict[str, BlockEviction]) -> None:
        """After vLLM's ``_update_states``: track new requests, forget finished ones."""
        for req_id in scheduler_output.finished_req_ids:
            self._text_requests.pop(req_id, None)
        if self._text_disabled is not None or self._text_capture is None:
            return
        for new in scheduler_output.scheduled_new_reqs:
            policy = policies.get(new.req_id)
            if policy is None:
                self._text_requests.pop(new.req_id, None)
            else:
                self._text_requests[new.req_id] = RequestEviction(policy, len(self.requests[new.req_id].prompt_token_ids))

    def _text_find_due(self, scheduler_output: Any) -> None:
        """After ``_prepare_inputs``: which requests are due, and where their newest query sits."""
        self._text_due = []
        self._text_hole_rows = []
        if not self._text_requests or self._text_capture is None:
            self._text_capture is not None and setattr(self._text_capture, "wanted", False)
            return
        bs = self._text_block_size
        g = self._text_query_group
        starts = self.query_start_loc.np
        for row, req_id in enumerate(self.input_batch.req_ids):
            record = self._text_requests.get(req_id)
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if record is None or not scheduled:
                continue
            state = self.requests[req_id]
            num_tokens = state.num_computed_tokens + scheduled
            holes = state.block_ids[g][: math.ceil(num_tokens / bs)].count(0)
            if holes:
                self._text_hole_rows.append(row)
            if record.policy.due(record.num_prompt_tokens, num_tokens - holes * bs):
                self._text_due.append(DueRequest(req_id, row, int(starts[row + 1]) - 1, num_tokens))
        self._text_capture.wanted = bool(self._text_due)

    def _text_evict(self) -> None:
        """After the forward pass: choose and apply this step's evictions."""
        due, self._text_due = self._text_due, []
        capture = self._text_capture
        if not due or capture is None or capture.buffer is None or capture.kv_cache is None:
            return
        started = time.perf_counter()
        capture.wanted = False
        bs = self._text_block_size
        g = self._text_query_group
        device = capture.buffer.device
        rows, tables, lens, starts, counts, lives = [], [], [], [], [], []
        for item in due:
            record = self._text_requests[item.request_id]
            ids = self.requests[item.request_id].block_ids[g][: math.ceil(item.num_tokens / bs)]
            live = [i for i, block in enumerate(ids) if block != 0]
            lives.append(live)
            tables.append([ids[i] for i in live])
            lens.append(item.num_tokens - bs * (len(ids) - len(live)))
            first = math.ceil(record.num_prompt_tokens / bs)
            starts.append(first)
            counts.append(max(0, len(live) - 1 - record.policy.protected_recent_blocks - first))
            rows.append(item.query_row)
        width = max(len(t) for t in tables)
        table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).to(device)
        lens_tensor = torch.tensor(lens, dtype=torch.int32).to(device)
        start_tensor = torch.tensor(starts, dtype=torch.int32).to(device)
        count_tensor = torch.tensor(counts, dtype=torch.int32).to(device)
        query = capture.buffer.index_select(0, torch.tensor(rows, dtype=torch.long).to(device))
        impl = capture.layer.impl
        query = query.reshape(len(due), impl.num_heads, impl.head_size)
        keys = key_cache_blocks(capture.kv_cache, self._text_backend, impl.head_size)
        mass = block_importance(query, keys, table_tensor, lens_tensor, float(impl.scale), start_tensor, count_tensor,
                                max(1, max(counts)))
        tp = self.parallel_config.tensor_parallel_size
        if tp > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            mass = tensor_model_parallel_all_reduce(mass) / tp
        mass = mass.float().cpu()
        seconds = (time.perf_counter() - started) / len(due)  # each due request's share of the step's cost
        for r, item in enumerate(due):
            record = self._text_requests[item.request_id]
            importance = torch.zeros(len(lives[r]), dtype=torch.float32)
            importance[starts[r]: starts[r] + counts[r]] = mass[r, : counts[r]]
            chosen = record.policy.evict_generated_blocks(importance, record.num_prompt_tokens, lens[r]).tolist()
            if not chosen:
                continue
            logical = [lives[r][i] for i in chosen]
            state = self.requests[item.request_id]
            physical = [state.block_ids[g][i] for i in logical]
            for group in self._text_groups:
                table = self.input_batch.block_table[group].block_table.np
                for i in logical:
                    state.block_ids[group][i] = 0
                    table[item.row, i] = 0
            self._text_choices[item.request_id] = EvictionChoice(logical, physical, g, lens[r], importance.tolist(),
                                                                  seconds)
            logger.debug("AsymVLM: request %s: evicted blocks %s (%d live tokens before)", item.request_id, logical,
                         lens[r])
