"""AsymVLM under async scheduling in the real vLLM engine (in-process, CPU, tiny LLaVA).

vLLM's CPU platform turns async scheduling off in ``CpuPlatform.check_and_update_config``
(``vllm/platforms/cpu.py``: ``scheduler_config.async_scheduling = False``, commented "async
scheduling is not required on CPU"), after ``VllmConfig`` decided it (``config/vllm.py``, where
the in-process ``UniProcExecutor`` does support it). That is a policy, not a limit: with it
undone (:func:`_async_scheduling_on_cpu`, test-only), the engine core runs its batch queue of two
(``step_with_batch_queue``), the scheduler is :class:`AsymVLMAsyncScheduler`, the CPU model runner
returns vLLM's ``AsyncGPUModelRunnerOutput`` from ``sample_tokens`` and the AsymVLM runner attaches
its decisions to the output inside that wrapper -- the async half of
``AsymVLMRunnerMixin._attach_decisions`` that no CPU engine runs otherwise.

Checked against the same engine with async scheduling off (vLLM's CPU default), one batch of
image, two-image, text-only and per-request-option requests: the same tokens greedy and with
seeded sampling, every image request pruned with the same kept counts, each probed request held
for one step while its decision is in flight, and every KV block back in the pool.
"""

from __future__ import annotations

import pytest

from .helpers import (
    EnginePool, chat_messages, engine_core, engine_image, generated_tokens, greedy_params, model_runner,
    num_free_blocks, scheduler,
)

pytestmark = pytest.mark.slow

PRUNE_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
KV_CACHE_BYTES = 64 * 2**20
MAX_TOKENS = 6
IMAGE_TOKENS = 64  # the tiny LLaVA, 224 x 224 images


def _async_scheduling_on_cpu(monkeypatch) -> None:
    """TEST-ONLY: keep async scheduling on in engines built while this is in place."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        decided = vllm_config.scheduler_config.async_scheduling
        original(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = decided

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", classmethod(check_and_update_config))


class _Trace:
    """What the engine's scheduler scheduled and how the runner sent its decisions back."""

    def __init__(self, llm, monkeypatch):
        self.probes: list[str] = []  # requests probed, in order
        self.phase_next_step: list[str] = []  # their phase when the next step is scheduled
        self.decision_carriers: list[str] = []  # type of the runner output the decisions rode on
        sched, runner = scheduler(llm), model_runner(llm)
        schedule, attach = sched.schedule, runner._attach_decisions
        last_probes: list[str] = []

        def traced_schedule(*args, **kwargs):
            for request_id in last_probes:
                state = sched.asymvlm_state(request_id)
                self.phase_next_step.append(state.phase if state is not None else "finished")
            output = schedule(*args, **kwargs)
            last_probes[:] = output.asymvlm.probes
            self.probes.extend(output.asymvlm.probes)
            return output

        def traced_attach(output):
            pending = bool(runner._asymvlm_pending or runner._asymvlm_launched)
            result = attach(output)
            if pending and not (runner._asymvlm_pending or runner._asymvlm_launched):
                self.decision_carriers.append(type(output).__name__)
            return result

        monkeypatch.setattr(sched, "schedule", traced_schedule)
        monkeypatch.setattr(runner, "_attach_decisions", traced_attach)



@pytest.fixture(scope="module")
def engines(engine_models):
    """``{"async": llm, "sync": llm}``: the tiny LLaVA with AsymVLM (uniform 0.5)."""
    with EnginePool(engine_models) as pool:
        with pytest.MonkeyPatch.context() as monkeypatch:
            _async_scheduling_on_cpu(monkeypatch)
            pool.build("async", "llava", PRUNE_HALF, KV_CACHE_BYTES)
        pool.build("sync", "llava", PRUNE_HALF, KV_CACHE_BYTES)
        yield pool.llms


def _batch(first_image: int) -> list[tuple[list[dict], dict | None]]:
    """(messages, extra_args) per request; images first_image.. (each run its own, so no run
    reuses another's prefix cache)."""
    i = first_image
    return [
        (chat_messages(engine_image(i), "What is shown in this picture?"), None),
        (chat_messages(engine_image(i + 1), "Which colour is the largest shape?"), None),
        (chat_messages([engine_image(i + 2), engine_image(i + 3)], "Compare the two charts."), None),
        (chat_messages(None, "Describe a chart in one sentence."), None),
        (chat_messages(engine_image(i + 4), "What is shown in this picture?"), {"asymvlm_keep_ratio": 0.25}),
    ]


EXPECTED_KEPT = [IMAGE_TOKENS // 2, IMAGE_TOKENS // 2, IMAGE_TOKENS, None, IMAGE_TOKENS // 4]


def _run(llm, monkeypatch, first_image: int, seeded: bool):
    from vllm import SamplingParams

    batch = _batch(first_image)
    params = []
    for n, (_, extra) in enumerate(batch):
        if seeded:
            params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=100 + n, ignore_eos=True,
                                         extra_args=extra))
        else:
            params.append(greedy_params(MAX_TOKENS, extra_args=extra))
    trace = _Trace(llm, monkeypatch)
    free_before = num_free_blocks(llm)
    outputs = llm.chat([messages for messages, _ in batch], params)
    assert num_free_blocks(llm) == free_before, "KV blocks not returned"
    assert not scheduler(llm).requests
    outcomes = [(o.kv_transfer_params or {}).get("asymvlm") for o in outputs]
    return generated_tokens(outputs), outcomes, trace


def test_the_async_engine_runs_the_async_scheduler(engines):
    assert type(scheduler(engines["async"])).__name__ == "AsymVLMAsyncScheduler"
    assert engine_core(engines["async"]).batch_queue_size == 2
    assert type(scheduler(engines["sync"])).__name__ == "AsymVLMScheduler"
    assert engine_core(engines["sync"]).batch_queue is None


@pytest.mark.parametrize("seeded", [pytest.param(False, id="greedy"), pytest.param(True, id="seeded")])
def test_async_pruning_matches_sync(engines, monkeypatch, seeded):
    first_image = 20 if seeded else 10
    async_tokens, async_outcomes, async_trace = _run(engines["async"], monkeypatch, first_image, seeded)
    sync_tokens, sync_outcomes, sync_trace = _run(engines["sync"], monkeypatch, first_image, seeded)

    assert async_tokens == sync_tokens
    assert all(len(tokens) == MAX_TOKENS for tokens in async_tokens)
    for outcome, sync_outcome, kept in zip(async_outcomes, sync_outcomes, EXPECTED_KEPT):
        if kept is None:  # text only
            assert outcome is None and sync_outcome is None
            continue
        assert outcome["status"] == sync_outcome["status"] == "pruned", (outcome, sync_outcome)
        assert outcome["vision_tokens_kept"] == sync_outcome["vision_tokens_kept"] == kept
        assert outcome["images"] == sync_outcome["images"]
        assert outcome["prompt_tokens_prefilled"] == sync_outcome["prompt_tokens_prefilled"]

    # Four image requests, each probed once.
    assert len(async_trace.probes) == len(set(async_trace.probes)) == 4
    assert len(sync_trace.probes) == len(set(sync_trace.probes)) == 4
    # Async: each probe's decision is still in flight when the next step is planned (that step
    # holds the request); the decisions come back inside vLLM's async output wrapper.
    assert async_trace.phase_next_step == ["probing"] * 4
    assert set(async_trace.decision_carriers) == {"AsyncGPUModelRunnerOutput"}
    # Sync: every decision is applied before the next step.
    assert sync_trace.phase_next_step == ["pruned"] * 4
    assert set(sync_trace.decision_carriers) == {"ModelRunnerOutput"}


def _evicting_run(llm):
    """One long answer with a 32-token eviction budget (asked per request)."""
    sched = scheduler(llm)
    sched.eviction_log = []
    free_before = num_free_blocks(llm)
    try:
        (out,) = llm.chat([chat_messages(engine_image(40), "Describe this picture at length.")],
                          greedy_params(160, extra_args={"asymvlm_text_budget": 32}))
    finally:
        log, sched.eviction_log = sched.eviction_log, None
    assert num_free_blocks(llm) == free_before and not sched.requests
    return list(out.outputs[0].token_ids), [choice.block_indices for _, choice in log], out.kv_transfer_params


def test_async_eviction_matches_sync(engines):
    """The runner punches its holes right after the step that chose them, so the next step,
    already scheduled under async scheduling, attends exactly as the synchronous engine does;
    the scheduler frees the blocks one step later, before they can be handed out again."""
    async_tokens, async_evictions, async_params = _evicting_run(engines["async"])
    sync_tokens, sync_evictions, sync_params = _evicting_run(engines["sync"])
    assert len(sync_evictions) >= 3
    assert async_evictions == sync_evictions
    assert async_tokens == sync_tokens
    drop = ("eviction_seconds", "peak_live_blocks")
    strip = lambda p: {k: v for k, v in p["asymvlm"]["text"].items() if k not in drop}  # noqa: E731
    assert strip(async_params) == strip(sync_params)
    # The async scheduler allocates the next step's slots before it hears of this step's
    # eviction: at most one block more at the peak.
    peaks = async_params["asymvlm"]["text"]["peak_live_blocks"], sync_params["asymvlm"]["text"]["peak_live_blocks"]
    assert peaks[1] <= peaks[0] <= peaks[1] + 1
