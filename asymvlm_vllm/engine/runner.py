"""The model-runner half of AsymVLM: decide at the probe step, build pruned embeddings.

:class:`AsymVLMRunnerMixin` goes over vLLM's V1 ``GPUModelRunner`` (the CPU runner derives
from it), so one piece of code serves the CPU engine that the tests run and the GPU engine.

Per step, with the scheduler's :class:`~asymvlm_vllm.engine.protocol.StepPlan`:

* **materialize** entries are built first, before the step frees encoder outputs: a pruned
  identifier's rows are sliced from the full output cached under the original identifier; if
  the encoder runs for a pruned identifier instead (its entry was evicted), its full output is
  sliced as it is stored. Every rank slices with the keep set the scheduler sent, so under
  tensor parallelism all ranks hold the same rows whatever their own scores were.
* **probes** are decided right after the encoder ran: the prompt's text tokens are embedded
  with the model's own embedding layer (a collective under tensor parallelism, so every rank
  calls it), each image's rows are scored against them, the budget rule picks the count, and
  the decision rides back on the ``ModelRunnerOutput``.
* **mrope** entries give a re-admitted Qwen2.5-VL request the original (t, h, w) positions of
  its kept tokens instead of positions recomputed from the shortened prompt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.budget import BudgetRule
from ..core.config import KERNEL_RANKERS, AsymVLMConfig
from ..core.errors import AsymVLMError
from ..core.eviction import MultiTurnEviction
from ..core.positions import text_query_mask
from ..core.request_options import RequestOptions, request_options_from_extra_args
from ..core.selection import decide_vision_pruning
from ..envs import triton_interpreted
from .families import VisionFamily, family_for
from .protocol import ImageDecision, Materialize, RequestDecision, StepPlan
from .settings import asymvlm_config_from
from .text_eviction import TextEvictionRunnerMixin

__all__ = ["AsymVLMRunnerMixin", "PendingDecisions", "Probe", "decide_request", "decide_requests"]

logger = logging.getLogger("vllm.asymvlm")  # under "vllm": vLLM's handlers and VLLM_LOGGING_LEVEL apply


@dataclass
class Probe:
    """One probing request of a step, as :func:`decide_requests` takes it.

    Attributes
    ----------
    request_id : str
    prompt_token_ids : list of int, length T, the unpruned prompt
    mm_features : the request's ``MultiModalFeatureSpec`` list
    feature_indices : which features to decide
    options : the request's options
    answer_spans, multi_turn : as in :func:`decide_request`
    """

    request_id: str
    prompt_token_ids: list[int]
    mm_features: list[Any]
    feature_indices: list[int]
    options: RequestOptions
    answer_spans: Sequence[tuple[int, int]] = ()
    multi_turn: MultiTurnEviction | None = None


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A pageable host-to-CUDA copy waits for the stream; a pinned one does not.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _query_text(model: Any, family: VisionFamily, prompt_token_ids: list[int], mm_features: list[Any],
                device: torch.device) -> torch.Tensor | None:
    """(L, D) input embeddings of the prompt's text query, or None when it has no text."""
    ids = torch.tensor(prompt_token_ids, dtype=torch.long)
    embed_rows = torch.zeros(ids.shape[0], dtype=torch.bool)
    for feature in mm_features:
        position = feature.mm_position
        window = torch.zeros(position.length, dtype=torch.bool)
        window[:] = True if position.is_embed is None else position.is_embed.to(torch.bool)
        embed_rows[position.offset: position.offset + position.length] |= window
    query = text_query_mask(ids, embed_rows, family.structure_token_ids)
    if not bool(query.any()):
        return None
    return model.embed_input_ids(_to_device(ids[query], device))


_NO_TEXT = "the prompt has no text tokens to score its images against"


def _dropped_answers(model: Any, prompt_token_ids: list[int], image_rows: list[tuple[int, torch.Tensor]],
                     answer_spans: Sequence[tuple[int, int]], multi_turn: MultiTurnEviction,
                     device: torch.device) -> list[int]:
    """The previous answers ``multi_turn`` drops, ranked against the current turn's images."""
    ids = torch.tensor(prompt_token_ids, dtype=torch.long)
    last_answer_end = answer_spans[-1][1]
    current = [r for offset, r in image_rows if offset >= last_answer_end] or [r for _, r in image_rows]
    answers = [ids[a:b] for a, b in answer_spans]
    embeddings = model.embed_input_ids(torch.cat(answers).to(device))
    rebased, offset = [], 0
    for a, b in answer_spans:  # the answers' embeddings, back to back
        rebased.append((offset, offset + b - a))
        offset += b - a
    image_embeddings = torch.cat(current).to(embeddings.dtype)
    return multi_turn.select_answers(rebased, embeddings, image_embeddings)


def _image_rows(model: Any, family: VisionFamily, mm_features: list[Any], index: int,
                encoder_outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image ``index``'s encoder-output rows (R, D), its structural-row mask (R,) and the positions
    of its prunable rows (N,) on the mask's device.

    Raises
    ------
    AsymVLMError
        When its output is not cached or its structure cannot be known.
    """
    feature = mm_features[index]
    rows = encoder_outputs.get(feature.identifier)
    if rows is None:
        raise AsymVLMError(f"image {index}'s encoder output is not in the encoder cache")
    rows = rows.reshape(-1, rows.shape[-1])
    try:
        structural = family.structural_rows(model, feature, rows)
    except (AsymVLMError, ValueError) as exc:
        raise AsymVLMError(f"image {index}: {exc}") from exc
    return rows, structural, (~structural).nonzero().flatten()


def _all_structural(index: int, num_rows: int) -> ImageDecision:
    return ImageDecision(index, num_rows, 0, list(range(num_rows)), 0.0, 1.0)


def decide_request(
    model: Any,
    family: VisionFamily,
    config: AsymVLMConfig,
    ranker: Any,
    prompt_token_ids: list[int],
    mm_features: list[Any],
    feature_indices: list[int],
    encoder_outputs: dict[str, torch.Tensor],
    options: RequestOptions,
    device: torch.device,
    answer_spans: Sequence[tuple[int, int]] = (),
    multi_turn: MultiTurnEviction | None = None,
) -> RequestDecision:
    """One request's decision from its encoder outputs, with the core's torch functions.

    Parameters
    ----------
    model : the vLLM model (``embed_input_ids`` gives text embeddings)
    prompt_token_ids : list of int, length T, the unpruned prompt
    mm_features : the request's ``MultiModalFeatureSpec`` list
    feature_indices : which features to decide
    encoder_outputs : identifier → (R, D) encoder output rows
    options : the request's options
    answer_spans : (start, end) token ranges of the previous answers, in order
    multi_turn : the rule that drops whole answers (with ``answer_spans``), ranked by
        similarity to the current turn's images (the images after the last answer; all of
        them if that turn has none)

    Returns
    -------
    RequestDecision
        ``keep_rows`` per image index encoder-output rows and include structural rows.
    """
    started = time.perf_counter()
    text = _query_text(model, family, prompt_token_ids, mm_features, device)
    if text is None:
        return RequestDecision(error=_NO_TEXT)
    rule: BudgetRule = options.budget_rule(config.vision.budget)
    min_keep = options.min_keep if options.min_keep is not None else config.vision.min_keep
    images, image_rows = [], []
    for index in feature_indices:
        try:
            rows, structural, prunable = _image_rows(model, family, mm_features, index, encoder_outputs)
        except AsymVLMError as exc:
            return RequestDecision(error=str(exc))
        image_rows.append((mm_features[index].mm_position.offset, rows[prunable]))
        if prunable.numel() == 0:
            images.append(_all_structural(index, rows.shape[0]))
            continue
        grid = family.grid_shape(mm_features[index], int(prunable.numel()))
        scores = ranker.score(rows[prunable], text.to(rows.dtype), grid)
        if not bool(torch.isfinite(scores).all()):
            return RequestDecision(error=f"image {index}: scores are not finite")
        decision = decide_vision_pruning(scores.float().cpu(), rule, min_keep)
        kept = torch.cat([structural.nonzero().flatten().cpu(), prunable.cpu()[decision.keep_indices]])
        images.append(ImageDecision(index, rows.shape[0], int(prunable.numel()), sorted(kept.tolist()),
                                    float(decision.gap), float(decision.keep_ratio)))
    dropped: list[int] = []
    if multi_turn is not None and answer_spans:
        dropped = _dropped_answers(model, prompt_token_ids, image_rows, answer_spans, multi_turn, device)
    return RequestDecision(images=images, dropped_answers=dropped, scoring_seconds=time.perf_counter() - started)


@dataclass
class _Segment:
    """One image's prunable rows in the kernel's packed batch."""

    request_id: str
    slot: int  # where its ImageDecision goes in the request's list
    feature: int
    num_rows: int
    structural: torch.Tensor  # (S,) int64 host: rows always kept
    prunable: torch.Tensor  # (N,) int64 host: the packed rows' positions in the image


@dataclass
class PendingDecisions:
    """Decisions of one step's probes; the kernel's may still be running on the device.

    :meth:`result` waits only for the selection kernel and its copy to the host, which were
    queued before the step's forward pass, not for the forward pass.
    """

    decisions: dict[str, RequestDecision] = field(default_factory=dict)
    images: dict[str, list[ImageDecision | None]] = field(default_factory=dict)
    segments: list[_Segment] = field(default_factory=list)
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # kernel outputs, pinned on CUDA
    cu_seqlens: list[int] = field(default_factory=list)
    ready: Any = None  # torch.cuda.Event after the copy, or None
    launch_seconds: float = 0.0

    def result(self) -> dict[str, RequestDecision]:
        if not self.segments:
            return self.decisions
        started = time.perf_counter()
        if self.ready is not None:
            self.ready.synchronize()
        num_keep, gaps, ratios = self.host["num_keep"].tolist(), self.host["gaps"].tolist(), self.host["ratios"].tolist()
        keep, bad = self.host["keep_indices"], self.host["not_finite"].tolist()
        failed: dict[str, str] = {}
        for b, segment in enumerate(self.segments):
            if bad[b]:
                failed.setdefault(segment.request_id, f"image {segment.feature}: scores are not finite")
                continue
            start = self.cu_seqlens[b]
            chosen = segment.prunable[keep[start: start + num_keep[b]].long()]
            kept = sorted(torch.cat([segment.structural, chosen]).tolist())
            self.images[segment.request_id][segment.slot] = ImageDecision(
                segment.feature, segment.num_rows, int(segment.prunable.numel()), kept, gaps[b], ratios[b])
        seconds = self.launch_seconds + time.perf_counter() - started
        for request_id, images in self.images.items():
            if request_id in failed:
                self.decisions[request_id] = RequestDecision(error=failed[request_id])
            else:
                self.decisions[request_id] = RequestDecision(images=list(images), scoring_seconds=seconds)
        self.segments = []
        return self.decisions


def decide_requests(
    model: Any,
    family: VisionFamily,
    config: AsymVLMConfig,
    ranker: Any,
    probes: Sequence[Probe],
    encoder_outputs: dict[str, torch.Tensor],
    device: torch.device,
    kernel: bool = False,
) -> PendingDecisions:
    """The decisions of all of a step's probing requests.

    With ``kernel``, every image of every request (but those of multi-turn requests, which
    go through :func:`decide_request`) is scored and selected by one packed launch of the
    fused ``select_vision_tokens`` kernel, with no host synchronisation: the layouts are
    known on the host, the inputs go to the device through pinned memory, and the outputs
    come back through pinned memory behind an event. LLaVA-NeXT's separator rows are
    found by value on the device, which costs one synchronisation per image. Without
    ``kernel``, each request goes through :func:`decide_request`.

    Scores are float32 on both paths, so the keep sets agree wherever the two float32
    roundings of a score do not straddle the cut.

    Parameters
    ----------
    probes : the step's probing requests
    encoder_outputs : identifier → (R, D) encoder output rows
    kernel : use the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)

    Returns
    -------
    PendingDecisions
        ``result()`` gives request id → :class:`RequestDecision`.
    """
    pending = PendingDecisions()

    def with_torch(p: Probe) -> RequestDecision:
        return _guarded(p.request_id, lambda: decide_request(
            model, family, config, ranker, p.prompt_token_ids, p.mm_features, p.feature_indices,
            encoder_outputs, p.options, device, p.answer_spans, p.multi_turn))

    if not kernel:
        pending.decisions.update({probe.request_id: with_torch(probe) for probe in probes})
        return pending
    started = time.perf_counter()
    vision, text, cu_v, cu_t, rules, min_keeps = [], [], [0], [0], [], []
    for probe in probes:
        if probe.multi_turn is not None and probe.answer_spans:
            pending.decisions[probe.request_id] = with_torch(probe)
            continue
        try:
            packed = _pack_request(model, family, probe, encoder_outputs, device)
        except (AsymVLMError, ValueError) as exc:
            pending.decisions[probe.request_id] = RequestDecision(error=str(exc))
            continue
        images, segments, parts = packed
        pending.images[probe.request_id] = images
        rule: BudgetRule = probe.options.budget_rule(config.vision.budget)
        min_keep = probe.options.min_keep if probe.options.min_keep is not None else config.vision.min_keep
        for segment, (rows, query) in zip(segments, parts):
            pending.segments.append(segment)
            vision.append(rows.float())
            text.append(query.float())
            cu_v.append(cu_v[-1] + rows.shape[0])
            cu_t.append(cu_t[-1] + query.shape[0])
            rules.append(rule)
            min_keeps.append(min_keep)
    if pending.segments:
        from ..kernels.vision_selection import pack_budget_rules, select_vision_tokens

        rule_ids, rule_params = pack_budget_rules(rules)
        counts = torch.tensor([b - a for a, b in zip(cu_v, cu_v[1:])])
        weight = getattr(ranker, "weight", None)
        selection = select_vision_tokens(
            torch.cat(vision), torch.cat(text), _to_device(torch.tensor(cu_v, dtype=torch.int32), device),
            _to_device(torch.tensor(cu_t, dtype=torch.int32), device), int(counts.max()),
            _to_device(rule_ids, device), _to_device(rule_params, device),
            _to_device(torch.tensor(min_keeps, dtype=torch.int32), device),
            weight=weight.to(device) if weight is not None else None)
        segment_of_row = _to_device(torch.repeat_interleave(torch.arange(len(counts)), counts), device)
        not_finite = torch.zeros(len(counts), dtype=torch.int32, device=device).index_add_(
            0, segment_of_row, (~torch.isfinite(selection.scores)).to(torch.int32))
        outputs = {"num_keep": selection.num_keep, "gaps": selection.gaps, "ratios": selection.keep_ratios,
                   "keep_indices": selection.keep_indices, "not_finite": not_finite}
        if device.type == "cuda":
            for name, value in outputs.items():
                pending.host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                pending.host[name].copy_(value, non_blocking=True)
            pending.ready = torch.cuda.Event()
            pending.ready.record()
        else:
            pending.host = {name: value.cpu() for name, value in outputs.items()}
        pending.cu_seqlens = cu_v
    else:
        pending.decisions.update({r: RequestDecision(images=list(i)) for r, i in pending.images.items()})
    pending.launch_seconds = time.perf_counter() - started
    return pending


def _guarded(request_id: str, decide: Any) -> RequestDecision:
    try:
        return decide()
    except (AsymVLMError, ValueError) as e:
        return RequestDecision(error=str(e))
    except Exception as e:  # one request's failure must not take the engine down
        logger.exception("AsymVLM: deciding request %s failed; it runs unpruned", request_id)
        return RequestDecision(error=f"deciding failed: {type(e).__name__}: {e}")


def _pack_request(model: Any, family: VisionFamily, probe: Probe, encoder_outputs: dict[str, torch.Tensor],
                  device: torch.device):
    """A request's images for the packed kernel: placeholders for its decisions, its segments,
    and per segment its prunable rows (N, D) and its query text (L, D)."""
    text = _query_text(model, family, probe.prompt_token_ids, probe.mm_features, device)
    if text is None:
        raise AsymVLMError(_NO_TEXT)
    images: list[ImageDecision | None] = []
    segments, parts = [], []
    for index in probe.feature_indices:
        rows, structural, prunable = _image_rows(model, family, probe.mm_features, index, encoder_outputs)
        structural, prunable = structural.cpu(), prunable.cpu()  # host already, but for LLaVA-NeXT
        if prunable.numel() == 0:
            images.append(_all_structural(index, rows.shape[0]))
            continue
        images.append(None)
        segments.append(_Segment(probe.request_id, len(images) - 1, index, rows.shape[0],
                                 structural.nonzero().flatten(), prunable))
        if prunable.numel() != rows.shape[0]:
            rows = rows.index_select(0, _to_device(prunable, rows.device))
        parts.append((rows, text))
    return images, segments, parts


def decides_with_kernel(config: AsymVLMConfig, device: torch.device) -> bool:
    """Whether the probe decides with the fused kernel (``vision.decide_with``) on ``device``.

    Raises
    ------
    AsymVLMError
        For ``triton`` where Triton cannot run: no CUDA and no interpreter.
    """
    choice = config.vision.decide_with
    if choice == "auto":
        return device.type == "cuda" and config.vision.ranker in KERNEL_RANKERS
    if choice == "triton" and device.type != "cuda" and not triton_interpreted():
        raise AsymVLMError(f"vision.decide_with 'triton' needs a CUDA device, and this engine runs on {device.type} "
                           "(TRITON_INTERPRET=1 runs the kernel in Triton's interpreter, for tests)")
    return choice == "triton"


class AsymVLMRunnerMixin(TextEvictionRunnerMixin):
    """Mixed in front of vLLM's V1 ``GPUModelRunner`` (or ``CPUModelRunner``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asymvlm_config = asymvlm_config_from(self.vllm_config)
        self._asymvlm_family = family_for(self.model_config.hf_config)
        self._asymvlm_ranker = None
        self._asymvlm_plan: StepPlan | None = None
        self._asymvlm_keep: dict[str, Materialize] = {}
        self._asymvlm_pending: dict[str, RequestDecision] = {}
        self._asymvlm_launched: list[PendingDecisions] = []
        self._asymvlm_mrope: dict[str, tuple[list[list[int]], int]] = {}
        self._asymvlm_kernel = False
        self._asymvlm_encoder_only_output: Any = None
        self._asymvlm_unmaterialized: set[str] = set()
        self._asymvlm_generator_states: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
        self._text_init()

    def load_model(self, *args: Any, **kwargs: Any):
        result = super().load_model(*args, **kwargs)
        # A scorer file that does not fit this model stops start-up here, with the file's name.
        hidden = self.model_config.get_hidden_size()
        self._asymvlm_ranker = self.asymvlm_config.vision.make_ranker(expected_hidden_size=hidden)
        self._asymvlm_kernel = decides_with_kernel(self.asymvlm_config, self.device)
        return result

    def initialize_kv_cache(self, *args: Any, **kwargs: Any):
        result = super().initialize_kv_cache(*args, **kwargs)
        self._text_setup()
        return result

    # -------------------------------------------------------------- plan intake
    def _update_states(self, scheduler_output: Any):
        plan = getattr(scheduler_output, "asymvlm", None)
        self._asymvlm_plan = plan if isinstance(plan, StepPlan) else None
        if self._asymvlm_plan is not None:
            self._asymvlm_keep.update(self._asymvlm_plan.materialize)
            for identifier, how in self._asymvlm_plan.materialize.items():
                try:
                    self._materialize(identifier, how)
                except Exception:
                    logger.exception("AsymVLM: building pruned embeddings %s failed; the encoder runs again", identifier)
                if identifier not in self.encoder_cache:
                    self._asymvlm_unmaterialized.add(identifier)
        for identifier in scheduler_output.free_encoder_mm_hashes:
            self._asymvlm_keep.pop(identifier, None)
            self._asymvlm_unmaterialized.discard(identifier)
        result = super()._update_states(scheduler_output)
        self._text_update_states(scheduler_output, self._asymvlm_plan.text if self._asymvlm_plan is not None else {})
        return result

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        result = super()._prepare_inputs(scheduler_output, *args, **kwargs)
        self._text_find_due(scheduler_output)
        return result

    def _materialize(self, identifier: str, how: Materialize) -> None:
        if identifier in self.encoder_cache:
            return
        source = self.encoder_cache.get(how.source)
        if source is not None and source.shape[0] == how.num_rows:
            index = torch.tensor(how.keep_rows, dtype=torch.long, device=source.device)
            self.encoder_cache[identifier] = source.index_select(0, index)

    def _batch_mm_inputs_from_scheduler(self, scheduler_output: Any):
        mm_hashes, mm_kwargs, mm_lora_refs = super()._batch_mm_inputs_from_scheduler(scheduler_output)
        if self._asymvlm_unmaterialized:
            # The scheduler counts these pruned entries as cached, but building them from the
            # full output failed (or found no full output): encode the image again and let
            # _cache_encoder_output slice it, rather than fail the step at the gather.
            for req_id in scheduler_output.num_scheduled_tokens:
                req_state = self.requests.get(req_id)
                for feature in (req_state.mm_features if req_state is not None else ()):
                    identifier = feature.identifier
                    if (identifier in self._asymvlm_unmaterialized and identifier not in self.encoder_cache
                            and identifier not in mm_hashes and feature.data is not None):
                        mm_hashes.append(identifier)
                        mm_kwargs.append((feature.modality, feature.data))
                        mm_lora_refs.append((req_id, feature.mm_position))
        return mm_hashes, mm_kwargs, mm_lora_refs

    def _cache_encoder_output(self, mm_hash: str, output: torch.Tensor, *args: Any, **kwargs: Any):
        how = self._asymvlm_keep.get(mm_hash)
        if how is not None and output.shape[0] == how.num_rows and len(how.keep_rows) != how.num_rows:
            output = output.index_select(0, torch.tensor(how.keep_rows, dtype=torch.long, device=output.device))
        self._asymvlm_unmaterialized.discard(mm_hash)
        return super()._cache_encoder_output(mm_hash, output, *args, **kwargs)

    def _init_mrope_positions(self, req_state: Any):
        plan = self._asymvlm_plan
        if plan is not None and req_state.req_id in plan.mrope:
            positions, delta = plan.mrope[req_state.req_id]
            req_state.mrope_positions = torch.tensor(positions, dtype=torch.long)
            req_state.mrope_position_delta = int(delta)
            return
        super()._init_mrope_positions(req_state)

    # -------------------------------------------------------------- probe
    def _execute_mm_encoder(self, scheduler_output: Any):
        outputs = super()._execute_mm_encoder(scheduler_output)
        plan = self._asymvlm_plan
        if plan is not None and plan.probes:
            self._asymvlm_launched.append(self._decide(plan.probes))
        return outputs

    def _decide(self, specs: dict[str, Any]) -> PendingDecisions:
        pending, probes = PendingDecisions(), []
        for request_id, spec in specs.items():
            state = self.requests.get(request_id)
            if state is None:
                pending.decisions[request_id] = RequestDecision(error="the runner does not know the request")
            elif self._asymvlm_family is None or self._asymvlm_ranker is None:
                pending.decisions[request_id] = RequestDecision(error="this model is not supported by AsymVLM")
            else:
                try:
                    options = request_options_from_extra_args(spec.options)
                except (AsymVLMError, ValueError) as e:
                    pending.decisions[request_id] = RequestDecision(error=str(e))
                    continue
                probes.append(Probe(
                    request_id, list(state.prompt_token_ids), list(state.mm_features), list(spec.features), options,
                    spec.answer_spans, self.asymvlm_config.text.make_multi_turn_policy() if spec.answer_spans else None))
                if self._asymvlm_family.uses_mrope and state.mrope_positions is not None:
                    positions = state.mrope_positions[:, : len(state.prompt_token_ids)]
                    self._asymvlm_mrope[request_id] = (
                        positions.tolist(), len(state.prompt_token_ids) + int(state.mrope_position_delta))
        if not probes:
            return pending
        try:
            with torch.inference_mode():
                launched = decide_requests(
                    self.model, self._asymvlm_family, self.asymvlm_config, self._asymvlm_ranker, probes,
                    self.encoder_cache, self.device, kernel=self._asymvlm_kernel)
        except Exception as e:  # the step's probes run unpruned; the engine goes on
            logger.exception("AsymVLM: deciding the step's probes failed; they run unpruned")
            launched = PendingDecisions({p.request_id: RequestDecision(error=f"deciding failed: {type(e).__name__}: {e}")
                                         for p in probes})
        launched.decisions.update(pending.decisions)
        return launched

    def _collect_decisions(self) -> None:
        launched, self._asymvlm_launched = self._asymvlm_launched, []
        for pending in launched:
            try:
                decisions = pending.result()
            except Exception as e:
                logger.exception("AsymVLM: reading the step's decisions failed; its probes run unpruned")
                decisions = {r: RequestDecision(error=f"deciding failed: {type(e).__name__}: {e}")
                             for r in [*pending.decisions, *pending.images]}
            for request_id, decision in decisions.items():
                mrope = self._asymvlm_mrope.pop(request_id, None)
                if decision.error is None and mrope is not None:
                    decision.mrope_positions, decision.mrope_next_position = mrope
                self._asymvlm_pending[request_id] = decision

    # -------------------------------------------------------------- seeded sampling
    def _sample(self, *args: Any, **kwargs: Any):
        # A probe step is a partial prefill whose sampled token vLLM discards; it then rewinds
        # the request's generator by its Philox offset, which CPU generators do not have
        # ("CPU Generator does not use offset"). Keep their state here and restore it instead.
        # CUDA generators have the offset: on a GPU this adds nothing to the step.
        saved = self._asymvlm_generator_states
        saved.clear()
        if self.device.type != "cpu" or not self.input_batch.generators:
            return super()._sample(*args, **kwargs)
        num_reqs = self.input_batch.num_reqs
        for index in self.discard_request_mask.np[:num_reqs].nonzero()[0].tolist():
            generator = self.input_batch.generators.get(index)
            if generator is not None and generator.device.type == "cpu":
                saved[index] = (generator, generator.get_state())
        return super()._sample(*args, **kwargs)

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any):
        saved, self._asymvlm_generator_states = self._asymvlm_generator_states, {}
        if not saved:
            return super()._bookkeeping_sync(*args, **kwargs)
        generators = self.input_batch.generators
        for index, (generator, state) in saved.items():
            generator.set_state(state)
            generators.pop(index, None)  # so that vLLM's offset rewind skips it
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            for index, (generator, _) in saved.items():
                generators[index] = generator

    # -------------------------------------------------------------- answer
    def _attach_decisions(self, output: Any) -> Any:
        if not (self._asymvlm_pending or self._asymvlm_launched or self._text_choices) or output is None:
            return output
        target = getattr(output, "_model_runner_output", output)  # the async wrapper holds the real one
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if target is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(target, ModelRunnerOutput):
            return output  # keep them for the step's real output
        self._collect_decisions()
        if self._asymvlm_pending:
            target.asymvlm_decisions, self._asymvlm_pending = self._asymvlm_pending, {}
        if self._text_choices:
            target.asymvlm_evictions, self._text_choices = self._text_choices, {}
        return output

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        plan = getattr(scheduler_output, "asymvlm", None)
        if isinstance(plan, StepPlan) and plan.encoder_only:
            self._encoder_only_step(scheduler_output)
            return None  # the engine asks sample_tokens for the output, as after a forward pass
        output = super().execute_model(scheduler_output, *args, **kwargs)
        if self._text_due:
            try:
                self._text_evict()
            except Exception:  # one step's eviction failing must not take the engine down
                logger.exception("AsymVLM: choosing blocks to evict failed; nothing is evicted in this step")
        return self._attach_decisions(output)

    def sample_tokens(self, *args: Any, **kwargs: Any):
        if self._asymvlm_encoder_only_output is not None:
            output, self._asymvlm_encoder_only_output = self._asymvlm_encoder_only_output, None
            return self._attach_decisions(output)
        return self._attach_decisions(super().sample_tokens(*args, **kwargs))

    def _encoder_only_step(self, scheduler_output: Any) -> None:
        """A step of probes only: update the batch, run the encoder and decide; no forward pass
        and no sampling (the scheduler discards the probes' few text tokens either way, and
        gives their unwritten blocks back). As vLLM's own encoder-only step does for an
        encoder instance (``make_empty_encoder_model_runner_output``)."""
        from vllm.v1.outputs import make_empty_encoder_model_runner_output

        with self.synchronize_input_prep():
            corrections = self._update_states(scheduler_output)
            self._execute_mm_encoder(scheduler_output)
        if corrections is not None:
            corrections()
        self._asymvlm_encoder_only_output = make_empty_encoder_model_runner_output(scheduler_output)
