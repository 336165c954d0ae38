"""A simulated model runner for vLLM's real scheduler: scheduler-level tests and benchmarks.

vLLM's scheduler, KV cache manager, block pool and encoder-cache manager are plain Python and
run on any machine. What they need from a GPU is a model runner's answer to each
``SchedulerOutput``: one sampled token per request whose prefill completes (or that is
decoding) and, under AsymVLM, a pruning decision for each probed request. This module gives:

* :func:`build_scheduler` -- the real ``Scheduler`` / ``AsyncScheduler`` (or
  :class:`~asymvlm_vllm.engine.scheduler.AsymVLMScheduler`) with a KV pool of any size, built
  from a tiny local model config (no weights, no network);
* :func:`make_request` -- a vLLM ``Request`` with image placeholder spans;
* :class:`SimulatedRunner` -- the model runner's side of the protocol, deterministic per seed,
  text eviction included (random importance, the real runner's choice rule and bookkeeping);
* :func:`drive` -- the engine core's loop, with the one-step output lag of async scheduling.

Example
-------
>>> sched = build_scheduler(num_blocks=64, block_size=16, asymvlm_config={})
>>> runner = SimulatedRunner(sched, keep_ratio=0.5, rng_seed=0)
>>> req = make_request(sched, "r0", text=[5, 6, 7], images=[(1, 32, "img0")], max_tokens=4)
>>> result = drive(sched, runner, [req])
>>> result.finished["r0"].kv_transfer_params["asymvlm"]["vision_tokens_kept"]
16

vLLM must see ``VLLM_TARGET_DEVICE=cpu`` on a machine without a GPU; :func:`build_scheduler`
sets it (without overriding) before it imports vLLM.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from ..core.budget import num_tokens_to_keep
from ..core.request_options import request_options_from_extra_args
from .protocol import ImageDecision, RequestDecision

__all__ = [
    "IMAGE_TOKEN_ID",
    "PAPER_GAP_MEAN",
    "PAPER_GAP_STD",
    "SAMPLED_TOKEN_ID",
    "DriveResult",
    "SimulatedRunner",
    "SimulationError",
    "build_scheduler",
    "drive",
    "make_request",
    "model_dir",
    "paper_gap",
]

IMAGE_TOKEN_ID = 999
"""Placeholder token id of the simulated images (the tiny config's vocabulary has 1,000)."""
SAMPLED_TOKEN_ID = 7
"""Token the simulated runner samples (never the config's EOS, 2)."""
PAPER_GAP_MEAN, PAPER_GAP_STD = 0.218, 0.047
"""The paper's DocVQA importance-gap distribution."""


def paper_gap(rng: np.random.Generator) -> float:
    """One importance gap drawn from the paper's N(0.218, 0.047), clipped at 0."""
    return max(0.0, float(rng.normal(PAPER_GAP_MEAN, PAPER_GAP_STD)))


# ---------------------------------------------------------------------------------- config


@lru_cache(maxsize=None)
def model_dir(architecture: str | None = "Phi3VForCausalLM") -> str:
    """A temporary folder holding a tiny OPT ``config.json`` (no weights), made once per process.

    vLLM builds the text-only OPT model config from it, so the scheduler has no multimodal
    budget of its own (:func:`build_scheduler` sets one). ``architecture``, when given, is
    listed second in ``architectures``: vLLM resolves the first one it supports (OPT), while
    AsymVLM's family lookup (:func:`~asymvlm_vllm.engine.families.family_for`) finds the
    vision-language architecture there and treats the model as one it can prune.
    """
    folder = tempfile.mkdtemp(prefix="asymvlm-sim-model-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    architectures = ["OPTForCausalLM"] + ([architecture] if architecture else [])
    config = {
        "architectures": architectures, "model_type": "opt", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "ffn_dim": 128, "vocab_size": 1000, "max_position_embeddings": 65536,
        "word_embed_proj_dim": 64, "do_layer_norm_before": True, "torch_dtype": "float16",
        "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


@lru_cache(maxsize=64)
def _vllm_config(block_size: int, async_scheduling: bool, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, enable_prefix_caching: bool, asymvlm_json: str | None,
                 architecture: str | None):
    # VllmConfig takes a few hundred ms to build: episodes that share the settings share it
    # (nothing in the scheduler writes to it); the KV pool size lives in the KVCacheConfig.
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
        enable_chunked_prefill=True, async_scheduling=async_scheduling, is_encoder_decoder=False)
    model_config = ModelConfig(model=model_dir(architecture), skip_tokenizer_init=True, dtype="float16", seed=0,
                               max_model_len=max_model_len)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    cache_config.num_gpu_blocks = 1  # only checked > 0: the pool is the KVCacheConfig's
    additional = {"asymvlm": json.loads(asymvlm_json)} if asymvlm_json is not None else {}
    config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache_config,
                        additional_config=additional)
    # VllmConfig may turn async scheduling off for the platform; the scheduler class decides here.
    config.scheduler_config.async_scheduling = async_scheduling
    return config


def build_scheduler(
    num_blocks: int,
    block_size: int = 16,
    asymvlm_config: dict | None = None,
    async_scheduling: bool = False,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    enable_prefix_caching: bool = True,
    encoder_cache_size: int | None = None,
    max_num_encoder_input_tokens: int | None = None,
    max_model_len: int = 16384,
    architecture: str | None = "Phi3VForCausalLM",
    log_stats: bool = False,
):
    """vLLM's real scheduler with a KV pool of ``num_blocks`` blocks (one is vLLM's null block).

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool, vLLM's null block included (so ``num_blocks - 1`` are usable).
    block_size : int
        Tokens per KV block.
    asymvlm_config : dict or None
        ``None``: plain vLLM (``Scheduler`` or ``AsyncScheduler``). Otherwise an
        :class:`~asymvlm_vllm.core.config.AsymVLMConfig` mapping (``{}`` for the defaults),
        placed in ``additional_config["asymvlm"]``, and the scheduler is an
        :class:`~asymvlm_vllm.engine.scheduler.AsymVLMScheduler` (its async variant when
        ``async_scheduling``).
    async_scheduling : bool
        Build the async variant; drive it with :func:`drive`, which delivers each step's
        output after the next step was scheduled, as vLLM's engine core does.
    max_num_batched_tokens, max_num_seqs, enable_prefix_caching, max_model_len
        vLLM's scheduler settings of those names.
    encoder_cache_size, max_num_encoder_input_tokens : int or None
        Encoder-cache capacity and per-step encoder budget, in embeddings; default
        ``max_num_batched_tokens`` each (vLLM's default for a model whose images fit one step),
        and with AsymVLM the default cache grows by the scheduler's room for pruning, as in a
        real engine. A given ``encoder_cache_size`` is the cache exactly, plugin or not.
    architecture : str or None
        Vision-language architecture the model claims for AsymVLM (see :func:`model_dir`).
    log_stats : bool
        vLLM's scheduler statistics (off: faster).

    Returns
    -------
    vllm.v1.core.sched.scheduler.Scheduler
        With an extra attribute ``block_hasher`` for :func:`make_request`.
    """
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch
    from vllm.utils.hashing import sha256
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    if num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
    asymvlm_json = None if asymvlm_config is None else json.dumps(asymvlm_config, sort_keys=True)
    vllm_config = _vllm_config(block_size, async_scheduling, max_num_batched_tokens, max_num_seqs, max_model_len,
                               enable_prefix_caching, asymvlm_json, architecture)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    if asymvlm_config is None:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler

        cls = AsyncScheduler if async_scheduling else Scheduler
    else:
        from .scheduler import AsymVLMScheduler as cls  # its __new__ picks the async variant

    scheduler = cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                    structured_output_manager=StructuredOutputManager(vllm_config), block_size=block_size,
                    log_stats=log_stats)
    # The OPT config has no multimodal budget: give the scheduler the one a VLM would have.
    scheduler.max_num_encoder_input_tokens = max_num_encoder_input_tokens or max_num_batched_tokens
    scheduler.encoder_cache_manager = EncoderCacheManager(cache_size=encoder_cache_size or max_num_batched_tokens)
    if asymvlm_config is not None and encoder_cache_size is None:
        scheduler._grow_encoder_cache()  # as its __init__ does with a VLM's budget
    init_none_hash(sha256)
    scheduler.block_hasher = get_request_block_hasher(block_size, sha256)
    return scheduler


def make_request(
    scheduler,
    request_id: str,
    text: Sequence[int] | None = None,
    images: Sequence[tuple[int, int, str]] = (),
    max_tokens: int = 4,
    extra_args: dict[str, Any] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
):
    """A vLLM ``Request`` whose prompt holds image placeholder spans.

    Parameters
    ----------
    scheduler : from :func:`build_scheduler` (its ``block_hasher`` hashes the blocks)
    request_id : str
    text : sequence of int
        The prompt's text tokens; images are inserted between them.
    images : sequence of (offset, num_tokens, identifier)
        Each image's offset *in the final prompt*, its placeholder count and its
        encoder-cache identifier (equal identifiers = the same image). Ascending offsets.
    max_tokens : int
        Tokens to generate (the simulated runner never samples EOS).
    extra_args : dict, optional
        ``SamplingParams.extra_args`` (e.g. ``{"asymvlm_keep_ratio": 0.5}``).
    prompt_token_ids : sequence of int, optional
        The whole prompt instead of ``text`` (placeholders already in it).
    """
    from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    if prompt_token_ids is None:
        remaining = list(text or [])
        prompt: list[int] = []
        for offset, length, _ in images:
            take = offset - len(prompt)
            if take < 0 or take > len(remaining):
                raise ValueError(f"image offset {offset} does not fit the text and earlier images")
            prompt += remaining[:take] + [IMAGE_TOKEN_ID] * length
            remaining = remaining[take:]
        prompt += remaining
    else:
        prompt = list(prompt_token_ids)
    features = [
        MultiModalFeatureSpec(data=MultiModalKwargsItem.dummy(1), modality="image", identifier=identifier,
                              mm_position=PlaceholderRange(offset=offset, length=length))
        for offset, length, identifier in images
    ]
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra_args)
    return Request(request_id, prompt, params, None, mm_features=features or None,
                   block_hasher=scheduler.block_hasher)


# ---------------------------------------------------------------------------------- runner

KeepRatio = float | Callable[[Any, int, float], float] | None


class SimulationError(AssertionError):
    """The scheduler sent the runner something a real model runner could not execute."""


@dataclass
class _RequestView:
    """What the runner knows of a request: the features it was last sent, and its progress."""

    mm_features: list[Any]
    original_rows: list[int]
    num_computed_tokens: int = 0


class SimulatedRunner:
    """The model runner's half of a step, without a model.

    For each scheduled request whose step completes its prompt (vLLM's own test:
    ``not request.is_prefill_chunk``, set when the step was scheduled) it samples one token,
    :data:`SAMPLED_TOKEN_ID`; for each probe in ``scheduler_output.asymvlm`` it returns a
    :class:`~asymvlm_vllm.engine.protocol.RequestDecision` on the output's
    ``asymvlm_decisions``, as the AsymVLM model runner does.

    With ``check_encoder_cache`` it also keeps a model of the runner's encoder cache, applied
    in the real runner's order (plan ``materialize`` → ``free_encoder_mm_hashes`` → encoder
    runs for ``scheduled_encoder_inputs``, pruned identifiers stored with their kept rows only
    → gather), and raises :class:`SimulationError` where the real runner would fail: a
    scheduled placeholder range whose embeddings are not cached, or cached with a row count
    other than the span's, or a probe whose images are not in the cache.

    Parameters
    ----------
    scheduler : the scheduler whose outputs this runner executes (requests are read from
        ``scheduler.requests``, so call :meth:`step` right after ``schedule()``, before the
        next ``schedule()``; :func:`drive` does)
    keep_ratio : float, callable or None
        Each image's keep ratio. A float: that ratio for every image. A callable
        ``(request, feature_index, gap) -> ratio``. ``None``: the scheduler's configured
        budget rule (``asymvlm_config.vision.budget``) applied to the drawn gap, honouring the
        request's own options (``asymvlm_keep_ratio``, ``asymvlm_budget``), as the real runner does.
    gap_model : callable
        ``rng -> gap``: each image's importance gap; default :func:`paper_gap`.
    min_keep : int or None
        Floor on kept rows per image; default the request's option, else the config's.
    error_rate, missing_rate : float
        Probability that a probe's decision carries ``error`` / is not returned at all.
    rng_seed : int
        Seed. Each request's draws come from a generator seeded by ``(rng_seed, request id)``,
        so decisions do not depend on the order in which requests happen to be probed.
    check_encoder_cache : bool
        Model the runner's encoder cache and raise on misses (see above).
    structural_rows : callable or None
        ``num_rows -> row indices`` of an image's structure rows (Phi-3-V's separators), always
        kept, as the real runner keeps them; the keep ratio applies to the other rows.

    Attributes
    ----------
    decisions : dict
        Request id -> the last decision returned for it.
    num_steps : int
        Steps executed (empty ones included).
    encoder_cache : dict
        The modelled encoder cache: identifier -> rows stored.
    """

    def __init__(self, scheduler, keep_ratio: KeepRatio = None, gap_model: Callable[[np.random.Generator], float] = paper_gap,
                 min_keep: int | None = None, error_rate: float = 0.0, missing_rate: float = 0.0, rng_seed: int = 0,
                 check_encoder_cache: bool = True,
                 structural_rows: Callable[[int], Sequence[int]] | None = None) -> None:
        if isinstance(keep_ratio, (int, float)) and not 0.0 < float(keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.scheduler = scheduler
        self.keep_ratio = keep_ratio
        self.gap_model = gap_model
        self.min_keep = min_keep
        self.error_rate = error_rate
        self.missing_rate = missing_rate
        self.rng_seed = rng_seed
        self.check_encoder_cache = check_encoder_cache
        self.structural_rows = structural_rows
        self.decisions: dict[str, RequestDecision] = {}
        self.num_steps = 0
        self.encoder_cache: dict[str, int] = {}
        self._keep: dict[str, Any] = {}
        self._views: dict[str, _RequestView] = {}
        self._text: dict[str, tuple[Any, int]] = {}  # request id -> (BlockEviction, prompt tokens)
        self._block_ids: dict[str, list[list[int]]] = {}
        self.evictions: list[tuple[str, Any]] = []

    def _rng(self, request_id: str) -> np.random.Generator:
        return np.random.default_rng([self.rng_seed, zlib.crc32(request_id.encode())])

    def decide(self, request, features: Sequence[int], options: Mapping[str, Any] | None = None) -> RequestDecision | None:
        """The decision for a probe of ``request``'s images ``features`` (None: no answer)."""
        rng = self._rng(request.request_id)
        if rng.random() < self.missing_rate:
            return None
        if rng.random() < self.error_rate:
            return RequestDecision(error="simulated scoring failure")
        opts = request_options_from_extra_args(options)
        config = getattr(self.scheduler, "asymvlm_config", None)
        rule = opts.budget_rule(config.vision.budget) if config is not None else None
        min_keep = self.min_keep or opts.min_keep or (config.vision.min_keep if config is not None else 1)
        images = []
        for index in features:
            num_rows = request.mm_features[index].mm_position.get_num_embeds()
            gap = self.gap_model(rng)
            if self.keep_ratio is None:
                if rule is None:
                    raise ValueError("keep_ratio=None needs an AsymVLM scheduler (its budget rule)")
                ratio = rule.keep_ratio(gap)
            elif callable(self.keep_ratio):
                ratio = float(self.keep_ratio(request, index, gap))
            else:
                ratio = float(self.keep_ratio)
            structure = set(self.structural_rows(num_rows)) if self.structural_rows is not None else set()
            prunable = np.array([r for r in range(num_rows) if r not in structure], dtype=np.int64)
            k = num_tokens_to_keep(len(prunable), ratio, min(min_keep, len(prunable))) if len(prunable) else 0
            chosen = rng.choice(prunable, size=k, replace=False).tolist() if k < len(prunable) else prunable.tolist()
            rows = sorted(structure | set(chosen))
            images.append(ImageDecision(feature=index, num_rows=num_rows, num_prunable=len(prunable), keep_rows=rows,
                                        gap=gap, budget_ratio=ratio))
        return RequestDecision(images=images)

    # ------------------------------------------------------------------ encoder-cache model
    def _track(self, scheduler_output) -> dict[str, int]:
        """Update the runner-side view; returns request id -> tokens computed before this step."""
        plan = getattr(scheduler_output, "asymvlm", None)
        for request_id in scheduler_output.finished_req_ids:
            self._views.pop(request_id, None)
        if plan is not None:
            self._keep.update(plan.materialize)
            for identifier, how in plan.materialize.items():
                if identifier not in self.encoder_cache and self.encoder_cache.get(how.source) == how.num_rows:
                    self.encoder_cache[identifier] = len(how.keep_rows)
        for identifier in scheduler_output.free_encoder_mm_hashes:
            self._keep.pop(identifier, None)
            self.encoder_cache.pop(identifier, None)
        before: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            features = list(new.mm_features or [])
            view = self._views.get(new.req_id)
            original = view.original_rows if view is not None else [f.mm_position.get_num_embeds() for f in features]
            self._views[new.req_id] = _RequestView(features, original, new.num_computed_tokens)
            before[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for request_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            before[request_id] = computed
            if request_id in self._views:
                self._views[request_id].num_computed_tokens = computed
        for request_id, indices in scheduler_output.scheduled_encoder_inputs.items():
            view = self._views.get(request_id)
            if view is None:
                raise SimulationError(f"encoder inputs scheduled for {request_id}, which the runner was never sent")
            for index in indices:
                identifier = view.mm_features[index].identifier
                rows = view.original_rows[index]  # the encoder always sees the whole image
                how = self._keep.get(identifier)
                if how is not None and how.num_rows == rows:
                    rows = len(how.keep_rows)
                self.encoder_cache[identifier] = rows
        return before

    def _check_gather(self, scheduler_output, before: Mapping[str, int]) -> None:
        for request_id, n in scheduler_output.num_scheduled_tokens.items():
            view = self._views.get(request_id)
            start = before.get(request_id)
            if view is None or start is None:
                raise SimulationError(f"{request_id} scheduled but the runner has no state for it")
            for index, feature in enumerate(view.mm_features):
                position = feature.mm_position
                if position.offset >= start + n:
                    break
                if position.offset + position.length <= start:
                    continue
                rows = self.encoder_cache.get(feature.identifier)
                if rows is None:
                    raise SimulationError(f"encoder cache miss: {request_id} image {index} ({feature.identifier}) "
                                          f"is needed by tokens [{start}, {start + n}) but is not cached")
                if rows != position.get_num_embeds():
                    raise SimulationError(f"{request_id} image {index} ({feature.identifier}): {rows} rows cached for "
                                          f"{position.get_num_embeds()} placeholders")

    # ------------------------------------------------------------------ text eviction
    def _track_blocks(self, scheduler_output) -> dict[str, int]:
        """The runner's block ids per request, as vLLM's runner keeps them; returns request id
        -> tokens computed before this step."""
        plan = getattr(scheduler_output, "asymvlm", None)
        for request_id in scheduler_output.finished_req_ids:
            self._block_ids.pop(request_id, None)
            self._text.pop(request_id, None)
        before = {}
        for new in scheduler_output.scheduled_new_reqs:
            self._block_ids[new.req_id] = [list(g) for g in new.block_ids]
            before[new.req_id] = new.num_computed_tokens
            policy = plan.text.get(new.req_id) if plan is not None else None
            if policy is None:
                self._text.pop(new.req_id, None)
            else:
                self._text[new.req_id] = (policy, len(new.prompt_token_ids))
        cached = scheduler_output.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            before[request_id] = cached.num_computed_tokens[i]
            new_ids = cached.new_block_ids[i]
            if request_id in cached.resumed_req_ids:
                self._block_ids[request_id] = [list(g) for g in new_ids]
            elif new_ids is not None:
                for ids, more in zip(self._block_ids[request_id], new_ids):
                    ids.extend(more)
        return before

    def _evict(self, scheduler_output, before: Mapping[str, int]) -> dict[str, Any]:
        """The real runner's rule (:mod:`asymvlm_vllm.engine.text_eviction`) with random
        importance: holes right away in the runner's block ids, the choice on the output."""
        import math

        from .text_eviction import EvictionChoice

        choices = {}
        group = getattr(self.scheduler, "_text_full_group", 0)
        for request_id, n in scheduler_output.num_scheduled_tokens.items():
            if request_id not in self._text or not n:
                continue
            policy, num_prompt = self._text[request_id]
            bs = policy.block_size
            num_tokens = before[request_id] + n
            ids = self._block_ids[request_id][group][: math.ceil(num_tokens / bs)]
            live = [i for i, b in enumerate(ids) if b != 0]
            num_live = num_tokens - bs * (len(ids) - len(live))
            if num_live - num_prompt <= policy.budget:
                continue
            import torch

            rng = self._rng(f"{request_id}:{num_tokens}")
            importance = torch.tensor(rng.random(len(live)), dtype=torch.float32)
            chosen = policy.evict_generated_blocks(importance, num_prompt, num_live).tolist()
            if not chosen:
                continue
            logical = [live[i] for i in chosen]
            physical = [self._block_ids[request_id][group][i] for i in logical]
            for ids_of_group in self._block_ids[request_id]:
                for i in logical:
                    if i < len(ids_of_group):
                        ids_of_group[i] = 0
            choices[request_id] = EvictionChoice(logical, physical, group, num_live, importance.tolist())
            self.evictions.append((request_id, choices[request_id]))
        return choices

    def step(self, scheduler_output):
        """Execute one scheduled step: a ``ModelRunnerOutput`` (with ``asymvlm_decisions`` and
        ``asymvlm_evictions``)."""
        from vllm.v1.outputs import ModelRunnerOutput

        self.num_steps += 1
        computed_before = self._track_blocks(scheduler_output)
        if self.check_encoder_cache:
            before = self._track(scheduler_output)
            self._check_gather(scheduler_output, before)
        ids = list(scheduler_output.num_scheduled_tokens)
        sampled = []
        for request_id in ids:
            request = self.scheduler.requests.get(request_id)
            done = request is not None and not request.is_prefill_chunk
            sampled.append([SAMPLED_TOKEN_ID] if done else [])
        output = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                   sampled_token_ids=sampled)
        plan = getattr(scheduler_output, "asymvlm", None)
        decisions = {}
        for request_id, spec in (plan.probes.items() if plan is not None else ()):
            request = self.scheduler.requests.get(request_id)
            if request is None:
                continue
            if self.check_encoder_cache:
                view = self._views[request_id]
                missing = [i for i in spec.features if self.encoder_cache.get(view.mm_features[i].identifier)
                           != view.original_rows[i]]
                if missing:
                    raise SimulationError(f"probe of {request_id}: images {missing} are not in the encoder cache")
            decision = self.decide(request, spec.features, spec.options)
            if decision is not None:
                decisions[request_id] = self.decisions[request_id] = decision
        if decisions:
            output.asymvlm_decisions = decisions
        evictions = self._evict(scheduler_output, computed_before)
        if evictions:
            output.asymvlm_evictions = evictions
        return output


# ---------------------------------------------------------------------------------- loop


@dataclass
class DriveResult:
    """What :func:`drive` saw.

    Attributes
    ----------
    num_steps : int
        ``schedule()`` calls.
    num_model_steps : int
        Steps that scheduled at least one token.
    finished : dict
        Request id -> its final ``EngineCoreOutput`` (the one with ``finish_reason``).
    tokens : dict
        Request id -> tokens it received.
    peak_running : int
        Most requests in ``scheduler.running`` after any ``schedule()`` (vLLM's running queue:
        partly prefilled and probing requests included).
    peak_decoding : int
        Most running requests with their whole prompt computed (KV-resident and generating)
        after any ``schedule()``.
    peak_blocks_in_use : int
        Most KV blocks in use (pool size less free blocks, null block excluded) after any
        ``schedule()``.
    peak_blocks : dict
        Request id -> most KV blocks it held after any ``schedule()``.
    scheduled_tokens : dict
        Request id -> prompt/decode tokens scheduled for it, summed over steps.
    """

    num_steps: int = 0
    num_model_steps: int = 0
    finished: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    peak_running: int = 0
    peak_decoding: int = 0
    peak_blocks_in_use: int = 0
    peak_blocks: dict[str, int] = field(default_factory=dict)
    scheduled_tokens: dict[str, int] = field(default_factory=dict)


def _blocks_of(scheduler) -> Callable[[str], int]:
    """Request id -> KV blocks it holds (evicted blocks, null-block holes, not counted)."""
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    records = getattr(scheduler, "_text", {})

    def holes(request_id: str) -> int:
        record = records.get(request_id)
        return record.holes * len(managers) if record is not None else 0

    if len(managers) == 1:
        req_to_blocks = managers[0].req_to_blocks
        return lambda request_id: len(req_to_blocks.get(request_id, ())) - holes(request_id)
    return lambda request_id: sum(len(m.req_to_blocks.get(request_id, ())) for m in managers) - holes(request_id)


def drive(
    scheduler,
    runner: SimulatedRunner,
    requests: Iterable[Any] = (),
    *,
    arrivals: Mapping[int, Iterable[Any]] | None = None,
    before_schedule: Callable[[int], None] | None = None,
    after_schedule: Callable[[int, Any, Any], None] | None = None,
    after_update: Callable[[int, Any, dict], None] | None = None,
    max_steps: int = 1_000_000,
    track_blocks: bool = True,
) -> DriveResult:
    """Run the engine core's loop until every request is done.

    Sync schedulers: ``schedule()`` → ``runner.step()`` → ``update_from_output()`` per step.
    Async schedulers (``scheduler_config.async_scheduling``): vLLM's batch queue of two, as in
    ``EngineCore.step_with_batch_queue``: step *t*'s output reaches ``update_from_output``
    after step *t+1* was scheduled (at once when nothing else can be scheduled).

    Parameters
    ----------
    requests : added before the first step
    arrivals : step index -> requests added right before that ``schedule()``
    before_schedule : ``(step)``, called before each ``schedule()`` (e.g. to abort requests)
    after_schedule : ``(step, scheduler_output, model_runner_output)``, right after the
        runner executed the step (its output not yet delivered)
    after_update : ``(step, scheduler_output, engine_core_outputs)`` after each
        ``update_from_output`` (``step`` is the step whose output was delivered)
    max_steps : raise ``RuntimeError`` after this many ``schedule()`` calls
    track_blocks : record :attr:`DriveResult.peak_blocks` (a little slower)

    Returns
    -------
    DriveResult
    """
    result = DriveResult()
    for request in requests:
        scheduler.add_request(request)
    pending = {int(k): list(v) for k, v in (arrivals or {}).items()}
    async_scheduling = bool(scheduler.scheduler_config.async_scheduling)
    queue: deque = deque()
    blocks_of = _blocks_of(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    step = 0

    def deliver() -> None:
        step_index, scheduler_output, runner_output = queue.pop()
        outputs = scheduler.update_from_output(scheduler_output, runner_output)
        for engine_outputs in outputs.values():
            for out in engine_outputs.outputs:
                result.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    if out.request_id in result.finished:
                        raise AssertionError(f"request {out.request_id} finished twice")
                    result.finished[out.request_id] = out
        if after_update is not None:
            after_update(step_index, scheduler_output, outputs)

    while True:
        for request in pending.pop(step, ()):
            scheduler.add_request(request)
        if before_schedule is not None:
            before_schedule(step)
        more_arrivals = any(k > step for k in pending)
        if not scheduler.has_requests() and not queue:
            if not more_arrivals:
                break
            step += 1
            continue
        if scheduler.has_requests():
            if step >= max_steps:
                raise RuntimeError(f"drive: not done after {max_steps} steps")
            scheduler_output = scheduler.schedule()
            runner_output = runner.step(scheduler_output)
            result.num_steps += 1
            executed = scheduler_output.total_num_scheduled_tokens > 0
            result.num_model_steps += executed
            result.peak_running = max(result.peak_running, len(scheduler.running))
            decoding = sum(1 for r in scheduler.running if r.num_computed_tokens >= r.num_prompt_tokens)
            result.peak_decoding = max(result.peak_decoding, decoding)
            in_use = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
            result.peak_blocks_in_use = max(result.peak_blocks_in_use, in_use)
            for request_id, n in scheduler_output.num_scheduled_tokens.items():
                result.scheduled_tokens[request_id] = result.scheduled_tokens.get(request_id, 0) + n
            if track_blocks:
                peak = result.peak_blocks
                for request in scheduler.running:
                    n = blocks_of(request.request_id)
                    if n > peak.get(request.request_id, 0):
                        peak[request.request_id] = n
            if after_schedule is not None:
                after_schedule(step, scheduler_output, runner_output)
            queue.appendleft((step, scheduler_output, runner_output))
            step += 1
            if async_scheduling and len(queue) < 2 and (executed or scheduler.has_requests()):
                continue
        else:
            step += 1
        deliver()
    return result
