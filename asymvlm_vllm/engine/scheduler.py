"""The AsymVLM scheduler: probe → decide → rewrite, before KV blocks are allocated.

vLLM fixes an image's placeholder count in its processor and allocates KV blocks for all of
them. AsymVLM's kept count depends on the encoder output and the question, so a request with
images goes through three stages:

1. **Probe.** Its first step schedules only the text before its first image (at least one
   token) together with *all* its image encoder inputs, and asks the runner to decide
   (:class:`~asymvlm_vllm.engine.protocol.ProbeSpec` in ``SchedulerOutput.asymvlm``). The
   request is then held — scheduled for 0 tokens — until the decision arrives, which matters
   for async scheduling, where the next step is planned before this one's output is back.
2. **Decide.** The runner scores the vision rows against the prompt's text and returns the
   kept rows per image (``ModelRunnerOutput.asymvlm_decisions``).
3. **Rewrite.** The scheduler releases the request's KV blocks, rewrites its prompt to the
   pruned length (new placeholder spans, new encoder-cache identifiers carrying a digest of
   the keep set, recomputed block hashes) and re-queues it as a new request: it is
   re-admitted with KV for the kept tokens only, its pruned embeddings waiting in the
   encoder cache. If every image keeps all rows there is nothing to rewrite and the request
   simply continues.

Requests without images, and everything when AsymVLM is off, follow vLLM's own path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from vllm.multimodal.inputs import PlaceholderRange
from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType
from vllm.v1.request import Request, RequestStatus

from ..core.eviction import BlockEviction
from ..core.prompt_rewrite import PlaceholderSpan, pruned_identifier, rewrite_prompt
from ..core.turns import find_answer_spans
from ..core.request_options import RequestOptionsError, request_options_from_extra_args
from .families import family_for
from .protocol import Materialize, ProbeSpec, RequestDecision, StepPlan
from .settings import asymvlm_config_from

__all__ = ["AsymVLMAsyncScheduler", "AsymVLMScheduler", "RequestPruning"]

logger = logging.getLogger("vllm.asymvlm")  # under "vllm": vLLM's handlers and VLLM_LOGGING_LEVEL apply

_NEW, _PROBING, _PRUNED, _DONE = "new", "probing", "pruned", "done"


@dataclass
class RequestPruning:
    """The scheduler's record of one image request."""

    phase: str
    options: dict[str, Any]
    outcome: dict[str, Any] = field(default_factory=dict)
    probe_started: float | None = None
    pruned: dict[str, Materialize] = field(default_factory=dict)
    """Pruned identifier → how the runner builds its embeddings."""
    mrope: tuple[list[list[int]], int] | None = None
    answer_spans: list[tuple[int, int]] = field(default_factory=list)
    """Previous answers the multi-turn rule chooses among (empty: they fit the budget)."""
    unwritten: bool = False
    """Probed in an encoder-only step: the tokens counted computed have no KV; whatever the
    decision, the request starts over (``_start_over``)."""


@dataclass
class RequestEvictionRecord:
    """The scheduler's record of a request whose generated tokens are evicted past a budget."""

    policy: BlockEviction
    outcome: dict[str, Any] = field(default_factory=dict)
    holes: int = 0
    """Evicted blocks the request holds as null blocks now (0 again after a preemption)."""


def _spans(request: Request) -> list[PlaceholderSpan]:
    spans = []
    for feature in request.mm_features:
        position = feature.mm_position
        is_embed = None if position.is_embed is None else tuple(bool(x) for x in position.is_embed.tolist())
        spans.append(PlaceholderSpan(position.offset, position.length, is_embed))
    return spans


class AsymVLMScheduler(Scheduler):
    """vLLM's scheduler with AsymVLM's probe → decide → rewrite for image requests.

    Constructed with ``async_scheduling`` on, it is an :class:`AsymVLMAsyncScheduler`, so
    ``--scheduler-cls`` names this one class for both modes.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is AsymVLMScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                cls = AsymVLMAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asymvlm_config = asymvlm_config_from(self.vllm_config)
        model_config = self.vllm_config.model_config
        self._family = family_for(model_config.hf_config) if model_config is not None else None
        self._pruning: dict[str, RequestPruning] = {}
        self._unannounced: set[str] = set()
        self._step_probes: dict[str, list[int]] = {}
        self._pending_materialize: dict[str, Materialize] = {}
        self._missing_decision_warned = False
        self._text: dict[str, RequestEvictionRecord] = {}
        self._turn_markers: Any = None  # learned on the first multi-turn request; False: unavailable
        self.eviction_log: list[tuple[str, Any]] | None = None
        """Set to a list to record every applied eviction as (request id, runner choice)."""
        self._grow_encoder_cache()
        self._text_full_group = 0
        self._text_groups = self._evictable_groups()
        if self._text_groups:
            coordinator = self.kv_cache_manager.coordinator
            cache_blocks = coordinator.cache_blocks

            def cache_blocks_before_evictions(request, num_computed_tokens):
                return cache_blocks(request, min(num_computed_tokens, self._cacheable_tokens(request)))

            coordinator.cache_blocks = cache_blocks_before_evictions
        if self.asymvlm_config.vision.enabled and self._family is None and model_config is not None:
            logger.warning("AsymVLM: %s is not a supported architecture; requests run unpruned",
                           getattr(model_config.hf_config, "architectures", None))

    def _grow_encoder_cache(self) -> None:
        """Room for pruning's encoder outputs on top of what vLLM sizes the encoder cache for.

        In steady state a step holds the full encoder outputs of the images it probes (up to
        one step's encoder budget), the pruned copies of the requests decided one step earlier
        that are prefilled now, and, from each decision until the runner has cut them in the
        next step, new pruned copies beside the full outputs they come from: up to 1 + 2 x keep
        budgets. In vLLM's default cache (one budget, ``max_num_batched_tokens`` embeddings)
        they cannot fit, so probes wait for space and the queue drains in up to 1.7x plain
        vLLM's steps (``benchmarks/capacity.py``). Two more budgets hold them at any keep
        ratio, and the probes encode as many images per step as plain vLLM does
        (``vision.encoder_cache_room``, default 2; 0 keeps vLLM's size). The runner's
        encoder cache is a dict of tensors filled only as the scheduler admits; the extra room
        costs at most ``2 x max_num_encoder_input_tokens x hidden`` values of device memory
        (100 MB for Phi-3.5-V in bf16 at the default 8,192).
        """
        cache = self.encoder_cache_manager
        room = self.asymvlm_config.vision.encoder_cache_room
        if (not self.asymvlm_config.vision.enabled or self._family is None or not self.max_num_encoder_input_tokens
                or not room or type(cache) is not EncoderCacheManager or cache.cached):
            return
        self.encoder_cache_manager = EncoderCacheManager(cache.cache_size + room * self.max_num_encoder_input_tokens)

    # ------------------------------------------------------------------ bookkeeping
    def asymvlm_state(self, request_id: str) -> RequestPruning | None:
        """AsymVLM's record of a live request (None for requests it does not touch)."""
        return self._pruning.get(request_id)

    def _evictable_groups(self) -> list[int]:
        """The KV-cache groups evicted blocks are freed from: every group, when all are full or
        sliding-window attention and one is full; none otherwise (eviction is unavailable)."""
        from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SlidingWindowManager

        from .text_eviction import evictable_kind

        managers = getattr(getattr(self.kv_cache_manager, "coordinator", None), "single_type_managers", ())
        kinds = [evictable_kind(m.kv_cache_spec) if type(m) in (FullAttentionManager, SlidingWindowManager) else None
                 for m in managers]
        if not kinds or None in kinds or "full" not in kinds:
            return []
        self._text_full_group = kinds.index("full")
        return list(range(len(managers)))

    def _cacheable_tokens(self, request: Request) -> int:
        """Prefix caching stops where eviction may start: a block computed after the request's
        first eviction attended without the evicted tokens, so its KV is right for this request
        only. Eviction starts once the generated tokens exceed the budget, so every token
        before prompt + budget was computed with all of its context and stays shareable."""
        record = self._text_active(request.request_id)
        if record is None:
            return 1 << 62
        return request.num_prompt_tokens + record.policy.budget

    def _add_text_record(self, request: Request) -> None:
        params = request.sampling_params
        try:
            options = request_options_from_extra_args(params.extra_args if params is not None else None)
        except RequestOptionsError:
            return  # refused at the front end; an image request's record says why
        budget = options.text_eviction_budget(self.asymvlm_config.text)
        if budget is None:
            return
        outcome: dict[str, Any] = {"status": "on", "budget_tokens": budget, "evicted_tokens": 0, "evicted_blocks": 0,
                                   "eviction_steps": 0, "peak_live_blocks": 0, "eviction_seconds": 0.0}
        if not self._text_groups:
            outcome.update(status="unsupported_model", reason="the model has no full-attention KV cache to evict from")
        elif self.vllm_config.speculative_config is not None:
            outcome.update(status="unsupported_option", reason="text eviction does not run with speculative decoding")
        policy = BlockEviction(budget, self.block_size, self.asymvlm_config.text.protected_recent_blocks)
        self._text[request.request_id] = RequestEvictionRecord(policy, outcome)

    def _text_active(self, request_id: str) -> RequestEvictionRecord | None:
        record = self._text.get(request_id)
        return record if record is not None and record.outcome["status"] == "on" else None

    def add_request(self, request: Request) -> None:
        self._add_text_record(request)
        if request.request_id in self._text:
            self._unannounced.add(request.request_id)
        images = [f for f in (request.mm_features or []) if f.modality == "image"]
        if images and self.asymvlm_config.vision.enabled:
            outcome = {"vision_tokens": sum(f.mm_position.get_num_embeds() for f in images),
                       "prompt_tokens": request.num_prompt_tokens}
            state = RequestPruning(_NEW, {}, outcome)
            extra = request.sampling_params.extra_args if request.sampling_params is not None else None
            try:
                options = request_options_from_extra_args(extra)
            except RequestOptionsError as e:
                # The front end's validator answers HTTP 400 before this; requests that reach
                # the engine another way run unpruned and say why.
                self._finish_record(state, "invalid_options", str(e))
            else:
                state.options = options.to_extra_args()
                params = request.sampling_params
                if not options.enabled:
                    self._finish_record(state, "off")
                elif self._family is None:
                    self._finish_record(state, "unsupported_model")
                elif any(f.modality != "image" for f in request.mm_features):
                    self._finish_record(state, "unsupported_modality")
                elif params is not None and params.prompt_logprobs is not None:
                    # The front end holds the submitted prompt and lines prompt logprobs up
                    # with it: they are only right for the whole prompt.
                    self._finish_record(state, "unsupported_option",
                                        "prompt_logprobs (and echo with logprobs) cover the whole prompt, "
                                        "so the request ran unpruned")
                elif self.asymvlm_config.text.multi_turn:
                    self._find_previous_answers(request, state)
            self._pruning[request.request_id] = state
            self._unannounced.add(request.request_id)
        super().add_request(request)

    def _finish_record(self, state: RequestPruning, status: str, reason: str | None = None) -> None:
        """The request runs unpruned from here on, for ``reason``."""
        state.phase = _DONE
        state.outcome["status"] = status
        # A decision that could not be applied must not be reported as kept.
        state.outcome.pop("images", None)
        state.outcome.pop("prompt_tokens_prefilled", None)
        for key in ("previous_answers", "answers_dropped", "answer_tokens_dropped"):
            state.outcome.pop(key, None)
        state.outcome["vision_tokens_kept"] = state.outcome.get("vision_tokens", 0)
        if reason:
            state.outcome["reason"] = reason

    # ------------------------------------------------------------------ multi-turn
    def _find_previous_answers(self, request: Request, state: RequestPruning) -> None:
        """The previous answers the probe must choose among, if they exceed the answer budget."""
        from .turns import model_turn_markers

        if self._turn_markers is None:
            self._turn_markers = model_turn_markers(self.vllm_config.model_config) or False
        if self._turn_markers is False:
            state.outcome["multi_turn"] = "unavailable: the chat template's turns could not be learned (see the log)"
            return
        markers, is_blank = self._turn_markers
        images = [(f.mm_position.offset, f.mm_position.offset + f.mm_position.length) for f in request.mm_features]
        spans = find_answer_spans(request.prompt_token_ids, markers, is_blank, images)
        if sum(b - a for a, b in spans) > self.asymvlm_config.text.multi_turn_answer_budget:
            state.answer_spans = spans

    # ------------------------------------------------------------------ probe and hold
    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens,
                                     encoder_compute_budget, shift_computed_tokens=0):
        args = (num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens)
        state = self._pruning.get(request.request_id)
        if state is not None and state.phase == _PROBING:
            return [], 0, encoder_compute_budget, [], []
        if state is not None and state.phase == _NEW and num_new_tokens:
            referenced = set(self.encoder_cache_manager.get_cached_input_ids(request))
            try:
                probe = self._schedule_probe(request, state, referenced, *args)
            except Exception as e:  # one request's failure must not take the engine down
                logger.exception("AsymVLM: probing request %s failed; it runs unpruned", request.request_id)
                self._step_probes.pop(request.request_id, None)
                self._release_references_since(request, referenced)
                self._finish_record(state, "error", f"probing failed: {type(e).__name__}: {e}")
            else:
                if probe is not None:
                    return probe
        return super()._try_schedule_encoder_inputs(request, *args)

    def _release_references_since(self, request: Request, referenced: set[int]) -> None:
        """Give back the encoder-cache references ``request`` took beyond ``referenced``: vLLM's
        encoder scheduling takes one on every cached image it finds, and a request that does
        not run its images now would otherwise pin them."""
        cache = self.encoder_cache_manager
        for index in set(cache.get_cached_input_ids(request)) - referenced:
            cache.free_encoder_input(request, index)

    def _schedule_probe(self, request, state, referenced, num_computed_tokens, num_new_tokens,
                        encoder_compute_budget, shift_computed_tokens):
        """Encoder scheduling for a request not probed yet: probe it in this step, or wait
        (schedule only the text before its first image); None: it runs unpruned.
        ``referenced``: the request's encoder-cache references before this step."""
        first_offset = request.mm_features[0].mm_position.offset
        if num_computed_tokens > first_offset:
            # A prefix-cache hit already holds KV for part of the unpruned image (an earlier
            # request ran it unpruned): reuse it rather than recompute.
            self._finish_record(state, "prefix_cached", "a prefix-cache hit covers the image")
            return None
        to_end = request.num_prompt_tokens - num_computed_tokens
        need = sum(f.mm_position.get_num_embeds() for f in request.mm_features)
        if need > min(self.max_num_encoder_input_tokens, self.encoder_cache_manager.cache_size):
            self._finish_record(state, "too_large", f"its images' {need} encoder tokens exceed one step's encoder budget")
            return None
        scheduled, covered, budget, external, duplicate = super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, to_end, encoder_compute_budget, shift_computed_tokens)
        if covered < to_end or external:
            # Not every image can be encoded this step: run the text before the first image
            # (if any) and probe later.
            self._release_references_since(request, referenced)
            before = max(0, min(num_new_tokens, first_offset - num_computed_tokens))
            return [], before, encoder_compute_budget, [], []
        self._step_probes[request.request_id] = list(range(len(request.mm_features)))
        probe_tokens = max(1, min(num_new_tokens, first_offset - num_computed_tokens))
        return scheduled, probe_tokens, budget, external, duplicate

    def schedule(self, *args: Any, **kwargs: Any):
        self._step_probes = {}
        output = super().schedule(*args, **kwargs)
        plan = StepPlan()
        now = time.monotonic()
        for request_id, features in self._step_probes.items():
            state = self._pruning.get(request_id)
            if request_id in output.num_scheduled_tokens and state is not None and state.phase == _NEW:
                state.phase = _PROBING
                state.probe_started = now
                plan.probes[request_id] = ProbeSpec(features, dict(state.options), list(state.answer_spans))
        self._step_probes = {}
        if plan.probes and self._encoder_only(output, plan):
            plan.encoder_only = True
            for request_id in plan.probes:
                self._pruning[request_id].unwritten = True
        plan.materialize, self._pending_materialize = self._pending_materialize, {}
        for request_id, features in output.scheduled_encoder_inputs.items():
            state = self._pruning.get(request_id)
            if state is None or not state.pruned:
                continue
            request = self.requests[request_id]
            for index in features:
                identifier = request.mm_features[index].identifier
                if identifier in state.pruned:
                    plan.materialize.setdefault(identifier, state.pruned[identifier])
        for new_request in output.scheduled_new_reqs:
            state = self._pruning.get(new_request.req_id)
            if state is not None and state.mrope is not None:
                plan.mrope[new_request.req_id] = state.mrope
            record = self._text_active(new_request.req_id)
            if record is not None:
                plan.text[new_request.req_id] = record.policy
        output.asymvlm = plan
        return output

    def _encoder_only(self, output: Any, plan: StepPlan) -> bool:
        """Whether this step can skip the language model: it schedules nothing but probes,
        whose few text tokens the rewrite recomputes anyway, and no block they fill is
        offered to the prefix cache (its KV would never be written)."""
        if (not self.asymvlm_config.vision.encoder_only_probes or set(output.num_scheduled_tokens) != set(plan.probes)
                or output.scheduled_spec_decode_tokens or self.connector is not None
                or self.ec_connector is not None):
            return False
        if not self.cache_config.enable_prefix_caching:
            return True
        sizes = [g.kv_cache_spec.block_size for g in self.kv_cache_config.kv_cache_groups] or [self.block_size]
        for request_id, count in output.num_scheduled_tokens.items():
            end = self.requests[request_id].num_computed_tokens  # already advanced by this step
            if any((end - count) // size != end // size for size in sizes):
                return False
        return True

    def _start_over(self, request: Request, state: RequestPruning) -> None:
        """A request probed in an encoder-only step that goes on unrewritten gives back its
        blocks and is prefilled from its first uncached token, like a preempted request."""
        state.unwritten = False
        if request.status == RequestStatus.RUNNING:
            self._release(request)

    # ------------------------------------------------------------------ decide → rewrite
    def update_from_output(self, scheduler_output, model_runner_output):
        decisions = getattr(model_runner_output, "asymvlm_decisions", None) or {}
        evictions = getattr(model_runner_output, "asymvlm_evictions", None) or {}
        changed = set()
        self._observe_live_blocks(scheduler_output)  # the step's peak: before its evictions
        for request_id, choice in evictions.items():
            try:
                if self._apply_eviction(request_id, choice):
                    changed.add(request_id)
            except Exception:  # one request's failure must not take the engine down
                logger.exception("AsymVLM: freeing evicted blocks of request %s failed", request_id)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        plan = getattr(scheduler_output, "asymvlm", None)
        for request_id in (plan.probes if plan else ()):
            decision = decisions.get(request_id)
            if decision is None:
                decision = RequestDecision(error="the model runner returned no decision (is the AsymVLM worker installed? see --worker-cls)")
                if not self._missing_decision_warned:
                    logger.warning("AsymVLM: %s", decision.error)
                    self._missing_decision_warned = True
            try:
                self._apply_decision(request_id, decision)
            except Exception as e:  # one request's failure must not take the engine down
                logger.exception("AsymVLM: applying the decision for request %s failed; it runs unpruned", request_id)
                state = self._pruning.get(request_id)
                if state is not None and state.phase != _DONE:
                    self._finish_record(state, "error", f"rewriting failed: {type(e).__name__}: {e}")
            state, request = self._pruning.get(request_id), self.requests.get(request_id)
            if state is not None and state.unwritten and request is not None and not request.is_finished():
                self._start_over(request, state)
        self._announce_outcomes(outputs, changed)
        return outputs

    def _announce_outcomes(self, outputs: dict[int, Any], changed: set[str] = frozenset()) -> None:
        """Send each request's outcome on its first output once it is known, and again when an
        eviction changed it. The front end may finish a request itself (a stop string) and
        only abort it here, so the outcome on the final output alone could be lost; the
        front end keeps the latest one it saw."""
        if not (self._unannounced or changed):
            return
        for engine_outputs in outputs.values():
            for output in engine_outputs.outputs:
                request_id = output.request_id
                if output.finished or not (request_id in self._unannounced or request_id in changed):
                    continue
                state = self._pruning.get(request_id)
                if state is not None and state.phase not in (_DONE, _PRUNED):
                    continue
                self._unannounced.discard(request_id)
                outcome = self._outcome(request_id)
                if outcome:
                    output.kv_transfer_params = {**(output.kv_transfer_params or {}), "asymvlm": outcome}

    def _outcome(self, request_id: str) -> dict[str, Any]:
        """The request's outcome: the vision fields (image requests) and ``text`` (eviction)."""
        state = self._pruning.get(request_id)
        outcome = dict(state.outcome) if state is not None else {}
        record = self._text.get(request_id)
        if record is not None:
            outcome["text"] = dict(record.outcome)
        return outcome

    # ------------------------------------------------------------------ text eviction
    def _apply_eviction(self, request_id: str, choice: Any) -> bool:
        """Return the blocks the runner evicted to the pool, as null-block holes."""
        record = self._text_active(request_id)
        request = self.requests.get(request_id)
        if record is None or request is None or request.status != RequestStatus.RUNNING:
            return False  # finished, aborted or preempted since: its blocks went back already
        managers = self.kv_cache_manager.coordinator.single_type_managers
        first = managers[choice.group].req_to_blocks.get(request_id, [])
        if any(i >= len(first) or first[i].block_id != b or first[i].is_null
               for i, b in zip(choice.block_indices, choice.block_ids)):
            # Preempted and re-admitted in between: the runner's choice is about blocks the
            # request no longer holds.
            logger.warning("AsymVLM: request %s: stale eviction of blocks %s ignored", request_id, choice.block_indices)
            return False
        for g in self._text_groups:
            manager = managers[g]
            blocks = manager.req_to_blocks[request_id]
            freed = []
            for i in choice.block_indices:
                if i < len(blocks) and not blocks[i].is_null:
                    freed.append(blocks[i])
                    blocks[i] = manager._null_block
            manager.block_pool.free_blocks(freed)
        count = len(choice.block_indices)
        record.holes += count
        outcome = record.outcome
        outcome["evicted_blocks"] += count
        outcome["evicted_tokens"] += count * self.block_size
        outcome["eviction_steps"] += 1
        outcome["eviction_seconds"] = round(outcome["eviction_seconds"] + choice.seconds, 6)
        if self.eviction_log is not None:
            self.eviction_log.append((request_id, choice))
        return True

    def _observe_live_blocks(self, scheduler_output: Any) -> None:
        if not self._text:
            return
        managers = self.kv_cache_manager.coordinator.single_type_managers if self._text_groups else ()
        for request_id in scheduler_output.num_scheduled_tokens:
            record = self._text_active(request_id)
            if record is None:
                continue
            blocks = managers[self._text_full_group].req_to_blocks.get(request_id, ())
            live = len(blocks) - record.holes
            if live > record.outcome["peak_live_blocks"]:
                record.outcome["peak_live_blocks"] = live

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any):
        result = super()._preempt_request(request, *args, **kwargs)
        record = self._text.get(request.request_id)
        if record is not None:
            # Its blocks went back to the pool; it comes back by recomputing all its tokens.
            record.holes = 0
        return result

    def _apply_decision(self, request_id: str, decision: RequestDecision) -> None:
        state = self._pruning.get(request_id)
        request = self.requests.get(request_id)
        if state is None or request is None or state.phase != _PROBING or request.is_finished():
            return  # aborted while probing: the runner kept nothing for it
        state.outcome["probe_seconds"] = time.monotonic() - (state.probe_started or time.monotonic())
        state.outcome["scoring_seconds"] = decision.scoring_seconds
        if decision.error is not None:
            self._finish_record(state, "error", decision.error)
            return
        images = {d.feature: d for d in decision.images}
        state.outcome["images"] = [d.outcome() for d in decision.images]
        state.outcome["vision_tokens_kept"] = (
            state.outcome["vision_tokens"] - sum(d.num_rows - d.num_kept for d in decision.images))
        changed = {i: d.keep_rows for i, d in images.items() if d.num_kept < d.num_rows}
        dropped = [state.answer_spans[i] for i in decision.dropped_answers] if state.answer_spans else []
        if state.answer_spans:
            state.outcome["previous_answers"] = len(state.answer_spans)
            state.outcome["answers_dropped"] = list(decision.dropped_answers)
            state.outcome["answer_tokens_dropped"] = sum(b - a for a, b in dropped)
        if not changed and not dropped:
            state.phase = _DONE
            state.outcome["status"] = "pruned"
            state.outcome["prompt_tokens_prefilled"] = request.num_prompt_tokens
            return
        if request.num_output_tokens:
            self._finish_record(state, "error", "the request produced output before its decision")
            return
        if request.status not in (RequestStatus.RUNNING, RequestStatus.PREEMPTED, RequestStatus.WAITING):
            self._finish_record(state, "error", f"request in state {request.status.name} at decision time")
            return
        # Everything that can fail on odd input happens before the request is touched.
        rewritten, features, pruned = self._plan_rewrite(request, changed, dropped)
        if request.status == RequestStatus.RUNNING:
            self._release(request)
        elif request.status == RequestStatus.PREEMPTED:
            # Preempted while probing: it waits without KV; it must come back as a new request.
            request.status = RequestStatus.WAITING
        self._rewrite(request, state, rewritten, features, pruned, decision)

    def _release(self, request: Request) -> None:
        """Give back the request's KV blocks and encoder-cache references and queue it as a new
        request. vLLM's own preemption does this; the event and the preemption count it adds
        are taken back, because this is not memory pressure."""
        self.running.remove(request)
        num_events = len(request.events)
        self._preempt_request(request, time.monotonic())
        request.num_preemptions -= 1
        if len(request.events) > num_events and request.events[-1].type == EngineCoreEventType.PREEMPTED:
            request.events.pop()
        request.status = RequestStatus.WAITING

    @staticmethod
    def _plan_rewrite(request: Request, keep_rows: dict[int, list[int]], drop_ranges=()):
        """The pruned prompt, features and pruned identifiers; touches nothing."""
        rewritten = rewrite_prompt(request.prompt_token_ids, _spans(request), keep_rows, drop_ranges)
        features, pruned = [], {}
        for index, (feature, span) in enumerate(zip(request.mm_features, rewritten.spans)):
            is_embed = None if span.is_embed is None else torch.tensor(span.is_embed, dtype=torch.bool)
            position = PlaceholderRange(offset=span.offset, length=span.length, is_embed=is_embed)
            if index in keep_rows:
                rows = list(keep_rows[index])
                num_rows = feature.mm_position.get_num_embeds()
                identifier = pruned_identifier(feature.identifier, rows, num_rows)
                pruned[identifier] = Materialize(feature.identifier, rows, num_rows)
                features.append(replace(feature, identifier=identifier, mm_position=position))
            else:
                features.append(replace(feature, mm_position=position))
        return rewritten, features, pruned

    def _rewrite(self, request: Request, state: RequestPruning, rewritten, features, pruned,
                 decision: RequestDecision) -> None:
        original_length = request.num_prompt_tokens
        state.pruned.update(pruned)
        # A new list: in-process, the front end shares the original one.
        request.prompt_token_ids = list(rewritten.prompt_token_ids)
        request._all_token_ids[:] = rewritten.prompt_token_ids  # all_token_ids is a view of it
        request.num_prompt_tokens = len(rewritten.prompt_token_ids)
        request.mm_features = features
        request.block_hashes.clear()
        request.update_block_hashes()
        if decision.mrope_positions is not None and decision.mrope_next_position is not None:
            kept = [[axis[p] for p in rewritten.kept_positions] for axis in decision.mrope_positions]
            state.mrope = (kept, decision.mrope_next_position - request.num_prompt_tokens)
        # Register the pruned embeddings as cached so that re-admission gathers them instead
        # of running the encoder again; the runner builds them from the full output next step,
        # before it frees anything. Only while that output is still cached: one evicted
        # already is freed in the runner before this could materialize. And unreferenced
        # (freeable), as every waiting request's: a reference held while the request waits
        # (e.g. behind one that does not fit) could keep a running request from ever getting
        # encoder-cache space. Evicted before re-admission, the encoder runs again for the
        # pruned identifier and the runner slices its output.
        cache = self.encoder_cache_manager
        for index, feature in enumerate(features):
            identifier = feature.identifier
            if identifier not in pruned or identifier in cache.cached:
                continue
            if pruned[identifier].source in cache.cached and cache.can_allocate(request, index, 1 << 40, 0):
                cache.allocate(request, index)
                cache.free_encoder_input(request, index)
                self._pending_materialize[identifier] = pruned[identifier]
        state.phase = _PRUNED
        state.outcome.update(status="pruned", prompt_tokens_prefilled=request.num_prompt_tokens)
        logger.debug("AsymVLM: request %s: vision tokens %d -> %d, prompt %d -> %d tokens, images %s",
                     request.request_id, state.outcome["vision_tokens"], state.outcome["vision_tokens_kept"],
                     original_length, request.num_prompt_tokens, state.outcome["images"])

    # ------------------------------------------------------------------ finish
    def _free_request(self, request: Request, *args: Any, **kwargs: Any):
        kv_transfer_params, ec_transfer_params = super()._free_request(request, *args, **kwargs)
        state = self._pruning.get(request.request_id)
        self._unannounced.discard(request.request_id)
        if state is not None:
            if state.phase in (_NEW, _PROBING):
                state.outcome.setdefault("status", "unfinished")
            state.outcome.setdefault("vision_tokens_kept", state.outcome.get("vision_tokens", 0))
        outcome = self._outcome(request.request_id)
        self._pruning.pop(request.request_id, None)
        self._text.pop(request.request_id, None)
        if outcome:
            kv_transfer_params = {**(kv_transfer_params or {}), "asymvlm": outcome}
        return kv_transfer_params, ec_transfer_params


class AsymVLMAsyncScheduler(AsymVLMScheduler, AsyncScheduler):
    """:class:`AsymVLMScheduler` over vLLM's :class:`AsyncScheduler` (the GPU default)."""
