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
from typing import Any

import torch

from ..core.budget import BudgetRule
from ..core.config import AsymVLMConfig
from ..core.errors import AsymVLMError
from ..core.positions import text_query_mask
from ..core.request_options import RequestOptions
from ..core.selection import decide_vision_pruning
from .families import VisionFamily, family_for
from .protocol import ImageDecision, Materialize, RequestDecision, StepPlan
from .settings import asymvlm_config_from

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
    images = []
    for index in feature_indices:
        feature = mm_features[index]
        rows = encoder_outputs.get(feature.identifier)
        if rows is None:
            return RequestDecision(error=f"image {index}'s encoder output is not in the encoder cache")
        rows = rows.reshape(-1, rows.shape[-1])
        structural = family.structural_rows(model, rows)
        prunable = (~structural).nonzero().flatten()
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
    return RequestDecision(images=images, scoring_seconds=time.perf_counter() - started)


class AsymVLMRunnerMixin:
    """Mixed in front of vLLM's V1 ``GPUModelRunner`` (or ``CPUModelRunner``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asymvlm_config = asymvlm_config_from(self.vllm_config)
        self._asymvlm_family = family_for(self.model_config.hf_config)
        self._asymvlm_ranker = None
        self._asymvlm_plan: StepPlan | None = None
        self._asymvlm_keep: dict[str, Materialize] = {}
        self._asymvlm_pending: dict[str, RequestDecision] = {}

    def load_model(self, *args: Any, **kwargs: Any):
        result = super().load_model(*args, **kwargs)
        # A scorer file that does not fit this model stops start-up here, with the file's name.
        hidden = self.model_config.get_hidden_size()
        self._asymvlm_ranker = self.asymvlm_config.vision.make_ranker(expected_hidden_size=hidden)
        return result

    # -------------------------------------------------------------- plan intake
    def _update_states(self, scheduler_output: Any):
        plan = getattr(scheduler_output, "asymvlm", None)
        self._asymvlm_plan = plan if isinstance(plan, StepPlan) else None
        if self._asymvlm_plan is not None:
            self._asymvlm_keep.update(self._asymvlm_plan.materialize)
            for identifier, how in self._asymvlm_plan.materialize.items():
                self._materialize(identifier, how)
        for identifier in scheduler_output.free_encoder_mm_hashes:
            self._asymvlm_keep.pop(identifier, None)
        return super()._update_states(scheduler_output)

    def _materialize(self, identifier: str, how: Materialize) -> None:
        if identifier in self.encoder_cache:
            return
        source = self.encoder_cache.get(how.source)
        if source is not None and source.shape[0] == how.num_rows:
            index = torch.tensor(how.keep_rows, dtype=torch.long, device=source.device)
            self.encoder_cache[identifier] = source.index_select(0, index)

    def _cache_encoder_output(self, mm_hash: str, output: torch.Tensor, *args: Any, **kwargs: Any):
        how = self._asymvlm_keep.get(mm_hash)
        if how is not None and output.shape[0] == how.num_rows and len(how.keep_rows) != how.num_rows:
            output = output.index_select(0, torch.tensor(how.keep_rows, dtype=torch.long, device=output.device))
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
                    self.encoder_cache, RequestOptions.model_validate(spec.options), self.device,
                )
        except (AsymVLMError, ValueError) as e:
            return RequestDecision(error=str(e))
        if decision.error is None and self._asymvlm_family.uses_mrope and state.mrope_positions is not None:
            positions = state.mrope_positions[:, : len(state.prompt_token_ids)]
            decision.mrope_positions = positions.tolist()
            decision.mrope_next_position = len(state.prompt_token_ids) + int(state.mrope_position_delta)
        return decision

    # -------------------------------------------------------------- answer
    def _attach_decisions(self, output: Any) -> Any:
        if not self._asymvlm_pending or output is None:
            return output
        target = getattr(output, "_model_runner_output", output)  # the async wrapper holds the real one
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if target is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(target, ModelRunnerOutput):
            return output  # keep them for the step's real output
        target.asymvlm_decisions, self._asymvlm_pending = self._asymvlm_pending, {}
        return output

    def execute_model(self, *args: Any, **kwargs: Any):
        return self._attach_decisions(super().execute_model(*args, **kwargs))

    def sample_tokens(self, *args: Any, **kwargs: Any):
        return self._attach_decisions(super().sample_tokens(*args, **kwargs))
