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
from typing import Any

import torch

from ..core.budget import BudgetRule
from ..core.config import AsymVLMConfig
from ..core.errors import AsymVLMError
from ..core.eviction import MultiTurnEviction
from ..core.positions import text_query_mask
from ..core.request_options import RequestOptions, request_options_from_extra_args
from ..core.selection import decide_vision_pruning
from .families import VisionFamily, family_for
from .protocol import ImageDecision, Materialize, RequestDecision, StepPlan
from .settings import asymvlm_config_from
from .text_eviction import TextEvictionRunnerMixin

__all__ = ["AsymVLMRunnerMixin", "decide_request"]

logger = logging.getLogger("vllm.asymvlm")  # under "vllm": vLLM's handlers and VLLM_LOGGING_LEVEL apply


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
    """One request's decision from its encoder outputs.

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
    ids = torch.tensor(prompt_token_ids, dtype=torch.long)
    embed_rows = torch.zeros(ids.shape[0], dtype=torch.bool)
    for feature in mm_features:
        position = feature.mm_position
        window = torch.zeros(position.length, dtype=torch.bool)
        window[:] = True if position.is_embed is None else position.is_embed.to(torch.bool)
        embed_rows[position.offset: position.offset + position.length] |= window
    query = text_query_mask(ids, embed_rows, family.structure_token_ids)
    if not bool(query.any()):
        return RequestDecision(error="the prompt has no text tokens to score its images against")
    text = model.embed_input_ids(ids[query].to(device))
    rule: BudgetRule = options.budget_rule(config.vision.budget)
    min_keep = options.min_keep if options.min_keep is not None else config.vision.min_keep
    images, image_rows = [], []
    for index in feature_indices:
        feature = mm_features[index]
        rows = encoder_outputs.get(feature.identifier)
        if rows is None:
            return RequestDecision(error=f"image {index}'s encoder output is not in the encoder cache")
        rows = rows.reshape(-1, rows.shape[-1])
        try:
            structural = family.structural_rows(model, feature, rows)
        except (AsymVLMError, ValueError) as exc:
            return RequestDecision(error=f"image {index}: {exc}")
        prunable = (~structural).nonzero().flatten()
        image_rows.append((mm_features[index].mm_position.offset, rows[prunable]))
        if prunable.numel() == 0:
            images.append(ImageDecision(index, rows.shape[0], 0, list(range(rows.shape[0])), 0.0, 1.0))
            continue
        grid = family.grid_shape(feature, int(prunable.numel()))
        scores = ranker.score(rows[prunable], text.to(rows.dtype), grid)
        if not bool(torch.isfinite(scores).all()):
            return RequestDecision(error=f"image {index}: scores are not finite")
        decision = decide_vision_pruning(scores.float().cpu(), rule, min_keep)
        kept = torch.cat([structural.nonzero().flatten().cpu(), prunable.cpu()[decision.keep_indices]])
        images.append(ImageDecision(index, rows.shape[0], int(prunable.numel()), sorted(kept.tolist()),
                                    float(decision.gap), float(decision.keep_ratio)))
    dropped: list[int] = []
    if multi_turn is not None and answer_spans:
        last_answer_end = answer_spans[-1][1]
        current = [r for offset, r in image_rows if offset >= last_answer_end] or [r for _, r in image_rows]
        answers = [ids[a:b] for a, b in answer_spans]
        embeddings = model.embed_input_ids(torch.cat(answers).to(device))
        rebased, offset = [], 0
        for a, b in answer_spans:  # the answers' embeddings, back to back
            rebased.append((offset, offset + b - a))
            offset += b - a
        image_embeddings = torch.cat(current).to(embeddings.dtype)
        dropped = multi_turn.select_answers(rebased, embeddings, image_embeddings)
    return RequestDecision(images=images, dropped_answers=dropped, scoring_seconds=time.perf_counter() - started)


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
        self._asymvlm_unmaterialized: set[str] = set()
        self._asymvlm_generator_states: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
        self._text_init()

    def load_model(self, *args: Any, **kwargs: Any):
        result = super().load_model(*args, **kwargs)
        # A scorer file that does not fit this model stops start-up here, with the file's name.
        hidden = self.model_config.get_hidden_size()
        self._asymvlm_ranker = self.asymvlm_config.vision.make_ranker(expected_hidden_size=hidden)
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
            for request_id, spec in plan.probes.items():
                self._asymvlm_pending[request_id] = self._decide(request_id, spec)
        return outputs

    def _decide(self, request_id: str, spec: Any) -> RequestDecision:
        state = self.requests.get(request_id)
        if state is None:
            return RequestDecision(error="the runner does not know the request")
        if self._asymvlm_family is None or self._asymvlm_ranker is None:
            return RequestDecision(error="this model is not supported by AsymVLM")
        try:
            with torch.inference_mode():
                decision = decide_request(
                    self.model, self._asymvlm_family, self.asymvlm_config, self._asymvlm_ranker,
                    list(state.prompt_token_ids), list(state.mm_features), list(spec.features),
                    self.encoder_cache, request_options_from_extra_args(spec.options), self.device,
                    spec.answer_spans, self.asymvlm_config.text.make_multi_turn_policy() if spec.answer_spans else None,
                )
        except (AsymVLMError, ValueError) as e:
            return RequestDecision(error=str(e))
        except Exception as e:  # one request's failure must not take the engine down
            logger.exception("AsymVLM: deciding request %s failed; it runs unpruned", request_id)
            return RequestDecision(error=f"deciding failed: {type(e).__name__}: {e}")
        if decision.error is None and self._asymvlm_family.uses_mrope and state.mrope_positions is not None:
            positions = state.mrope_positions[:, : len(state.prompt_token_ids)]
            decision.mrope_positions = positions.tolist()
            decision.mrope_next_position = len(state.prompt_token_ids) + int(state.mrope_position_delta)
        return decision

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
        if not (self._asymvlm_pending or self._text_choices) or output is None:
            return output
        target = getattr(output, "_model_runner_output", output)  # the async wrapper holds the real one
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if target is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(target, ModelRunnerOutput):
            return output  # keep them for the step's real output
        if self._asymvlm_pending:
            target.asymvlm_decisions, self._asymvlm_pending = self._asymvlm_pending, {}
        if self._text_choices:
            target.asymvlm_evictions, self._text_choices = self._text_choices, {}
        return output

    def execute_model(self, *args: Any, **kwargs: Any):
        output = super().execute_model(*args, **kwargs)
        if self._text_due:
            try:
                self._text_evict()
            except Exception:  # one step's eviction failing must not take the engine down
                logger.exception("AsymVLM: choosing blocks to evict failed; nothing is evicted in this step")
        return self._attach_decisions(output)

    def sample_tokens(self, *args: Any, **kwargs: Any):
        return self._attach_decisions(super().sample_tokens(*args, **kwargs))
