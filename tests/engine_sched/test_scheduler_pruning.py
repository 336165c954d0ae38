"""AsymVLM's scheduler against vLLM's real scheduler, KV cache manager and block pool.

Nothing of vLLM is mocked: the requests are vLLM ``Request``s with placeholder spans, the
scheduler is :class:`~asymvlm_vllm.engine.scheduler.AsymVLMScheduler` (over vLLM's
``Scheduler`` or ``AsyncScheduler``), and the model runner is the simulated one, which
answers probes with keep sets. The deterministic tests pin the protocol (probe → decision →
rewrite → re-admission with KV for the pruned length only); the randomized episodes mix
images, keep ratios, decision errors, tiny KV pools (preemption), prefix-cache hits and
aborts at any moment, and check that nothing leaks.

``ASYMVLM_SCHED_EPISODES`` sets the number of randomized episodes per scheduler kind
(default 1000); ``ASYMVLM_SCHED_SEED`` runs one episode (both kinds) to reproduce a failure.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import pytest
from vllm.v1.request import RequestStatus

from asymvlm_vllm.engine.protocol import ProbeSpec, StepPlan
from asymvlm_vllm.engine.simulation import (
    IMAGE_TOKEN_ID, SAMPLED_TOKEN_ID, SimulatedRunner, SimulationError, build_scheduler, drive, make_request,
)

ASYNC = [pytest.param(False, id="sync"), pytest.param(True, id="async")]
EPISODES = int(os.environ.get("ASYMVLM_SCHED_EPISODES", "1000"))
UNIFORM_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}


def text(n: int, start: int = 10) -> list[int]:
    return [start + i % 900 for i in range(n)]


def blocks_of(scheduler, request_id: str) -> int:
    return len(scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.get(request_id, ()))


def free_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def assert_drained(scheduler, num_blocks: int) -> None:
    """Nothing left anywhere: requests, queues, KV blocks, encoder-cache references."""
    assert free_blocks(scheduler) == num_blocks - 1  # vLLM's null block is never free
    assert not scheduler.requests
    assert not scheduler.running
    assert len(scheduler.waiting) == 0 and len(scheduler.kv_holding_waiting) == 0 and not scheduler.deferred_waiting
    cache = scheduler.encoder_cache_manager
    referenced = {h: refs for h, refs in cache.cached.items() if refs}
    assert not referenced, f"encoder-cache entries still referenced: {referenced}"
    assert not cache.request_cached_ids and not cache.request_hash_refs
    assert cache.num_freeable_slots == cache.cache_size
    assert not scheduler._pending_encoder_input_ids
    if hasattr(scheduler, "asymvlm_state"):
        assert not getattr(scheduler, "_pruning", {}), "AsymVLM records of finished requests remain"


class Recorder:
    """Per-step record of what the scheduler scheduled (for the deterministic tests)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.steps = []

    def __call__(self, step, so, mro):
        blocks = {r.request_id: blocks_of(self.scheduler, r.request_id) for r in self.scheduler.running}
        self.steps.append({
            "tokens": dict(so.num_scheduled_tokens),
            "encoder": {k: list(v) for k, v in so.scheduled_encoder_inputs.items()},
            "plan": getattr(so, "asymvlm", None),
            "blocks": blocks,
            "new": [n.req_id for n in so.scheduled_new_reqs],
            "preempted": set(so.preempted_req_ids or ()),
        })

    def scheduled(self):
        return [s for s in self.steps if s["tokens"]]


# ------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_probe_then_readmission_with_kv_for_the_pruned_length(async_scheduling):
    bs, num_blocks = 16, 200
    prefix, image, suffix = 5, 576, 15
    sched = build_scheduler(num_blocks, bs, {"vision": {"budget": {"rule": "uniform", "ratio": 0.25}}},
                            async_scheduling=async_scheduling, max_num_batched_tokens=4096)
    runner = SimulatedRunner(sched, keep_ratio=None, rng_seed=3)
    req = make_request(sched, "r0", text(prefix + suffix), images=[(prefix, image, "img0")], max_tokens=5)
    original = list(req.prompt_token_ids)
    rec = Recorder(sched)
    result = drive(sched, runner, [req], after_schedule=rec)

    steps = rec.scheduled()
    probe = steps[0]
    # Probe: the text before the image only, plus the image's encoder input; nothing allocated
    # for the placeholders.
    assert probe["tokens"] == {"r0": prefix}
    assert probe["encoder"] == {"r0": [0]}
    assert isinstance(probe["plan"], StepPlan)
    assert probe["plan"].probes == {"r0": ProbeSpec([0], probe["plan"].probes["r0"].options)}
    assert probe["blocks"]["r0"] == math.ceil(prefix / bs)
    if async_scheduling:  # the next step is planned before the decision is back: held
        assert rec.steps[1]["tokens"] == {} and rec.steps[1]["plan"].probes == {}
    # Re-admission: the whole pruned prompt, as a new request, KV for it only.
    kept = len(runner.decisions["r0"].images[0].keep_rows)
    assert kept == image // 4
    readmit = steps[1]
    assert readmit["new"] == ["r0"]
    assert readmit["tokens"] == {"r0": prefix + kept + suffix}
    assert readmit["blocks"]["r0"] == math.ceil((prefix + kept + suffix) / bs) == 11
    assert max(result.peak_blocks.values()) == 11 < math.ceil((prefix + image + suffix) / bs)
    # The pruned prompt the runner saw, and decoding after it.
    assert [s["tokens"] for s in steps[2:]] == [{"r0": 1}] * 4
    assert result.tokens["r0"] == [SAMPLED_TOKEN_ID] * 5
    outcome = result.finished["r0"].kv_transfer_params["asymvlm"]
    assert outcome["status"] == "pruned"
    assert outcome["vision_tokens"] == image and outcome["vision_tokens_kept"] == kept
    assert len(req.prompt_token_ids) == req.num_prompt_tokens == len(original) - (image - kept)
    assert_drained(sched, num_blocks)


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_plain_vllm_allocates_for_every_placeholder(async_scheduling):
    """The baseline the previous test improves on, measured with the same helpers."""
    sched = build_scheduler(200, 16, None, async_scheduling=async_scheduling, max_num_batched_tokens=4096)
    rec = Recorder(sched)
    req = make_request(sched, "r0", text(20), images=[(5, 576, "img0")], max_tokens=5)
    result = drive(sched, SimulatedRunner(sched, keep_ratio=0.25), [req], after_schedule=rec)
    assert rec.scheduled()[0]["tokens"] == {"r0": 596}
    assert rec.scheduled()[0]["blocks"]["r0"] == 38
    assert result.finished["r0"].kv_transfer_params is None
    assert_drained(sched, 200)


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_image_at_offset_zero_is_pruned(async_scheduling):
    bs = 8
    sched = build_scheduler(64, bs, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=256,
                            max_num_seqs=8)
    runner = SimulatedRunner(sched, keep_ratio=None)
    req = make_request(sched, "r0", text(7), images=[(0, 40, "img0")], max_tokens=3)
    rec = Recorder(sched)
    result = drive(sched, runner, [req], after_schedule=rec)
    steps = rec.scheduled()
    assert steps[0]["tokens"] == {"r0": 1}  # at least one token: the runner needs a step to run in
    assert steps[0]["encoder"] == {"r0": [0]} and list(steps[0]["plan"].probes) == ["r0"]
    assert steps[1]["tokens"] == {"r0": 20 + 7}
    assert steps[1]["blocks"]["r0"] == math.ceil(27 / bs)
    assert req.mm_features[0].mm_position.offset == 0 and req.mm_features[0].mm_position.length == 20
    assert req.prompt_token_ids == [IMAGE_TOKEN_ID] * 20 + text(7)
    assert result.finished["r0"].kv_transfer_params["asymvlm"]["vision_tokens_kept"] == 20
    assert_drained(sched, 64)


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_two_images_in_one_prompt_are_both_pruned(async_scheduling):
    bs = 4
    sched = build_scheduler(128, bs, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=256,
                            max_num_seqs=8)
    runner = SimulatedRunner(sched, keep_ratio=lambda request, index, gap: (0.5, 0.25)[index])
    words = text(12)
    req = make_request(sched, "r0", words, images=[(3, 32, "imgA"), (3 + 32 + 4, 48, "imgB")], max_tokens=2)
    rec = Recorder(sched)
    result = drive(sched, runner, [req], after_schedule=rec)
    steps = rec.scheduled()
    assert steps[0]["tokens"] == {"r0": 3} and steps[0]["encoder"] == {"r0": [0, 1]}
    assert steps[0]["plan"].probes["r0"].features == [0, 1]
    keeps = [im.keep_rows for im in runner.decisions["r0"].images]
    assert [len(k) for k in keeps] == [16, 12]
    assert steps[1]["tokens"] == {"r0": 12 + 16 + 12}
    assert steps[1]["blocks"]["r0"] == math.ceil(40 / bs)
    spans = [(f.mm_position.offset, f.mm_position.length) for f in req.mm_features]
    assert spans == [(3, 16), (3 + 16 + 4, 12)]
    assert req.prompt_token_ids == words[:3] + [IMAGE_TOKEN_ID] * 16 + words[3:7] + [IMAGE_TOKEN_ID] * 12 + words[7:]
    assert all("#asymvlm" in f.identifier for f in req.mm_features)
    outcome = result.finished["r0"].kv_transfer_params["asymvlm"]
    assert (outcome["vision_tokens"], outcome["vision_tokens_kept"]) == (80, 28)
    assert_drained(sched, 128)


WITH_FORWARD_PROBE = {"vision": {**UNIFORM_HALF["vision"], "encoder_only_probes": False}}


@pytest.mark.parametrize("async_scheduling", ASYNC)
@pytest.mark.parametrize("encoder_only", [True, False], ids=["encoder-only-probe", "probe-with-forward"])
def test_keep_all_continues_without_rewrite(async_scheduling, encoder_only):
    config = UNIFORM_HALF if encoder_only else WITH_FORWARD_PROBE
    sched = build_scheduler(64, 8, config, async_scheduling=async_scheduling, max_num_batched_tokens=256,
                            max_num_seqs=8)
    req = make_request(sched, "r0", text(10), images=[(4, 24, "img0")], max_tokens=2)
    original = list(req.prompt_token_ids)
    rec = Recorder(sched)
    result = drive(sched, SimulatedRunner(sched, keep_ratio=1.0), [req], after_schedule=rec)
    steps = rec.scheduled()
    assert steps[0]["tokens"] == {"r0": 4} and steps[0]["plan"].encoder_only == encoder_only
    if encoder_only:
        # The probe's 4 tokens have no KV: it gives its blocks back and starts over, unrewritten.
        assert steps[1]["tokens"] == {"r0": 34} and steps[1]["new"] == ["r0"]
    else:
        # It continues from where the probe left it: no release, no new request, the rest of the prompt.
        assert steps[1]["tokens"] == {"r0": 30} and steps[1]["new"] == []
    assert req.prompt_token_ids == original and req.mm_features[0].identifier == "img0"
    outcome = result.finished["r0"].kv_transfer_params["asymvlm"]
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 24
    assert req.num_preemptions == 0  # starting over is not a preemption
    assert_drained(sched, 64)


@pytest.mark.parametrize("async_scheduling", ASYNC)
@pytest.mark.parametrize("failure", ["error", "missing"])
@pytest.mark.parametrize("encoder_only", [True, False], ids=["encoder-only-probe", "probe-with-forward"])
def test_failed_decision_runs_unpruned(async_scheduling, failure, encoder_only):
    config = UNIFORM_HALF if encoder_only else WITH_FORWARD_PROBE
    sched = build_scheduler(64, 8, config, async_scheduling=async_scheduling, max_num_batched_tokens=256,
                            max_num_seqs=8)
    runner = SimulatedRunner(sched, keep_ratio=0.5, error_rate=float(failure == "error"),
                             missing_rate=float(failure == "missing"))
    req = make_request(sched, "r0", text(10), images=[(4, 24, "img0")], max_tokens=2)
    original = list(req.prompt_token_ids)
    rec = Recorder(sched)
    result = drive(sched, runner, [req], after_schedule=rec)
    assert [s["tokens"] for s in rec.scheduled()][:2] == [{"r0": 4}, {"r0": 34 if encoder_only else 30}]
    assert req.prompt_token_ids == original
    outcome = result.finished["r0"].kv_transfer_params["asymvlm"]
    assert outcome["status"] == "error" and outcome["vision_tokens_kept"] == 24 and outcome["reason"]
    assert result.tokens["r0"] == [SAMPLED_TOKEN_ID] * 2
    assert_drained(sched, 64)


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_a_probe_filling_a_block_or_sharing_its_step_keeps_the_forward_pass(async_scheduling):
    """Encoder-only only where it is safe: a probe whose text before the image completes a
    block (the prefix cache would offer it unwritten) runs the forward pass; so does a probe
    beside another request's work."""
    sched = build_scheduler(64, 8, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=256,
                            max_num_seqs=8)
    long_text = make_request(sched, "long", text(40), images=[(20, 24, "img1")], max_tokens=2)
    rec = Recorder(sched)
    drive(sched, SimulatedRunner(sched, keep_ratio=0.5), [long_text], after_schedule=rec)
    first = rec.scheduled()[0]
    assert first["tokens"] == {"long": 20} and not first["plan"].encoder_only  # 20 tokens cross a block of 8
    sched = build_scheduler(64, 8, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=256,
                            max_num_seqs=8)
    a = make_request(sched, "a", text(10), images=[(4, 24, "img2")], max_tokens=6)
    b = make_request(sched, "b", text(10), images=[(4, 24, "img3")], max_tokens=2)
    rec = Recorder(sched)
    drive(sched, SimulatedRunner(sched, keep_ratio=0.5), [a], after_schedule=rec, arrivals={3: [b]})
    probing_b = [s for s in rec.scheduled() if "b" in s["plan"].probes]
    assert len(probing_b) == 1 and set(probing_b[0]["tokens"]) == {"a", "b"} and not probing_b[0]["plan"].encoder_only
    assert rec.scheduled()[0]["plan"].encoder_only  # "a" alone: encoder-only
    assert_drained(sched, 64)


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_text_only_requests_schedule_exactly_as_plain_vllm(async_scheduling):
    """A tiny pool (preemptions), chunked prefill, a prefix-cache hit: step for step the same."""
    def run(asymvlm_config):
        sched = build_scheduler(10, 4, asymvlm_config, async_scheduling=async_scheduling,
                                max_num_batched_tokens=16, max_num_seqs=4)
        rec = Recorder(sched)
        reqs = [make_request(sched, f"t{i}", text(n, start=10 + 7 * (i % 2)), max_tokens=m)
                for i, (n, m) in enumerate([(9, 6), (14, 3), (9, 8), (5, 7), (13, 4)])]
        result = drive(sched, SimulatedRunner(sched, keep_ratio=0.5), reqs[:3], arrivals={2: reqs[3:]},
                       after_schedule=rec)
        assert_drained(sched, 10)
        assert all(not s["plan"] for s in rec.steps) if asymvlm_config is not None else True
        trace = [(s["tokens"], s["new"], s["preempted"], s["blocks"]) for s in rec.steps]
        return trace, result
    plain, plain_result = run(None)
    pruned, pruned_result = run(UNIFORM_HALF)
    assert any(p for _, _, p, _ in plain), "the pool should be small enough to preempt"
    assert pruned == plain
    assert pruned_result.tokens == plain_result.tokens
    assert all(o.kv_transfer_params is None for o in pruned_result.finished.values())


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_per_request_options(async_scheduling):
    sched = build_scheduler(256, 8, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=512,
                            max_num_seqs=8)
    runner = SimulatedRunner(sched, keep_ratio=None)
    reqs = [
        make_request(sched, "off", text(6), images=[(2, 40, "img0")], extra_args={"asymvlm": "off"}),
        make_request(sched, "quarter", text(6), images=[(2, 40, "img1")], extra_args={"asymvlm_keep_ratio": 0.25}),
        make_request(sched, "default", text(6), images=[(2, 40, "img2")]),
        make_request(sched, "text", text(6)),
    ]
    result = drive(sched, runner, reqs)
    kept = {rid: (o.kv_transfer_params or {}).get("asymvlm", {}).get("vision_tokens_kept") for rid, o in result.finished.items()}
    assert kept == {"off": 40, "quarter": 10, "default": 20, "text": None}
    assert result.finished["off"].kv_transfer_params["asymvlm"]["status"] == "off"
    assert "off" not in runner.decisions
    assert_drained(sched, 256)


@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_aborts_while_probing_and_before_readmission(async_scheduling):
    sched = build_scheduler(64, 8, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=256,
                            max_num_seqs=8)
    runner = SimulatedRunner(sched, keep_ratio=0.5)
    reqs = [make_request(sched, f"r{i}", text(6), images=[(2, 40, f"img{i}")]) for i in range(2)]
    aborted = {}

    def after_schedule(step, so, mro):
        plan = so.asymvlm
        if "r0" in plan.probes:  # while its probe step is executing
            aborted["r0"] = [r.request_id for r in sched.finish_requests(["r0"], RequestStatus.FINISHED_ABORTED)]

    def after_update(step, so, outs):
        state = sched.asymvlm_state("r1")
        if state is not None and state.phase == "pruned" and "r1" not in aborted:
            assert sched.requests["r1"].status == RequestStatus.WAITING  # rewritten, not yet re-admitted
            aborted["r1"] = [r.request_id for r in sched.finish_requests(["r1"], RequestStatus.FINISHED_ABORTED)]

    result = drive(sched, runner, reqs, after_schedule=after_schedule, after_update=after_update)
    assert aborted == {"r0": ["r0"], "r1": ["r1"]}
    assert result.finished == {}
    assert_drained(sched, 64)


# ------------------------------------------------------------------------------ episodes


@dataclass
class Spec:
    request_id: str
    words: list[int]
    images: list[tuple[int, int, str]]
    max_tokens: int
    arrival: int
    extra_args: dict | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.words) + sum(n for _, n, _ in self.images)


@dataclass
class Coverage:
    """What the episodes exercised, summed (checked so the mix cannot silently go stale)."""

    counts: dict = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def _episode_specs(rng: random.Random, image_sizes: dict[str, int], pressure: bool) -> list[Spec]:
    specs: list[Spec] = []
    for i in range(rng.randint(4, 10) if pressure else rng.randint(1, 8)):
        roll = rng.random()
        arrival = rng.choice([0, 0, 0, rng.randint(1, 12)])
        if specs and roll < 0.15:  # the same prompt again: a prefix-cache hit
            base = rng.choice(specs)
            specs.append(Spec(f"q{i}", list(base.words), list(base.images), rng.randint(1, 5), arrival, base.extra_args))
            continue
        words = [rng.randrange(10, 900) for _ in range(rng.randint(1, 30))]
        if specs and roll < 0.3 and specs[-1].images:  # the same image(s), another question
            base = specs[-1]
            cut = rng.randint(0, len(words))
            images, shift = [], 0
            for _, n, identifier in base.images:
                images.append((cut + shift, n, identifier))
                shift += n
        else:
            count = rng.choice([0, 1, 1, 2, 2])
            cuts = sorted(rng.randint(0, len(words)) for _ in range(count))
            if cuts and rng.random() < 0.3:
                cuts[0] = 0
            images, shift = [], 0
            for cut in cuts:
                identifier = rng.choice(sorted(image_sizes))
                images.append((cut + shift, image_sizes[identifier], identifier))
                shift += image_sizes[identifier]
        extra = None
        r = rng.random()
        if r < 0.08:
            extra = {"asymvlm_keep_ratio": rng.choice([0.3, 0.6, 1.0])}
        elif r < (0.4 if pressure else 0.16):
            extra = {"asymvlm": "off"}
        elif r < 0.2:
            extra = {"asymvlm_budget": rng.choice(["aggressive", "conservative"])}
        max_tokens = rng.randint(1, 5)
        if (extra or {}).get("asymvlm") != "off" and rng.random() < (0.6 if pressure else 0.3):
            # Text eviction: a long answer past a small budget of generated tokens.
            extra = {**(extra or {}), "asymvlm_text_budget": rng.choice([1, 4, 9, 20])}
            max_tokens = rng.randint(6, 40)
        specs.append(Spec(f"q{i}", words, images, max_tokens, arrival, extra))
    return specs


def _contention_specs(rng: random.Random, image_sizes: dict[str, int]) -> list[Spec]:
    """A few text-only decoders, then bursts of image requests with little text before their
    image and a tight pool: decoders that need a block preempt held probes (async) and
    re-admitted pruned requests, pruned prompts are chunked, and other images evict the
    pruned encoder-cache entries of preempted requests before these come back."""
    specs: list[Spec] = []
    bursts = [rng.randint(3, 12) for _ in range(rng.randint(1, 3))]
    for i in range(rng.randint(2, 4)):
        words = [rng.randrange(10, 900) for _ in range(rng.randint(4, 16))]
        extra = {"asymvlm_text_budget": rng.choice([2, 8])} if rng.random() < 0.5 else None
        specs.append(Spec(f"d{i}", words, [], rng.randint(8, 24), rng.choice([0, 0, rng.randint(1, 8)]), extra))
    for i in range(rng.randint(6, 12)):
        words = [rng.randrange(10, 900) for _ in range(rng.randint(2, 10))]
        cut = rng.randint(1, min(4, len(words)))
        identifier = rng.choice(sorted(image_sizes))
        images = [(cut, image_sizes[identifier], identifier)]
        if rng.random() < 0.2:
            second = rng.choice(sorted(image_sizes))
            images.append((len(words) + image_sizes[identifier], image_sizes[second], second))
        specs.append(Spec(f"q{i}", words, images, rng.randint(2, 10), rng.choice(bursts)))
    return specs


# Probability per profile that an episode runs with vLLM's --no-scheduler-reserve-full-isl.
# By default (reserve on) vLLM admits a waiting request only if its whole prompt -- for a probe,
# the unpruned one -- fits in the free blocks, although the probe allocates for the text before
# the image only; so the step after a probe nearly always has free blocks, and preemption of a
# held probe (async) stays rare (4 in 1,000 async episodes). Without the reserve, admissions fill
# the pool and held probes are preempted often.
NO_RESERVE_FULL_ISL = {"mixed": 0.2, "pressure": 0.5, "contention": 0.7, "eviction": 0.5}


def run_episode(seed: int, async_scheduling: bool, coverage: Coverage | None = None) -> None:
    rng = random.Random(seed * 2 + int(async_scheduling))
    coverage = coverage or Coverage()
    # "mixed" episodes: everything, any sizes. "pressure": more requests, more of them
    # unpruned, a pool that barely fits the largest: preemption (also of held and re-admitted
    # requests) and encoder-cache eviction. "contention": see _contention_specs; what it
    # reaches is gated below.
    profile = rng.choices(("mixed", "pressure", "contention", "eviction"), weights=(5, 3, 2, 2))[0]
    pressure = profile == "pressure"
    if profile == "eviction":
        # Long answers past small eviction budgets in a pool that cannot hold them all at once:
        # requests with holes are preempted, recomputed and evicted again.
        bs = 4
        max_batched, max_seqs = 64, 8
        image_sizes = {f"img{seed}-{k}": rng.randint(4, 12) for k in range(2)}
        specs = []
        for i in range(rng.randint(4, 7)):
            words = [rng.randrange(10, 900) for _ in range(rng.randint(2, 12))]
            identifier = rng.choice(sorted(image_sizes))
            images = [(rng.randint(0, len(words)), image_sizes[identifier], identifier)] if rng.random() < 0.5 else []
            # All at once, so that they evict in step and the one preempted (the newest) has holes.
            specs.append(Spec(f"e{i}", words, images, rng.randint(24, 48), 0,
                              {"asymvlm_text_budget": rng.choice([2, 4, 8])}))
        encoder_budget = encoder_cache = 2 * max(image_sizes.values())
        need = max(math.ceil((s.prompt_len + s.max_tokens) / bs) for s in specs)
        num_blocks = 1 + need + rng.randint(0, need // 2)
        config = UNIFORM_HALF
        prefix_caching = rng.random() < 0.5
    elif profile == "contention":
        bs = 4
        max_batched, max_seqs = rng.choice([(64, 16), (64, 24)])
        image_sizes = {f"img{seed}-{k}": rng.randint(8, 24) for k in range(rng.randint(3, 6))}
        specs = _contention_specs(rng, image_sizes)
        # Room for one to eight requests' images: small caches evict.
        encoder_budget = encoder_cache = (max(sum(n for _, n, _ in s.images) for s in specs)
                                          * rng.choice([1, 2, 4, 8]))
        need = max(math.ceil((s.prompt_len + s.max_tokens) / bs) for s in specs)
        num_blocks = 1 + need + rng.randint(0, 4)
        config = rng.choice([UNIFORM_HALF, {"vision": {"budget": {"rule": "uniform", "ratio": 0.2}, "min_keep": 3}}])
        prefix_caching = rng.random() < 0.3  # without it a preempted pruned request needs its image again
    else:
        bs = rng.choice([4, 8, 16])
        max_batched, max_seqs = rng.choice([(16, 4), (32, 8), (64, 3), (512, 64)])
        image_sizes = {f"img{seed}-{k}": rng.randint(1, 40) for k in range(rng.randint(1, 4))}
        specs = _episode_specs(rng, image_sizes, pressure)
        largest_image = max(image_sizes.values())
        encoder_budget = rng.choice([largest_image, 2 * largest_image, 4 * largest_image])
        encoder_cache = rng.choice([encoder_budget, encoder_budget, 2 * encoder_budget, 4 * encoder_budget,
                                    encoder_budget + rng.randint(1, largest_image)])
        need = max(math.ceil((s.prompt_len + s.max_tokens) / bs) for s in specs)
        num_blocks = 1 + need + (rng.randint(0, need // 2) if pressure else rng.randint(0, 2 * need))
        config = rng.choice([{}, UNIFORM_HALF, {"vision": {"budget": {"rule": "uniform", "ratio": 0.2}, "min_keep": 3}}])
        prefix_caching = rng.random() < 0.8
    sched = build_scheduler(num_blocks, bs, config, async_scheduling=async_scheduling, max_num_batched_tokens=max_batched,
                            max_num_seqs=max_seqs, enable_prefix_caching=prefix_caching,
                            encoder_cache_size=encoder_cache, max_num_encoder_input_tokens=encoder_budget)
    if rng.random() < NO_RESERVE_FULL_ISL[profile]:
        # What --no-scheduler-reserve-full-isl sets; this scheduler's VllmConfig is shared.
        assert sched.scheduler_reserve_full_isl is True
        sched.scheduler_reserve_full_isl = False
        coverage.add("no_reserve_full_isl")
    ratio_rng_seed = rng.randrange(1 << 30)
    mode = rng.choice(["fixed", "random", "config"])
    fixed = rng.choice([0.1, 0.5, 0.75, 1.0])

    def random_ratio(request, index, gap):
        return random.Random(f"{ratio_rng_seed}:{request.request_id}:{index}").choice([0.05, 0.25, 0.5, 0.75, 1.0])

    keep = {"fixed": fixed, "random": random_ratio, "config": None}[mode]
    if profile == "contention":
        runner = SimulatedRunner(sched, keep_ratio=keep if mode != "fixed" else 0.5, rng_seed=seed)
        abort_p = rng.choice([0.0, 0.0, 0.05])
    else:
        runner = SimulatedRunner(sched, keep_ratio=keep, error_rate=rng.choice([0.0, 0.0, 0.1, 0.3]),
                                 missing_rate=rng.choice([0.0, 0.0, 0.1]), rng_seed=seed)
        abort_p = rng.choice([0.0, 0.05, 0.15, 0.3])
    coverage.add("profile_" + profile)

    by_id = {s.request_id: s for s in specs}
    requests = {s.request_id: make_request(sched, s.request_id, s.words, images=s.images, max_tokens=s.max_tokens,
                                           extra_args=s.extra_args) for s in specs}
    originals = {rid: list(r.prompt_token_ids) for rid, r in requests.items()}
    arrivals: dict[int, list] = {}
    for s in specs:
        arrivals.setdefault(s.arrival, []).append(requests[s.request_id])
    aborted: set[str] = set()
    checked_rewrite: set[str] = set()
    seen_pruned: set[str] = set()  # pruned identifiers the runner's encoder cache has held

    def live_ids():
        return [rid for rid, r in sched.requests.items() if not r.is_finished()]

    def maybe_abort(when: str) -> None:
        if not abort_p or rng.random() >= abort_p:
            return
        candidates = live_ids()
        if not candidates:
            return
        probing = [r for r in candidates if (st := sched.asymvlm_state(r)) is not None and st.phase == "probing"]
        readmit = [r for r in candidates if (st := sched.asymvlm_state(r)) is not None and st.phase == "pruned"
                   and sched.requests[r].status == RequestStatus.WAITING]
        pick = rng.random()
        if probing and pick < 0.35:
            target, kind = rng.choice(probing), "abort_probing"
        elif readmit and pick < 0.7:
            target, kind = rng.choice(readmit), "abort_before_readmission"
        else:
            target, kind = rng.choice(candidates), "abort_" + when
        done = sched.finish_requests([target], RequestStatus.FINISHED_ABORTED)
        assert [r.request_id for r in done] == [target]
        assert target not in aborted
        aborted.add(target)
        coverage.add(kind)

    def after_schedule(step, so, mro):
        plan = so.asymvlm
        assert isinstance(plan, StepPlan)
        for rid, n in so.num_scheduled_tokens.items():
            request = sched.requests[rid]
            state = sched.asymvlm_state(rid)
            if rid in plan.probes:
                # The probe: all images' encoder inputs, and only text before the first image.
                coverage.add("probe")
                if len({f.identifier for f in request.mm_features}) < len(request.mm_features):
                    coverage.add("probe_same_image_twice")
                first = request.mm_features[0].mm_position.offset
                before = request.num_computed_tokens - n
                assert n <= max(1, first - before), (rid, n, first, before)
                assert plan.probes[rid].features == list(range(len(request.mm_features)))
                assert set(so.scheduled_encoder_inputs.get(rid, ())) <= set(plan.probes[rid].features)
                if before == 0 and first == 0:
                    coverage.add("probe_offset_0")
            else:
                assert state is None or state.phase != "probing", f"{rid} scheduled while its decision is pending"
            # Never more than the request's remaining tokens (prompt, possibly pruned, + outputs).
            placeholders = request.num_output_placeholders - (1 if async_scheduling and not request.is_prefill_chunk else 0)
            assert request.num_computed_tokens <= request.num_tokens + placeholders, (rid, n)
        for new in so.scheduled_new_reqs:
            if new.num_computed_tokens:
                coverage.add("prefix_hit")
        if plan.materialize:
            coverage.add("materialize", len(plan.materialize))
        for rid in so.preempted_req_ids or ():
            # Preempted in this schedule() (memory pressure), not released by a rewrite: only
            # a real preemption leaves the request PREEMPTED (a rewrite re-queues it WAITING).
            request = sched.requests.get(rid)
            if request is None or request.status != RequestStatus.PREEMPTED:
                continue
            coverage.add("preempted")
            state = sched.asymvlm_state(rid)
            if state is None:
                continue
            if state.phase in ("probing", "pruned"):
                coverage.add(f"preempted_while_{state.phase}")
            elif state.phase == "new" and state.outcome.get("status") is None:
                coverage.add("preempted_before_probe")  # text before its image prefilled, probe pending
        for rid, n in so.num_scheduled_tokens.items():
            state = sched.asymvlm_state(rid)
            request = sched.requests[rid]
            if (n and state is not None and state.phase == "pruned" and request.is_prefill_chunk
                    and request.num_prompt_tokens < len(originals[rid])):
                # The re-admitted pruned prompt, prefilled over more than one step.
                coverage.add("chunked_pruned_prefill")
        for rid, indices in so.scheduled_encoder_inputs.items():
            if rid in plan.probes:
                continue
            request = sched.requests[rid]
            for index in indices:
                identifier = request.mm_features[index].identifier
                if "#asymvlm" not in identifier:
                    continue
                # The encoder runs for a pruned identifier: the runner stores its output sliced
                # to the keep set the plan carries.
                how = plan.materialize.get(identifier)
                assert how is not None, f"{rid}: encoder scheduled for {identifier} without its keep set"
                assert runner.encoder_cache.get(identifier) == len(how.keep_rows) < how.num_rows
                coverage.add("reencode_pruned_evicted" if identifier in seen_pruned else "reencode_pruned")
        seen_pruned.update(k for k in runner.encoder_cache if "#asymvlm" in k)
        for request in sched.running:
            held = blocks_of(sched, request.request_id)
            assert held <= math.ceil((request.num_prompt_tokens + request.max_tokens) / bs), (request.request_id, held)
        for rid in so.preempted_req_ids or ():
            if rid in had_holes:  # as checked before this schedule()
                coverage.add("preempted_with_holes")
        check_evictions(lag=1 if async_scheduling else 0)
        maybe_abort("in_flight")

    had_holes: set[str] = set()
    managers = sched.kv_cache_manager.coordinator.single_type_managers

    def check_evictions(lag: int) -> None:
        """Holes only where eviction may make them, as many as the scheduler counts, and an
        evicting request within its cap of live blocks (one block more while the async
        scheduler has not yet heard of the previous step's eviction)."""
        had_holes.clear()
        for rid, request in sched.requests.items():
            record = sched._text_active(rid)
            blocks = managers[0].req_to_blocks.get(rid, [])
            holes = [i for i, b in enumerate(blocks) if b.is_null]
            if record is None:
                assert not holes, f"{rid} has holes without eviction"
                continue
            assert len(holes) == record.holes, (rid, holes, record.holes)
            first = math.ceil(request.num_prompt_tokens / bs)
            assert all(i >= first for i in holes), f"{rid}: a prompt or vision block was evicted: {holes}"
            if holes:
                had_holes.add(rid)
            if request.num_preemptions == 0 and request.status == RequestStatus.RUNNING:
                cap = first + math.ceil(record.policy.budget / bs) + record.policy.protected_recent_blocks + 1
                assert len(blocks) - len(holes) <= cap + lag, (rid, len(blocks), holes, cap)

    def after_update(step, so, outs):
        for rid in live_ids():
            state = sched.asymvlm_state(rid)
            request = sched.requests[rid]
            if state is None or rid in checked_rewrite or state.phase not in ("pruned", "done"):
                continue
            checked_rewrite.add(rid)
            spec = by_id[rid]
            original = originals[rid]
            decision = runner.decisions.get(rid)
            if request.num_prompt_tokens == len(original):
                assert request.prompt_token_ids == original
                continue
            coverage.add("rewritten")
            assert decision is not None and decision.error is None
            removed = sum(im.num_rows - im.num_kept for im in decision.images)
            assert request.num_prompt_tokens == len(original) - removed == len(request.prompt_token_ids)
            kept = {im.feature: im.num_kept for im in decision.images}
            lengths = [f.mm_position.length for f in request.mm_features]
            assert lengths == [kept.get(i, n) for i, (_, n, _) in enumerate(spec.images)]
            # The text is untouched and every placeholder sits inside a span.
            in_span = set()
            for f in request.mm_features:
                in_span.update(range(f.mm_position.offset, f.mm_position.offset + f.mm_position.length))
            assert [t for p, t in enumerate(request.prompt_token_ids) if p not in in_span] == spec.words
            assert all(request.prompt_token_ids[p] == IMAGE_TOKEN_ID for p in in_span)

    def before_schedule(step):
        check_evictions(lag=1 if async_scheduling else 0)
        maybe_abort("waiting")

    result = drive(sched, runner, arrivals=arrivals, before_schedule=before_schedule, after_schedule=after_schedule,
                   after_update=after_update, max_steps=5000)

    # Every request finished or was aborted, exactly once.
    assert set(result.finished) | aborted == set(by_id), "requests vanished"
    assert not set(result.finished) & aborted, "aborted requests also finished"
    coverage.add("aborted", len(aborted))
    for rid, out in result.finished.items():
        spec = by_id[rid]
        assert result.tokens[rid] == [SAMPLED_TOKEN_ID] * spec.max_tokens
        outcome = (out.kv_transfer_params or {}).get("asymvlm")
        text = (spec.extra_args or {}).get("asymvlm_text_budget")
        if text is not None:
            assert outcome is not None and outcome["text"]["status"] == "on", outcome
            assert outcome["text"]["budget_tokens"] == text
            coverage.add("evicted_blocks", outcome["text"]["evicted_blocks"])
        if not spec.images:
            assert outcome is None or set(outcome) == {"text"}
            continue
        assert outcome is not None and {"status", "vision_tokens", "vision_tokens_kept"} <= set(outcome)
        assert outcome["vision_tokens"] == sum(n for _, n, _ in spec.images)
        assert 0 < outcome["vision_tokens_kept"] <= outcome["vision_tokens"]
        coverage.add("status_" + outcome["status"])
        decision = runner.decisions.get(rid)
        if outcome["status"] == "pruned":
            assert outcome["vision_tokens_kept"] == sum(im.num_kept for im in decision.images)
            coverage.add("pruned_tokens_saved", outcome["vision_tokens"] - outcome["vision_tokens_kept"])
        else:
            assert outcome["vision_tokens_kept"] == outcome["vision_tokens"]
        if (spec.extra_args or {}).get("asymvlm") == "off":
            assert outcome["status"] == "off"
    coverage.add("evictions", len(runner.evictions))
    coverage.add("evictions_of_aborted", len({rid for rid, _ in runner.evictions} & aborted))
    assert_drained(sched, num_blocks)
    assert not sched._text, "eviction records left behind"
    pool = sched.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null), "a block was freed twice or never"


CHUNKS = 2  # two tests per scheduler kind keep each under ~20 s on a 2-core machine


def _run_many(async_scheduling: bool, chunk: int) -> Coverage:
    coverage = Coverage()
    only = os.environ.get("ASYMVLM_SCHED_SEED")
    seeds = [int(only)] if only else range(chunk, EPISODES, CHUNKS)
    for seed in seeds:
        try:
            run_episode(seed, async_scheduling, coverage)
        except Exception as e:  # name the seed: ASYMVLM_SCHED_SEED=<seed> replays it
            raise AssertionError(f"episode seed={seed} async={async_scheduling} failed: {e!r}") from e
    return coverage


@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_randomized_episodes_leave_nothing_behind(async_scheduling, chunk):
    if os.environ.get("ASYMVLM_SCHED_SEED") and chunk:
        pytest.skip("one seed replays in the first chunk")
    coverage = _run_many(async_scheduling, chunk)
    print(f"coverage ({'async' if async_scheduling else 'sync'}, chunk {chunk}):", dict(sorted(coverage.counts.items())))
    if os.environ.get("ASYMVLM_SCHED_SEED") or EPISODES < 400:
        return
    c = coverage.counts
    # The mix must actually reach every path it is meant to.
    for key in ("probe", "probe_offset_0", "probe_same_image_twice", "rewritten", "materialize", "prefix_hit",
                "preempted", "preempted_before_probe", "abort_probing", "abort_before_readmission", "abort_in_flight",
                "abort_waiting", "status_pruned", "status_error", "status_off", "status_too_large",
                "status_prefix_cached"):
        assert c.get(key, 0) >= 3, f"episodes never (or rarely) hit {key}: {c}"
    assert c.get("pruned_tokens_saved", 0) > 0
    for key in ("evictions", "evicted_blocks", "preempted_with_holes", "evictions_of_aborted"):
        assert c.get(key, 0) >= 3, f"episodes never (or rarely) hit {key}: {c}"
    # The hard paths, at least 10 times in each chunk (so per scheduler kind as well):
    # - preempted while pruned: re-admitted after the rewrite, then preempted;
    # - a re-admitted pruned prompt prefilled over more than one step;
    # - a pruned encoder-cache entry evicted, then the encoder run again for the pruned
    #   identifier and its output sliced to the keep set (checked in after_schedule);
    # - async only: preempted while probing (held, its decision in flight), then rewritten
    #   while it waits. The sync scheduler applies every decision before the next schedule(),
    #   the only place where preemption happens, so a probing request cannot be preempted there.
    hard = ["preempted_while_pruned", "chunked_pruned_prefill", "reencode_pruned_evicted"]
    if async_scheduling:
        hard.append("preempted_while_probing")
    else:
        assert c.get("preempted_while_probing", 0) == 0, c
    for key in hard:
        assert c.get(key, 0) >= 10, f"episodes reached {key} only {c.get(key, 0)} times (at least 10 needed): {c}"


def test_the_runner_model_catches_a_scheduler_that_forgets_to_materialize():
    """The harness itself: without the plan's materialize entries, the re-admitted request's
    pruned embeddings are missing from the runner's encoder cache, and the runner says so."""
    sched = build_scheduler(64, 8, UNIFORM_HALF, max_num_batched_tokens=256, max_num_seqs=8)
    original_schedule = sched.schedule

    def forgetful_schedule(*args, **kwargs):
        output = original_schedule(*args, **kwargs)
        output.asymvlm.materialize = {}
        return output

    sched.schedule = forgetful_schedule
    req = make_request(sched, "r0", text(6), images=[(2, 40, "img0")])
    with pytest.raises(SimulationError, match="encoder cache miss"):
        drive(sched, SimulatedRunner(sched, keep_ratio=0.5), [req])


# Regression: a request held back from probing must not keep references on cached images.
@pytest.mark.parametrize("async_scheduling", ASYNC)
def test_requests_held_back_from_probing_do_not_pin_cached_images(async_scheduling):
    def run(asymvlm_config):
        sched = build_scheduler(64, 8, asymvlm_config, async_scheduling=async_scheduling, max_num_batched_tokens=64,
                                max_num_seqs=8, encoder_cache_size=38, max_num_encoder_input_tokens=38)
        words = text(12)
        reqs = [
            make_request(sched, "P", words[:6], images=[(2, 22, "W"), (26, 14, "X")], max_tokens=2),
            make_request(sched, "Q4", words[:6], images=[(0, 14, "X"), (17, 15, "Z")], max_tokens=2),
            make_request(sched, "Q5", words, images=[(9, 22, "W"), (33, 15, "Z")], max_tokens=2),
        ]
        result = drive(sched, SimulatedRunner(sched, keep_ratio=0.5), reqs, max_steps=200)
        assert sorted(result.finished) == ["P", "Q4", "Q5"]
        assert_drained(sched, 64)

    run(None)  # plain vLLM
    run(UNIFORM_HALF)  # hung before the fix: RuntimeError("drive: not done after 200 steps")


# Regression: the rewrite of a request preempted while probing registered its pruned
# encoder-cache entry although the image it is sliced from had been evicted meanwhile.
@pytest.mark.parametrize("async_scheduling", [
    pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_probe_preempted_and_its_image_evicted_before_the_decision(async_scheduling):
    """Under async scheduling a probe's decision arrives after the next step was scheduled. If the
    probing request is preempted in between (here all running requests, by vLLM's
    ``reset_prefix_cache(reset_running_requests=True)``, which the engine core runs between
    steps; memory pressure does the same to the last running request), it drops its reference
    on its image, and another request's image may evict it in that very step: the runner frees
    it then. The rewrite must not then count on slicing the pruned rows from it: re-admission
    has to run the encoder again (and the runner slices its output), or the runner misses the
    pruned rows. The sync scheduler applies the decision first: nothing to recompute there."""
    sched = build_scheduler(64, 4, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=64,
                            max_num_seqs=8, encoder_cache_size=24, max_num_encoder_input_tokens=24)
    runner = SimulatedRunner(sched, keep_ratio=0.5)
    p = make_request(sched, "P", text(6), images=[(2, 16, "X")], max_tokens=3)
    q = make_request(sched, "Q", text(6, start=500), images=[(2, 16, "Y")], max_tokens=3)
    rec = Recorder(sched)

    def before_schedule(step):
        if step == 1:
            state = sched.asymvlm_state("P")
            assert state.phase == ("probing" if async_scheduling else "pruned")
            assert sched.reset_prefix_cache(reset_running_requests=True)

    result = drive(sched, runner, [p], arrivals={1: [q]}, before_schedule=before_schedule, after_schedule=rec)
    steps = rec.scheduled()
    assert list(steps[0]["plan"].probes) == ["P"] and list(steps[1]["plan"].probes) == ["Q"]
    assert steps[1]["encoder"] == {"Q": [0]}  # Y evicts X (unreferenced, 16 + 16 > 24)
    pruned = p.mm_features[0].identifier
    assert pruned.startswith("X#asymvlm8of16")
    if async_scheduling:
        # X is gone: P's pruned rows come from the encoder, run again for the pruned identifier.
        assert any(s["encoder"].get("P") == [0] for s in steps[2:])
    assert sorted(result.finished) == ["P", "Q"]
    assert all(o.kv_transfer_params["asymvlm"]["status"] == "pruned" for o in result.finished.values())
    assert result.tokens == {"P": [SAMPLED_TOKEN_ID] * 3, "Q": [SAMPLED_TOKEN_ID] * 3}
    assert_drained(sched, 64)


# Regression: a rewritten request waiting for re-admission held a reference on its pruned
# encoder-cache entry, so a running request whose image needed that space waited for it forever.
@pytest.mark.parametrize("async_scheduling", [
    pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_waiting_pruned_requests_do_not_pin_the_encoder_cache(async_scheduling):
    """W and H are probed and rewritten; R, admitted with them, has prefilled its text up to its
    image Y, which did not fit the encoder cache next to their images. H (re-queued last, so
    first in line) does not fit the free KV blocks until R finishes, and blocks the queue. R
    needs encoder-cache space that W's pruned entry takes: if W, waiting behind H, keeps a
    reference on it, neither R, H nor W ever runs. Like every waiting request in vLLM, a
    rewritten one must hold no reference: R evicts the entry, and W's re-admission runs the
    encoder again for its pruned identifier."""
    sched = build_scheduler(26, 4, UNIFORM_HALF, async_scheduling=async_scheduling, max_num_batched_tokens=64,
                            max_num_seqs=8, encoder_cache_size=40, max_num_encoder_input_tokens=40)
    runner = SimulatedRunner(sched, keep_ratio=0.5)
    w = make_request(sched, "W", text(6), images=[(2, 16, "X")], max_tokens=2)
    h = make_request(sched, "H", text(42, start=100), images=[(2, 8, "Z")], max_tokens=2)
    r = make_request(sched, "R", text(58, start=300), images=[(56, 34, "Y")], max_tokens=2,
                     extra_args={"asymvlm": "off"})
    rec = Recorder(sched)
    result = drive(sched, runner, [w, h, r], after_schedule=rec, max_steps=200)
    steps = rec.scheduled()
    assert steps[0]["tokens"] == {"W": 2, "H": 2, "R": 56} and steps[0]["encoder"] == {"W": [0], "H": [0]}
    assert sorted(result.finished) == ["H", "R", "W"]
    kept = {rid: o.kv_transfer_params["asymvlm"]["vision_tokens_kept"] for rid, o in result.finished.items()}
    assert kept == {"W": 8, "H": 4, "R": 34}
    assert_drained(sched, 26)


# Regression (issue: "never slower on the vision path"): in vLLM's default encoder cache, one
# step's encoder budget, the probes' full outputs and the pruned copies being prefilled could
# not both fit; probes waited for space and the queue drained in 1.5-1.7x plain vLLM's steps.
@pytest.mark.parametrize("async_scheduling", ASYNC)
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25])
def test_pruning_drains_an_encoder_bound_queue_as_fast_as_plain_vllm(async_scheduling, ratio):
    """60 requests of one 200-row image and 10 output tokens, all at once, encoder budget of 3
    images a step, a KV pool that never binds: the encoder paces both sides. With the cache
    vLLM's default gives (``encoder_cache_size`` left to the engine), the plugin drains in
    plain vLLM's steps plus the one step every probe adds (the last request's decision comes a
    step before its pruned prefill); in exactly vLLM's cache, without the plugin's room, it
    takes longer (1.1-1.3x here; the check that this test can fail)."""
    rows, budget = 200, 600

    def steps(config, encoder_cache_size=None) -> int:
        sched = build_scheduler(4000, 16, config, async_scheduling=async_scheduling, max_num_batched_tokens=budget,
                                max_num_seqs=64, encoder_cache_size=encoder_cache_size,
                                max_num_encoder_input_tokens=budget)
        runner = SimulatedRunner(sched, keep_ratio=ratio if config is not None else 1.0)
        reqs = [make_request(sched, f"r{i:03d}", text(20, start=10 + i), images=[(4, rows, f"img{i:03d}")],
                             max_tokens=10) for i in range(60)]
        result = drive(sched, runner, reqs, max_steps=2000)
        assert len(result.finished) == 60
        assert_drained(sched, 4000)
        return result.num_steps

    config = {"vision": {"budget": {"rule": "uniform", "ratio": ratio}, "min_keep": 1}}
    plain = steps(None)
    assert steps(config) <= plain + 1
    assert steps(config, encoder_cache_size=budget) > plain + 1
