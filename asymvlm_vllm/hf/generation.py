"""Greedy generation from a pruned prompt, with optional text eviction.

The loop is explicit (not ``model.generate``) because positions must follow the pruned-prompt
convention and, under eviction, count tokens produced rather than cache entries; and because
``generate`` refuses ``inputs_embeds`` for some families.

Eviction works on one :class:`EvictingCache` shared by the batch. After each decode step the
final layer's attention of the step's query (from :class:`~.attention.AttentionTap`) is handed,
per sample and restricted to its live entries, to the core policy; the survivors of every
sample are then packed to the right again (left padding), and the 2-D attention mask shrinks
with them. transformers derives the mask sizes from the cache length and the RoPE angles from
the explicit ``position_ids``, so a compacted cache needs nothing else.

Sliding-window layers (Gemma 3) are stored as full layers in :class:`EvictingCache` and the
window is applied by the mask, over cache slots: a sliding layer attends to the newest
``sliding_window`` *live* entries. Without eviction this is exactly the model's window; under
eviction, evicted tokens no longer take room in the window, so it reaches back over more
positions than ``sliding_window``. (Plain generation, ``eviction=None``, uses transformers'
own sliding layers.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import Cache, DynamicCache

from ..core.eviction import EvictionPolicy, H2OEviction, accumulate_attention, head_mean_attention, keep_mask
from .attention import AttentionTap
from .pruning import PrunedPrompt

__all__ = ["EvictingCache", "EvictionStep", "Generation", "GenerationTrace", "generate_from_prompt"]


class EvictingCache(DynamicCache):
    """A dynamic cache whose entries can be removed per sample.

    Every layer is a full (non-sliding) layer so that all layers hold the same entries and one
    gather removes a token everywhere; sliding-window layers are enforced by the mask (see the
    module docstring for what the window means under eviction). After an eviction the rows
    are re-packed to the left-padded layout the attention mask describes.
    """

    def keep_entries(self, index: Tensor) -> None:
        """Keep, in every layer, the entries ``index`` of each sample, in that order.

        Parameters
        ----------
        index : Tensor, shape (B, T_new), int64
            Row ``b`` lists the cache slots of sample ``b`` that survive (padding rows may
            repeat any slot; the attention mask hides them).
        """
        for layer in self.layers:
            if not layer.is_initialized or layer.keys.numel() == 0:
                continue
            idx = index[:, None, :, None].to(layer.keys.device)
            layer.keys = torch.gather(layer.keys, 2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = torch.gather(layer.values, 2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))


@dataclass(frozen=True)
class EvictionStep:
    """What the policy saw and did for one sample at one decode step (``trace=True``).

    Attributes
    ----------
    step : int
        Decode step: the step that fed the sample's generated token ``step`` (0-based).
    sample : int
    stream_ids : Tensor, shape (T,), int64
        The live entries before the eviction, in cache order, by stream id: the pruned
        prompt's tokens are ``0 … P−1`` (``P = prompt.lm_lengths[sample]``), generated token
        ``i`` is ``P + i``.
    attention : Tensor, shape (heads, T), float32
        The final layer's attention of this step's query over those entries.
    importance : Tensor, shape (T,), float32
        What the policy ranked: the head mean of ``attention`` (H2O: accumulated over steps).
    num_prompt_tokens : int
        How many of the entries are prompt tokens (what the policy was told).
    evicted : Tensor, shape (E,), int64
        Live positions (indices into ``stream_ids``) the policy evicted.
    """

    step: int
    sample: int
    stream_ids: Tensor
    attention: Tensor
    importance: Tensor
    num_prompt_tokens: int
    evicted: Tensor


@dataclass
class GenerationTrace:
    """Per-step eviction record and the final cache, for tests and analysis (memory-heavy).

    Attributes
    ----------
    steps : list of EvictionStep
        One per sample and decode step while the sample was unfinished.
    stream_ids : list of Tensor, shape (T_live_b,)
        Per sample, the stream ids of its live entries at the end, in cache order.
    cache : Cache
        The final cache; sample ``b``'s live entries are its last ``T_live_b`` slots.
    attention_mask : Tensor, shape (B, K)
        The final 2-D attention mask over the cache slots.
    """

    steps: list[EvictionStep]
    stream_ids: list[Tensor]
    cache: Cache
    attention_mask: Tensor


@dataclass
class Generation:
    """Output of :func:`generate_from_prompt`.

    Attributes
    ----------
    tokens : list of list of int
        Generated ids per sample, up to and including its end-of-sequence token.
    prompt : PrunedPrompt
    live_tokens : list of int
        KV entries per sample at the end (prompt + generated tokens fed back − evicted; the
        last generated token is never fed back, nor anything after end-of-sequence).
    evicted_tokens : list of int
        Entries evicted per sample.
    trace : GenerationTrace or None
        With ``trace=True``.
    """

    tokens: list[list[int]]
    prompt: PrunedPrompt
    live_tokens: list[int] = field(default_factory=list)
    evicted_tokens: list[int] = field(default_factory=list)
    trace: GenerationTrace | None = None


def _step_positions(next_positions: Tensor, mrope: bool) -> Tensor:
    pos = next_positions[:, None]
    return pos[None].expand(3, -1, -1) if mrope else pos


@dataclass
class _SampleState:
    """Eviction bookkeeping of one sample, aligned with its live cache entries."""

    prompt_tokens: int  # live entries that are prompt tokens (H2O and StreamingLLM evict some)
    stream_ids: Tensor  # (T_live,)
    accumulated: Tensor | None = None  # H2O's running score (T_live,)
    evicted: int = 0


def _evict(cache: EvictingCache, mask: Tensor, attention: Tensor, policy: EvictionPolicy, states: list[_SampleState],
           active: list[bool], step: int, trace: list[EvictionStep] | None) -> Tensor:
    """Apply ``policy`` to every active sample; repack the cache and return the new attention mask.

    ``mask`` (B, K) marks each sample's live slots; ``attention`` (B, heads, K) is this step's
    final-layer attention. Inactive (finished) samples only lose their masked slots.
    """
    batch = mask.shape[0]
    keeps = []
    changed = False
    for b, state in enumerate(states):
        live = mask[b].bool().nonzero().flatten()
        if not active[b]:
            keeps.append(live)
            continue
        att = attention[b][:, live].float()  # (heads, T_live)
        if isinstance(policy, H2OEviction):
            state.accumulated = accumulate_attention(state.accumulated, att)
            importance = state.accumulated
        else:
            importance = head_mean_attention(att)
        dropped = policy.evict(importance, state.prompt_tokens)
        if trace is not None:
            trace.append(EvictionStep(step, b, state.stream_ids.clone(), att.clone(), importance.clone(),
                                      state.prompt_tokens, dropped.clone()))
        if dropped.numel():
            keep = keep_mask(live.shape[0], dropped.to(live.device))
            if state.accumulated is not None:
                state.accumulated = state.accumulated[keep.to(state.accumulated.device)]
            state.stream_ids = state.stream_ids[keep.to(state.stream_ids.device)]
            state.evicted += int(dropped.numel())
            state.prompt_tokens -= int((dropped < state.prompt_tokens).sum())
            live = live[keep]
            changed = True
        keeps.append(live)
    width = max(k.shape[0] for k in keeps)
    if not changed and width == mask.shape[1]:
        return mask  # nothing to compact: every sample's slots are already right-packed
    index = torch.zeros(batch, width, dtype=torch.long, device=mask.device)
    new_mask = torch.zeros(batch, width, dtype=mask.dtype, device=mask.device)
    for b, live in enumerate(keeps):
        index[b, width - live.shape[0]:] = live
        new_mask[b, width - live.shape[0]:] = 1
    cache.keep_entries(index)
    return new_mask


@torch.inference_mode()
def generate_from_prompt(
    model,
    prompt: PrunedPrompt,
    max_new_tokens: int,
    eos_token_ids: set[int] | frozenset[int],
    pad_token_id: int = 0,
    eviction: EvictionPolicy | None = None,
    tap: AttentionTap | None = None,
    mrope: bool = False,
    trace: bool = False,
) -> Generation:
    """Greedy decoding from ``prompt``.

    Parameters
    ----------
    model : a supported ``*ForConditionalGeneration``
    prompt : PrunedPrompt
        Batch of B left-padded pruned prompts.
    max_new_tokens : int
    eos_token_ids : set of int
        A sample stops after emitting one of them.
    pad_token_id : int
        Fed for finished samples (their new slots are masked out).
    eviction : EvictionPolicy, optional
        Applied to every unfinished sample after each decode step, on the final layer's
        attention of that step's query over the sample's live entries (H2O: accumulated over
        steps). Positions keep counting generated tokens: generated token ``i`` sits at
        ``prompt.next_positions + i`` whatever was evicted. ``None`` is plain generation.
    tap : AttentionTap
        Required with ``eviction``.
    mrope : bool
        Positions are (3, B, 1) M-RoPE positions (Qwen2.5-VL).
    trace : bool
        Record every eviction step and keep the final cache (:class:`GenerationTrace`).

    Returns
    -------
    Generation
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eviction is not None and tap is None:
        raise ValueError("eviction needs an AttentionTap on the model")
    batch = prompt.inputs_embeds.shape[0]
    cache = EvictingCache() if eviction is not None else DynamicCache(config=model.config)
    out = model(**prompt.model_inputs(), past_key_values=cache, use_cache=True, logits_to_keep=1)
    mask = prompt.attention_mask
    positions = prompt.next_positions.clone()
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=mask.device)
    prompt_lengths = prompt.lm_lengths
    states = [_SampleState(n, torch.arange(n)) for n in prompt_lengths]
    steps: list[EvictionStep] | None = [] if trace else None
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, pad_token_id)
        for b in range(batch):
            if not done[b]:
                tokens[b].append(int(nxt[b]))
        done |= torch.tensor([int(t) in eos_token_ids for t in nxt.tolist()], device=done.device)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # Finished samples feed padding into masked slots: nothing of theirs is attended,
        # evicted or counted any more; unfinished rows are unaffected.
        feeding = ~done
        mask = torch.cat([mask, feeding.to(mask.dtype)[:, None]], dim=1)
        for b in (feeding.nonzero().flatten().tolist() if eviction is not None else ()):  # eviction bookkeeping
            states[b].stream_ids = torch.cat([states[b].stream_ids, torch.tensor([prompt_lengths[b] + step])])
        step_kwargs = dict(input_ids=nxt[:, None], attention_mask=mask, position_ids=_step_positions(positions, mrope),
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
        positions = positions + 1
        if eviction is None:
            out = model(**step_kwargs)
            continue
        with tap.record():
            out = model(**step_kwargs)
        mask = _evict(cache, mask, tap.final_attention, eviction, states, feeding.tolist(), step, steps)
    live = [int(m) for m in mask.sum(dim=1).tolist()]
    generation_trace = None
    if trace:
        generation_trace = GenerationTrace(steps, [s.stream_ids for s in states], cache, mask)
    return Generation(tokens=tokens, prompt=prompt, live_tokens=live, evicted_tokens=[s.evicted for s in states],
                      trace=generation_trace)
