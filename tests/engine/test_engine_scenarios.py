"""AsymVLM in the real engine (in-process, CPU, tiny random models) under conditions that the
one-batch tests of ``test_asymvlm_engine.py`` do not reach.

Every answer is compared token for token (greedy, EOS ignored) with a run that did not go through
the condition, and every engine's KV blocks must all come back.

1. **Same image, two questions, one batch**: two keep sets, two pruned identifiers; each answer
   equals the request run alone; the first request run again gives the same tokens and outcome and
   reuses its pruned blocks from the prefix cache.
2. **Chunked prefill of a pruned prompt** (``max_num_batched_tokens`` 32 < the pruned prompt):
   the same answer as the engine that prefills it in one step.
3. **Preemption** of pruned requests (a 7-block KV pool) and **abort** while the probe step is
   in flight and between the rewrite and the re-admission: same answers, nothing left behind.
   vLLM's CPU engine schedules synchronously (its platform turns async scheduling off), so one
   ``LLMEngine.step()`` runs the probe *and* applies its decision: after ``add_request`` and one
   step the request already waits rewritten. An abort during the probe is delivered from inside
   the step instead, before the scheduler reads the runner's output (where an async engine's
   abort lands). For the same reason a request cannot be preempted while probing here.
4. **A pruned encoder-cache entry evicted between rewrite and re-admission** (a test hook evicts
   it right after the rewrite; under preemption in 3. it also happens without hooks): the
   encoder runs again for the pruned identifier, the runner slices its output, and the answer
   is unchanged.
5. **Edge prompts**: ``min_keep`` above the image's token count (kept == tokens, no rewrite, the
   unpruned answer); an empty question (the chat template's text is the query: pruned); a prompt
   of the image token alone (no text to score against: status ``error``, unpruned).
6. **Every outcome status the engine can produce**, each once: ``off``, ``prefix_cached``,
   ``too_large``, ``unsupported_modality`` (tiny Qwen2.5-VL with an image and a video; LLaVA
   takes images only), ``invalid_options`` (a request that bypassed the front end's validator)
   and ``error`` (an exception while deciding: the request runs unpruned and the engine keeps
   serving). ``pruned`` is everywhere else. Not here: ``unsupported_model`` (every tiny family is
   supported; a supported architecture cannot produce it) and ``unsupported_option``
   (``test_sampling_options.py``).
7. **Gemma 3's bidirectional image attention**: vLLM's CPU attention backend ignores the
   ``mm_prefix`` ranges (``CPUAttentionMetadataBuilder.build`` never reads
   ``CommonAttentionMetadata.mm_req_doc_ranges``), so the CPU engine is causal over images. The
   tests show that (replacing the ranges changes nothing; the engine equals the causal
   transformers reference, not the bidirectional one) and check separately that the range vLLM
   hands to the backend for the pruned request, applied as an attention mask in transformers,
   gives exactly the reference path's bidirectional answer over the pruned span.

Engines (built on first use, all freed at module end): ``llava`` (uniform 0.5, 512 batched
tokens), ``llava_small`` (the same config, 32 batched tokens with chunked prefill, so a 64-row
encoder budget, vLLM's own 64-row encoder cache (``encoder_cache_room: 0``), a pool of 7 usable
KV blocks and no prefix caching),
``gemma3`` and ``qwen2_5_vl``.
Every scenario uses its own images, and caches are reset where a cached prefix or encoder output
would make the comparison trivial.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from .helpers import EnginePool, engine_core, engine_image, greedy_params, model_runner, num_free_blocks, scheduler
from .test_asymvlm_engine import MAX_TOKENS, Req, _prompt_text, hf_reference

pytestmark = pytest.mark.slow

BLOCK_SIZE = 32  # make_llm's default
KV_CACHE_BYTES = 16 * 2**20  # 16k tokens of the tiny LLaVA: plenty, and small
PRUNE_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
QUESTION = "What is shown in this picture?"
OTHER_QUESTION = "Which colour is the largest shape in the chart?"
SMALL_BATCH = 32  # < every pruned prompt here (~63 tokens); vLLM wants >= max_num_seqs (4)
SMALL_POOL_BLOCKS = 8  # 7 usable (vLLM keeps one null block)
ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "llava": ("llava", {}),
    # The encoder budget and the encoder cache are max(max_num_batched_tokens, largest item) = 64.
    # No prefix caching: a preempted request recomputes its whole prompt, image rows included.
    "llava_small": ("llava", dict(max_num_batched_tokens=SMALL_BATCH, enable_chunked_prefill=True,
                                  num_gpu_blocks_override=SMALL_POOL_BLOCKS, max_model_len=192,
                                  enable_prefix_caching=False)),
    "gemma3": ("gemma3", {}),
    "qwen2_5_vl": ("qwen2_5_vl", dict(limit_mm_per_prompt={"image": 1, "video": 1})),
}
TIMING_KEYS = ("probe_seconds", "scoring_seconds")


# ---------------------------------------------------------------- what the engine did, by request tag


def _tag(request) -> str | None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get("test_tag")


@dataclass
class Admission:
    req_id: str
    prompt_len: int
    identifiers: list[str]
    offsets: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int


@dataclass
class Trace:
    """Filled by test-only hooks on the scheduler and the runner (installed for this module)."""

    admissions: dict[str, list[Admission]] = field(default_factory=lambda: defaultdict(list))
    scheduled: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # tokens per step
    decisions: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    preemptions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # phase at preemption
    encoder_outputs: list[tuple[str, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Runner ``_cache_encoder_output`` calls for pruned identifiers: (identifier, rows in, input, stored)."""
    prefix_ranges: list[tuple[list[list[str]], dict[int, list[tuple[int, int]]]]] = field(default_factory=list)
    after_rewrite: dict[str, Callable[[Any, Any], None]] = field(default_factory=dict)  # tag -> f(scheduler, request)
    prefix_ranges_override: Callable[[list], dict] | None = None

    def decision(self, tag: str):
        (decision,) = self.decisions[tag]
        return decision


@pytest.fixture(scope="module")
def trace():
    import vllm.v1.worker.gpu_model_runner as gpu_model_runner
    from vllm.v1.core.sched.scheduler import Scheduler

    from asymvlm_vllm.engine.runner import AsymVLMRunnerMixin
    from asymvlm_vllm.engine.scheduler import AsymVLMScheduler

    rec = Trace()
    schedule = Scheduler.schedule
    preempt = Scheduler._preempt_request
    apply_decision = AsymVLMScheduler._apply_decision
    release = AsymVLMScheduler._release
    rewrite = AsymVLMScheduler._rewrite
    cache_encoder_output = AsymVLMRunnerMixin._cache_encoder_output
    prefix_ranges = gpu_model_runner.compute_mm_prefix_ranges

    def schedule_hook(self, *args, **kwargs):
        output = schedule(self, *args, **kwargs)
        for new in output.scheduled_new_reqs:
            tag = _tag(self.requests.get(new.req_id))
            if tag is not None:
                rec.admissions[tag].append(Admission(
                    new.req_id, len(new.prompt_token_ids), [f.identifier for f in new.mm_features],
                    [f.mm_position.offset for f in new.mm_features], new.num_computed_tokens,
                    output.num_scheduled_tokens.get(new.req_id, 0)))
        for req_id, n in output.num_scheduled_tokens.items():
            tag = _tag(self.requests.get(req_id))
            if tag is not None:
                rec.scheduled[tag].append(n)
        return output

    def preempt_hook(self, request, *args, **kwargs):
        tag = _tag(request)
        if tag is not None and not getattr(self, "_test_releasing", False):
            state = self.asymvlm_state(request.request_id) if hasattr(self, "asymvlm_state") else None
            rec.preemptions[tag].append(state.phase if state is not None else "untracked")
        return preempt(self, request, *args, **kwargs)

    def release_hook(self, request, *args, **kwargs):  # the rewrite's own release is no preemption
        self._test_releasing = True
        try:
            return release(self, request, *args, **kwargs)
        finally:
            self._test_releasing = False

    def apply_decision_hook(self, request_id, decision):
        tag = _tag(self.requests.get(request_id))
        if tag is not None:
            rec.decisions[tag].append(decision)
        return apply_decision(self, request_id, decision)

    def rewrite_hook(self, request, *args, **kwargs):
        result = rewrite(self, request, *args, **kwargs)
        action = rec.after_rewrite.get(_tag(request))
        if action is not None:
            action(self, request)
        return result

    def cache_encoder_output_hook(self, mm_hash, output, *args, **kwargs):
        result = cache_encoder_output(self, mm_hash, output, *args, **kwargs)
        if "#asymvlm" in mm_hash:
            rec.encoder_outputs.append((mm_hash, int(output.shape[0]), output.detach().clone(),
                                        self.encoder_cache[mm_hash].detach().clone()))
        return result

    def prefix_ranges_hook(mm_features_per_req, *args, **kwargs):
        result = prefix_ranges(mm_features_per_req, *args, **kwargs)
        rec.prefix_ranges.append(([[f.identifier for f in feats] for feats in mm_features_per_req],
                                  {k: [tuple(r) for r in v] for k, v in result.items()}))
        if rec.prefix_ranges_override is not None:
            return rec.prefix_ranges_override(mm_features_per_req)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "schedule", schedule_hook)
        mp.setattr(Scheduler, "_preempt_request", preempt_hook)
        mp.setattr(AsymVLMScheduler, "_apply_decision", apply_decision_hook)
        mp.setattr(AsymVLMScheduler, "_release", release_hook)
        mp.setattr(AsymVLMScheduler, "_rewrite", rewrite_hook)
        mp.setattr(AsymVLMRunnerMixin, "_cache_encoder_output", cache_encoder_output_hook)
        mp.setattr(gpu_model_runner, "compute_mm_prefix_ranges", prefix_ranges_hook)
        yield rec


# ---------------------------------------------------------------- engines


class _Engines(EnginePool):
    """The engines of :data:`ENGINES`, built on first use and all kept until the module ends."""

    def __init__(self, model_dirs):
        super().__init__(model_dirs)
        self.free_blocks: dict[str, int] = {}

    def __call__(self, name: str):
        if name not in self.llms:
            family, overrides = ENGINES[name]
            config = PRUNE_HALF
            if name == "llava_small":  # vLLM's own encoder-cache size: pruned entries get evicted
                config = {**PRUNE_HALF, "vision": {**PRUNE_HALF.get("vision", {}), "encoder_cache_room": 0}}
            llm = self.build(name, family, config, KV_CACHE_BYTES, **overrides)
            self.free_blocks[name] = num_free_blocks(llm)
        return self.llms[name]


@pytest.fixture(scope="module")
def engines(engine_models, trace):
    with _Engines(engine_models) as pool:
        yield pool


# ---------------------------------------------------------------- requests


def _request(engines, family: str, images: tuple[int, ...], question: str = QUESTION, raw: str | None = None) -> dict:
    prompt = raw if raw is not None else _prompt_text(engines.processor(family), Req("r", images, question))
    out: dict[str, Any] = {"prompt": prompt}
    if images:
        pictures = [engine_image(seed) for seed in images]
        out["multi_modal_data"] = {"image": pictures[0] if len(pictures) == 1 else pictures}
    return out


def _params(tag: str, max_tokens: int = MAX_TOKENS, **extra):
    return greedy_params(max_tokens, extra_args={"test_tag": tag, **extra})


def _generate(llm, prompts: list[dict], params: list) -> list:
    return llm.generate(prompts, params, use_tqdm=False)


def _tokens(output) -> list[int]:
    return list(output.outputs[0].token_ids)


def _outcome(output) -> dict:
    params = output.kv_transfer_params or {}
    assert "asymvlm" in params, f"no AsymVLM outcome: {params}"
    return params["asymvlm"]


def _outcome_without_timing(output) -> dict:
    return {k: v for k, v in _outcome(output).items() if k not in TIMING_KEYS}


def _fresh_caches(llm) -> None:
    """Forget every cached KV block and encoder output, so the next run computes everything."""
    assert llm.reset_prefix_cache()
    engine_core(llm).reset_encoder_cache()


def _drain(llm, max_steps: int = 5000) -> dict[str, Any]:
    """Step the engine until it is idle; the finished ``RequestOutput``s by request id."""
    engine = llm.llm_engine
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError(f"the engine was still busy after {max_steps} steps")


def _assert_idle(engines, name: str) -> None:
    """Nothing of any request is left: requests, KV blocks, AsymVLM records, encoder references."""
    llm = engines(name)
    sched = scheduler(llm)
    assert not sched.requests and not sched.has_unfinished_requests(), list(sched.requests)
    assert num_free_blocks(llm) == engines.free_blocks[name], "KV blocks leaked"
    assert not sched._pruning, f"AsymVLM records left: {list(sched._pruning)}"
    referenced = {h: refs for h, refs in sched.encoder_cache_manager.cached.items() if refs}
    assert not referenced, f"encoder-cache entries still referenced: {referenced}"
    assert not model_runner(llm)._asymvlm_pending, "decisions the scheduler never received"


def _unpruned_run(engines, name: str, prompt: dict, tag: str) -> Any:
    """The same prompt with ``asymvlm: "off"``, on cold caches: what every unpruned status must give."""
    llm = engines(name)
    _fresh_caches(llm)
    (out,) = _generate(llm, [prompt], [_params(tag, asymvlm="off")])
    assert _outcome(out)["status"] == "off"
    return out


# ---------------------------------------------------------------- 1. same image, two questions, one batch


def test_same_image_with_two_questions_in_one_batch(engines, trace):
    llm = engines("llava")
    _fresh_caches(llm)
    first, second = _request(engines, "llava", (10,), QUESTION), _request(engines, "llava", (10,), OTHER_QUESTION)
    a, b = _generate(llm, [first, second], [_params("same/a"), _params("same/b")])
    for out in (a, b):
        assert _outcome(out)["status"] == "pruned"
        assert [(i["tokens"], i["kept"]) for i in _outcome(out)["images"]] == [(64, 32)]
    # Two questions, two keep sets, two pruned identifiers (hence disjoint block hashes).
    keep_a = trace.decision("same/a").images[0].keep_rows
    keep_b = trace.decision("same/b").images[0].keep_rows
    assert keep_a != keep_b
    (probe_a, readmit_a), (probe_b, readmit_b) = trace.admissions["same/a"], trace.admissions["same/b"]
    assert probe_a.identifiers == probe_b.identifiers  # one image, one encoder-cache entry while probing
    assert readmit_a.identifiers != readmit_b.identifiers
    assert all("#asymvlm32of64-" in i for i in readmit_a.identifiers + readmit_b.identifiers)

    # The first request again: the same decision, and its pruned blocks come from the prefix cache.
    (again,) = _generate(llm, [first], [_params("same/a-again")])
    assert _tokens(again) == _tokens(a)
    assert _outcome_without_timing(again) == _outcome_without_timing(a)
    assert trace.decision("same/a-again").images[0].keep_rows == keep_a
    readmitted = trace.admissions["same/a-again"][-1]
    assert readmitted.identifiers == readmit_a.identifiers
    assert readmitted.offsets[0] < BLOCK_SIZE  # so the first block holds pruned image rows
    assert readmitted.num_computed_tokens == again.num_cached_tokens == BLOCK_SIZE, (readmitted, again.num_cached_tokens)
    assert a.num_cached_tokens == 0

    # Each answer of the batch is the answer of the request run alone, from cold caches.
    for tag, prompt, batched in (("same/a-alone", first, a), ("same/b-alone", second, b)):
        _fresh_caches(llm)
        (alone,) = _generate(llm, [prompt], [_params(tag)])
        assert alone.num_cached_tokens == 0
        assert _tokens(alone) == _tokens(batched), tag
        assert _outcome_without_timing(alone) == _outcome_without_timing(batched), tag
    _assert_idle(engines, "llava")


# ---------------------------------------------------------------- 2. chunked prefill of a pruned prompt


def test_chunked_prefill_of_a_pruned_prompt(engines, trace):
    prompt = _request(engines, "llava", (11,))
    whole = engines("llava")
    _fresh_caches(whole)
    (reference,) = _generate(whole, [prompt], [_params("chunked/reference")])
    small = engines("llava_small")
    _fresh_caches(small)
    (chunked,) = _generate(small, [prompt], [_params("chunked/run")])

    outcome = _outcome(chunked)
    assert outcome["status"] == "pruned"
    assert outcome["prompt_tokens_prefilled"] > SMALL_BATCH  # the pruned prompt needs two chunks
    probe, readmitted = trace.admissions["chunked/run"]
    assert readmitted.prompt_len == outcome["prompt_tokens_prefilled"]
    assert readmitted.num_computed_tokens == 0 and readmitted.num_scheduled_tokens == SMALL_BATCH
    prefill = trace.scheduled["chunked/run"][1:]  # after the probe step
    assert prefill[:2] == [SMALL_BATCH, outcome["prompt_tokens_prefilled"] - SMALL_BATCH], prefill
    (reference_readmitted,) = trace.admissions["chunked/reference"][1:]
    assert reference_readmitted.num_scheduled_tokens == outcome["prompt_tokens_prefilled"]  # one step there
    assert not trace.preemptions["chunked/run"]

    assert trace.decision("chunked/run").images[0].keep_rows == trace.decision("chunked/reference").images[0].keep_rows
    assert _outcome_without_timing(chunked) == _outcome_without_timing(reference)
    assert _tokens(chunked) == _tokens(reference)
    _assert_idle(engines, "llava_small")


# ---------------------------------------------------------------- 3. preemption and abort


PRESSURE_IMAGES = (20, 21, 22)
PRESSURE_TOKENS = 40  # a pruned prompt (~63) + 40 tokens = 4 blocks each; three of them need 12 > 7


def test_preempted_pruned_requests_give_the_unpressured_answers(engines, trace):
    prompts = [_request(engines, "llava", (seed,)) for seed in PRESSURE_IMAGES]
    whole = engines("llava")
    _fresh_caches(whole)
    reference = _generate(whole, prompts, [_params(f"pressure/reference{i}", PRESSURE_TOKENS) for i in range(3)])
    small = engines("llava_small")
    _fresh_caches(small)
    calls_before = len(trace.encoder_outputs)
    pressured = _generate(small, prompts, [_params(f"pressure/run{i}", PRESSURE_TOKENS) for i in range(3)])

    phases = [phase for i in range(3) for phase in trace.preemptions[f"pressure/run{i}"]]
    assert "pruned" in phases, f"no pruned request was preempted: {dict(trace.preemptions)}"
    assert not any(trace.preemptions[f"pressure/reference{i}"] for i in range(3))
    for i, (ref, out) in enumerate(zip(reference, pressured)):
        assert _outcome(out)["status"] == "pruned"
        assert _outcome_without_timing(out) == _outcome_without_timing(ref), i
        assert len(_tokens(out)) == PRESSURE_TOKENS
        assert _tokens(out) == _tokens(ref), i

    # Scenario 4 without test hooks: while a pruned request was preempted, the next image's probe
    # (a 64-row encoder cache) evicted its pruned embeddings, so when it came back the encoder ran
    # again for the pruned identifier and the runner sliced the output with the same keep set.
    # (Normally the runner builds pruned entries from the cached full output, never through here.)
    keep = {trace.admissions[f"pressure/run{i}"][-1].identifiers[0]: trace.decision(f"pressure/run{i}").images[0].keep_rows
            for i in range(3)}
    again = [call for call in trace.encoder_outputs[calls_before:] if call[0] in keep]
    assert again, "no pruned embeddings were encoded again after a preemption"
    for identifier, rows_in, full, stored in again:
        assert rows_in == 64 and torch.equal(stored, full[torch.tensor(keep[identifier])])
    _assert_idle(engines, "llava_small")
    _assert_idle(engines, "llava")


def test_abort_while_the_probe_step_is_in_flight(engines, trace, monkeypatch):
    """The abort lands between the probe step's schedule and its update (where an async engine
    sees it): the runner has decided, the scheduler drops the decision, nothing is left."""
    from asymvlm_vllm.engine.scheduler import AsymVLMScheduler

    llm = engines("llava")
    engine = llm.llm_engine
    prompt = _request(engines, "llava", (23,))
    _fresh_caches(llm)
    (reference,) = _generate(llm, [prompt], [_params("abort-probe/reference")])

    _fresh_caches(llm)
    seen = {}
    update = AsymVLMScheduler.update_from_output

    def abort_in_flight(self, scheduler_output, model_runner_output):
        plan = getattr(scheduler_output, "asymvlm", None)
        for req_id in (plan.probes if plan else ()):
            if _tag(self.requests.get(req_id)) == "abort-probe/victim":
                seen["phase"] = self.asymvlm_state(req_id).phase
                seen["decided"] = req_id in (getattr(model_runner_output, "asymvlm_decisions", None) or {})
                seen["req_id"] = req_id
                engine.abort_request(["victim"])
        return update(self, scheduler_output, model_runner_output)

    monkeypatch.setattr(AsymVLMScheduler, "update_from_output", abort_in_flight)
    engine.add_request("victim", prompt, _params("abort-probe/victim"))
    assert _drain(llm) == {}
    assert seen == {"phase": "probing", "decided": True, "req_id": seen["req_id"]}
    assert "abort-probe/victim" not in trace.decisions  # the scheduler never applied it
    _assert_idle(engines, "llava")
    monkeypatch.undo()

    # The engine serves the same request as before.
    engine.add_request("after", prompt, _params("abort-probe/after"))
    (after,) = _drain(llm).values()
    assert _tokens(after) == _tokens(reference)
    assert _outcome_without_timing(after) == _outcome_without_timing(reference)
    assert seen["req_id"] not in model_runner(llm).requests
    _assert_idle(engines, "llava")


def test_abort_between_rewrite_and_readmission(engines, trace):
    """``add_request``, one ``step``, ``abort_request``: with synchronous scheduling (vLLM's CPU
    engine) one step runs the probe *and* applies its decision, so the request waits rewritten."""
    llm = engines("llava")
    engine = llm.llm_engine
    sched = scheduler(llm)
    prompt = _request(engines, "llava", (24,))
    _fresh_caches(llm)
    engine.add_request("rewritten", prompt, _params("abort-rewritten/victim"))
    engine.step()
    (req_id,) = sched.requests
    state = sched.asymvlm_state(req_id)
    assert state.phase == "pruned" and state.outcome["status"] == "pruned"
    request = sched.requests[req_id]
    assert request.status.name == "WAITING" and request.num_computed_tokens == 0
    assert request.num_prompt_tokens == state.outcome["prompt_tokens_prefilled"] < state.outcome["prompt_tokens"]
    identifier = request.mm_features[0].identifier
    # Its pruned embeddings wait in the encoder cache, unreferenced (freeable) like every waiting
    # request's: a reference held while waiting could starve a running request of cache space.
    assert sched.encoder_cache_manager.cached[identifier] == set()
    engine.abort_request(["rewritten"])
    assert _drain(llm) == {}
    _assert_idle(engines, "llava")


# ---------------------------------------------------------------- 4. evicted pruned encoder-cache entry


def test_evicted_pruned_embeddings_are_encoded_again_and_sliced(engines, trace):
    llm = engines("llava")
    prompt = _request(engines, "llava", (30,))
    _fresh_caches(llm)
    (reference,) = _generate(llm, [prompt], [_params("evict/reference")])
    _fresh_caches(llm)
    runner = model_runner(llm)
    evicted = []

    def evict(sched, request):
        """Right after the rewrite: drop the pruned entry (and the full output it would be sliced
        from) from the scheduler's encoder-cache manager, through its own eviction, and from the
        runner's encoder cache, as if other images had needed the space."""
        cache = sched.encoder_cache_manager
        for index, feature in enumerate(request.mm_features):
            if "#asymvlm" not in feature.identifier:
                continue
            source = sched.asymvlm_state(request.request_id).pruned[feature.identifier].source
            assert not cache.cached[feature.identifier]  # a waiting request holds no reference
            sched._pending_materialize.pop(feature.identifier, None)
            # can_allocate evicts the oldest unreferenced entries until this much is free.
            assert cache.can_allocate(request, index, 1 << 40, cache.num_freeable_slots - request.get_num_encoder_embeds(index))
            assert feature.identifier not in cache.cached and source not in cache.cached
            runner.encoder_cache.pop(source, None)
            runner.encoder_cache.pop(feature.identifier, None)
            evicted.append(feature.identifier)

    trace.after_rewrite["evict/run"] = evict
    calls_before = len(trace.encoder_outputs)
    try:
        (out,) = _generate(llm, [prompt], [_params("evict/run")])
    finally:
        del trace.after_rewrite["evict/run"]

    (identifier,) = evicted
    calls = [c for c in trace.encoder_outputs[calls_before:] if c[0] == identifier]
    assert len(calls) == 1, "the encoder did not run again for the pruned identifier"
    _, rows_in, full, stored = calls[0]
    keep = trace.decision("evict/run").images[0].keep_rows
    assert rows_in == 64 and stored.shape[0] == len(keep) == 32
    assert torch.equal(stored, full[torch.tensor(keep)])
    assert trace.admissions["evict/run"][-1].identifiers == [identifier]
    assert _outcome_without_timing(out) == _outcome_without_timing(reference)
    assert _tokens(out) == _tokens(reference)
    _assert_idle(engines, "llava")


# ---------------------------------------------------------------- 5. edge prompts


def test_min_keep_above_the_image_tokens_keeps_every_token(engines, trace):
    llm = engines("llava")
    prompt = _request(engines, "llava", (40,))
    _fresh_caches(llm)
    (out,) = _generate(llm, [prompt], [_params("min_keep/run", asymvlm_min_keep=100)])
    outcome = _outcome(out)
    assert outcome["status"] == "pruned"
    assert [(i["tokens"], i["kept"]) for i in outcome["images"]] == [(64, 64)]
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 64
    assert outcome["prompt_tokens_prefilled"] == outcome["prompt_tokens"]
    # Decided, nothing to rewrite. Its probe ran alone, encoder-only (no KV for the probe's
    # tokens), so it started over: admitted again, unrewritten, the whole prompt scheduled.
    probe, again = trace.admissions["min_keep/run"]
    assert again.prompt_len == probe.prompt_len == outcome["prompt_tokens"]
    assert again.identifiers == probe.identifiers and again.num_computed_tokens == 0
    assert again.num_scheduled_tokens == outcome["prompt_tokens"]
    unpruned = _unpruned_run(engines, "llava", prompt, "min_keep/off")
    assert _tokens(out) == _tokens(unpruned)
    _assert_idle(engines, "llava")


def test_empty_question_uses_the_chat_template_as_query(engines, trace, hf_models):
    """An image and an empty text: the template's words ("USER:", "ASSISTANT:") are the query."""
    llm = engines("llava")
    prompt = _request(engines, "llava", (41,), question="")
    _fresh_caches(llm)
    (out,) = _generate(llm, [prompt], [_params("empty/run")])
    outcome = _outcome(out)
    assert outcome["status"] == "pruned", outcome
    assert [(i["tokens"], i["kept"]) for i in outcome["images"]] == [(64, 32)]
    decision = trace.decision("empty/run")
    ref = hf_reference(hf_models("llava"), prompt["prompt"], [engine_image(41)], decision)
    assert list(out.prompt_token_ids) == ref.inputs["input_ids"][0].tolist()
    assert _tokens(out) == ref.tokens
    _assert_idle(engines, "llava")


def test_prompt_of_only_the_image_runs_unpruned_with_status_error(engines, trace):
    """No template, no question: not one text token to score the image against."""
    llm = engines("llava")
    prompt = _request(engines, "llava", (42,), raw="<image>")
    _fresh_caches(llm)
    (out,) = _generate(llm, [prompt], [_params("image_only/run")])
    assert len(out.prompt_token_ids) == 64  # the image's placeholders and nothing else
    outcome = _outcome(out)
    assert outcome["status"] == "error", outcome
    assert outcome["reason"] == "the prompt has no text tokens to score its images against"
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 64
    assert "prompt_tokens_prefilled" not in outcome
    unpruned = _unpruned_run(engines, "llava", prompt, "image_only/off")
    assert _tokens(out) == _tokens(unpruned)
    _assert_idle(engines, "llava")


# ---------------------------------------------------------------- 6. every outcome status


def _assert_ran_unpruned(trace, tag: str, outcome: dict, probed: bool = False) -> None:
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"]
    assert "images" not in outcome and "prompt_tokens_prefilled" not in outcome
    assert (tag in trace.decisions) == probed
    assert all(a.prompt_len == outcome["prompt_tokens"] for a in trace.admissions[tag])  # never rewritten


def test_status_off(engines, trace):
    llm = engines("llava")
    prompt = _request(engines, "llava", (50,))
    _fresh_caches(llm)
    (out,) = _generate(llm, [prompt], [_params("status/off", asymvlm="off")])
    outcome = _outcome(out)
    assert outcome["status"] == "off"
    _assert_ran_unpruned(trace, "status/off", outcome)
    (admission,) = trace.admissions["status/off"]
    assert admission.num_scheduled_tokens == outcome["prompt_tokens"]  # no probe: one full prefill
    _assert_idle(engines, "llava")


def test_status_prefix_cached(engines, trace):
    llm = engines("llava")
    prompt = _request(engines, "llava", (51,))
    unpruned = _unpruned_run(engines, "llava", prompt, "status/prefix_cached-first")
    (out,) = _generate(llm, [prompt], [_params("status/prefix_cached")])
    outcome = _outcome(out)
    assert outcome["status"] == "prefix_cached", outcome
    assert outcome["reason"]
    _assert_ran_unpruned(trace, "status/prefix_cached", outcome)
    (admission,) = trace.admissions["status/prefix_cached"]
    assert admission.num_computed_tokens == out.num_cached_tokens >= BLOCK_SIZE > admission.offsets[0]
    assert _tokens(out) == _tokens(unpruned)
    _assert_idle(engines, "llava")


def test_status_too_large(engines, trace):
    """Two 64-token images against the small engine's 64-token encoder budget (vLLM raises the
    budget to the largest single item, so only several images together can exceed it)."""
    small = engines("llava_small")
    prompt = _request(engines, "llava", (52, 53))
    assert scheduler(small).max_num_encoder_input_tokens == 64
    _fresh_caches(small)
    (out,) = _generate(small, [prompt], [_params("status/too_large")])
    outcome = _outcome(out)
    assert outcome["status"] == "too_large", outcome
    assert "128" in outcome["reason"]
    _assert_ran_unpruned(trace, "status/too_large", outcome)
    unpruned = _unpruned_run(engines, "llava_small", prompt, "status/too_large-off")
    assert _tokens(out) == _tokens(unpruned)
    _assert_idle(engines, "llava_small")


QWEN_IMAGE_AND_VIDEO = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                        "<|vision_start|><|video_pad|><|vision_end|>What happens here?<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_status_unsupported_modality(engines, trace):
    """Tiny LLaVA takes images only; the tiny Qwen2.5-VL also takes a video, so an image + video
    request reaches the engine and runs unpruned."""
    import numpy as np

    llm = engines("qwen2_5_vl")
    frames = np.random.RandomState(0).randint(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    metadata = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "video_backend": "opencv",
                "frames_indices": [0, 1, 2, 3], "do_sample_frames": False}
    prompt = {"prompt": QWEN_IMAGE_AND_VIDEO, "multi_modal_data": {"image": engine_image(54), "video": (frames, metadata)}}
    _fresh_caches(llm)
    (out,) = _generate(llm, [prompt], [_params("status/unsupported_modality")])
    outcome = _outcome(out)
    assert outcome["status"] == "unsupported_modality", outcome
    assert outcome["vision_tokens"] == 64  # the image's tokens; the video's are not counted
    _assert_ran_unpruned(trace, "status/unsupported_modality", outcome)
    unpruned = _unpruned_run(engines, "qwen2_5_vl", prompt, "status/unsupported_modality-off")
    assert _tokens(out) == _tokens(unpruned)
    _assert_idle(engines, "qwen2_5_vl")


def test_status_invalid_options(engines, trace):
    """Options the front end would have refused (HTTP 400), in a request built past it."""
    llm = engines("llava")
    engine = llm.llm_engine
    prompt = _request(engines, "llava", (55,))
    request = engine.input_processor.process_inputs(
        "invalid", prompt, _params("status/invalid_options", asymvlm_keep_ratio=0.5),
        supported_tasks=engine.get_supported_tasks())
    request.sampling_params.extra_args["asymvlm_keep_ratio"] = 2  # after validation
    _fresh_caches(llm)
    engine.add_request("invalid", request, request.sampling_params)
    (out,) = _drain(llm).values()
    outcome = _outcome(out)
    assert outcome["status"] == "invalid_options", outcome
    assert "asymvlm_keep_ratio" in outcome["reason"] and "(0, 1]" in outcome["reason"]
    _assert_ran_unpruned(trace, "status/invalid_options", outcome)
    unpruned = _unpruned_run(engines, "llava", prompt, "status/invalid_options-off")
    assert _tokens(out) == _tokens(unpruned)
    _assert_idle(engines, "llava")


def test_status_error_runs_unpruned_and_the_engine_keeps_serving(engines, trace, monkeypatch):
    import asymvlm_vllm.engine.runner as runner_module

    llm = engines("llava")
    prompt = _request(engines, "llava", (56,))

    def broken(*args, **kwargs):
        raise RuntimeError("injected decide failure")

    _fresh_caches(llm)
    with monkeypatch.context() as mp:
        mp.setattr(runner_module, "decide_request", broken)
        (out,) = _generate(llm, [prompt], [_params("status/error")])
    outcome = _outcome(out)
    assert outcome["status"] == "error", outcome
    assert "injected decide failure" in outcome["reason"]
    _assert_ran_unpruned(trace, "status/error", outcome, probed=True)
    assert trace.decision("status/error").error
    unpruned = _unpruned_run(engines, "llava", prompt, "status/error-off")
    assert _tokens(out) == _tokens(unpruned)
    _assert_idle(engines, "llava")

    # The next request is pruned as usual.
    _fresh_caches(llm)
    (after,) = _generate(llm, [_request(engines, "llava", (57,))], [_params("status/error-after")])
    assert _outcome(after)["status"] == "pruned"
    assert len(_tokens(after)) == MAX_TOKENS
    _assert_idle(engines, "llava")


# ---------------------------------------------------------------- 7. Gemma 3 bidirectional image attention


GEMMA_IMAGE = 60
LOGPROB_ATOL = 1e-4  # vLLM CPU vs transformers SDPA, float32 (see test_asymvlm_engine)


def _first_logprobs(output) -> dict[int, float]:
    return {tid: lp.logprob for tid, lp in output.outputs[0].logprobs[0].items()}


def _gemma_run(engines, tag: str):
    llm = engines("gemma3")
    _fresh_caches(llm)
    prompt = _request(engines, "gemma3", (GEMMA_IMAGE,))
    params = greedy_params(MAX_TOKENS, logprobs=5, extra_args={"test_tag": tag})
    (out,) = _generate(llm, [prompt], [params])
    assert _outcome(out)["status"] == "pruned"
    return prompt, out


def _pruned_range(trace, identifier: str) -> tuple[int, int]:
    seen = {tuple(ranges[index]) for identifiers, ranges in trace.prefix_ranges
            for index, ids in enumerate(identifiers) if ids == [identifier] and index in ranges}
    assert len(seen) == 1, seen
    ((pruned_range,),) = seen
    return pruned_range


def test_gemma3_cpu_attention_ignores_the_bidirectional_ranges(engines, trace, hf_models):
    prompt, out = _gemma_run(engines, "gemma/ranges")
    identifier = trace.admissions["gemma/ranges"][-1].identifiers[0]
    pruned_range = _pruned_range(trace, identifier)
    assert pruned_range[1] - pruned_range[0] + 1 == _outcome(out)["images"][0]["kept"] == 32

    # Ranges that make the whole prompt bidirectional: a backend that read them would answer
    # differently. The CPU backend answers bit for bit the same.
    trace.prefix_ranges_override = lambda features: {i: [(0, 1 << 20)] for i, f in enumerate(features) if f}
    try:
        _, widened = _gemma_run(engines, "gemma/widened")
    finally:
        trace.prefix_ranges_override = None
    assert _tokens(widened) == _tokens(out)
    assert _first_logprobs(widened) == _first_logprobs(out)

    # And the engine is the causal transformers reference, not the bidirectional one.
    decision = trace.decision("gemma/ranges")
    vlm = hf_models("gemma3")
    causal = hf_reference(vlm, prompt["prompt"], [engine_image(GEMMA_IMAGE)], decision, causal=True)
    bidirectional = hf_reference(vlm, prompt["prompt"], [engine_image(GEMMA_IMAGE)], decision, causal=False)
    ours = _first_logprobs(out)
    to_causal = max(abs(lp - float(causal.first_logprobs[t])) for t, lp in ours.items())
    to_bidirectional = max(abs(lp - float(bidirectional.first_logprobs[t])) for t, lp in ours.items())
    assert to_causal <= LOGPROB_ATOL, to_causal
    assert to_bidirectional > 100 * LOGPROB_ATOL, to_bidirectional
    assert _tokens(out) == causal.tokens


def test_gemma3_pruned_range_is_the_reference_bidirectional_span(engines, trace, hf_models):
    """The range vLLM computes for the rewritten request, applied as Gemma 3's attention mask
    (causal, plus every pair inside the range), gives exactly what the transformers reference
    computes with its own bidirectional image mask over the pruned span."""
    prompt, out = _gemma_run(engines, "gemma/span")
    identifier = trace.admissions["gemma/span"][-1].identifiers[0]
    start, end = _pruned_range(trace, identifier)  # inclusive
    vlm = hf_models("gemma3")
    decision = trace.decision("gemma/span")
    ref = hf_reference(vlm, prompt["prompt"], [engine_image(GEMMA_IMAGE)], decision, causal=False)
    inputs = ref.prompt.model_inputs()
    token_types = inputs.pop("token_type_ids")[0]
    assert token_types.nonzero().flatten().tolist() == list(range(start, end + 1))

    length = inputs["inputs_embeds"].shape[1]
    assert inputs["attention_mask"].bool().all()  # one sample: no padding
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    inside = (q >= start) & (q <= end) & (k >= start) & (k <= end)
    full = (k <= q) | inside
    window = vlm.model.config.get_text_config().sliding_window
    inputs["attention_mask"] = {"full_attention": full[None, None], "sliding_attention": (full & (q - k < window))[None, None]}
    with torch.inference_mode():
        logits = vlm.model(**inputs).logits[0, -1].float().log_softmax(-1)
    assert torch.allclose(logits, ref.first_logprobs, atol=1e-5), (logits - ref.first_logprobs).abs().max()
    causal = hf_reference(vlm, prompt["prompt"], [engine_image(GEMMA_IMAGE)], decision, causal=True)
    assert (logits - causal.first_logprobs).abs().max() > 100 * LOGPROB_ATOL  # the range matters
