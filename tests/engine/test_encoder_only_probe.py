"""Encoder-only probe steps (``vision.encoder_only_probes``, on by default) in the real engine.

A step that schedules nothing but probes runs the vision encoder and the decision, and skips
the language model's forward pass and sampling: the probe's few text tokens are counted
computed without KV, and the scheduler gives those blocks back whatever the decision (rewrite,
keep everything, error), so the request is prefilled from its first uncached token. Checked
here on the in-process CPU engine (tiny LLaVA, uniform keep 0.5) against the same engine with
``encoder_only_probes: false``, the probe with its forward pass:

* which steps are encoder-only: a lone probe is; a probe beside a decoding request is not; a
  probe whose text before the image fills a KV block is not (that block would be offered to
  the prefix cache unwritten);
* the same tokens and kept counts on both engines, greedy and seeded, for a pruned request, a
  request that keeps every row (it starts over unrewritten), a long prefix, two requests in a
  step, and a prefix-cache hit on the long prefix afterwards;
* every KV block back in the pool, and no request left behind.
"""

from __future__ import annotations

import pytest

from .helpers import EnginePool, engine_image, greedy_params, num_free_blocks, scheduler

pytestmark = pytest.mark.slow

PRUNE_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
KV_CACHE_BYTES = 64 * 2**20
LONG_PREFIX = ("You are a careful assistant who looks at every part of a picture before answering, "
               "and who answers in one short sentence without guessing what is not visible. ")


def _prompt(seed: int, prefix: str = "") -> dict:
    return {"prompt": f"{prefix}USER: <image>\nWhat is shown in this picture?\nASSISTANT:",
            "multi_modal_data": {"image": engine_image(seed)}}


class _Steps:
    """Each step's ``(encoder_only, probes, {request id: scheduled tokens})`` as planned."""

    def __init__(self, llm):
        self.log: list[tuple[bool, list[str], list[str]]] = []
        sched = scheduler(llm)
        self._sched, self._schedule = sched, sched.schedule

        def traced(*args, **kwargs):
            output = self._schedule(*args, **kwargs)
            self.log.append((output.asymvlm.encoder_only, sorted(output.asymvlm.probes),
                             dict(output.num_scheduled_tokens)))
            return output

        sched.schedule = traced

    def close(self):
        del self._sched.schedule


@pytest.fixture(scope="module")
def engines(engine_models):
    """``{"encoder_only": llm, "with_forward": llm}``: the same plugin config but the probe step."""
    with EnginePool(engine_models) as pool:
        pool.build("encoder_only", "llava", PRUNE_HALF, KV_CACHE_BYTES)
        pool.build("with_forward", "llava", {"vision": {**PRUNE_HALF["vision"], "encoder_only_probes": False}},
                   KV_CACHE_BYTES)
        yield pool.llms


def _run(llm, prompts: list[dict], params) -> tuple[list[list[int]], list[dict], list]:
    steps = _Steps(llm)
    free = num_free_blocks(llm)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        steps.close()
    assert num_free_blocks(llm) == free, "KV blocks leaked"
    assert not scheduler(llm).has_unfinished_requests()
    return ([list(o.outputs[0].token_ids) for o in outputs],
            [(o.kv_transfer_params or {}).get("asymvlm") for o in outputs], steps.log)


def _same_on_both(engines, prompts, params):
    ours = _run(engines["encoder_only"], prompts, params)
    theirs = _run(engines["with_forward"], prompts, params)
    assert ours[0] == theirs[0], "tokens differ from the probe with its forward pass"
    strip = [{k: v for k, v in o.items() if not k.endswith("_seconds")} for o in ours[1]]
    assert strip == [{k: v for k, v in o.items() if not k.endswith("_seconds")} for o in theirs[1]]
    assert not any(encoder_only for encoder_only, _, _ in theirs[2]), "encoder_only_probes: false was ignored"
    return ours


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_lone_probe_skips_the_forward_pass_and_answers_the_same(engines, sampling):
    from vllm import SamplingParams

    params = greedy_params(6) if sampling == "greedy" else SamplingParams(max_tokens=6, temperature=0.8, seed=7,
                                                                          ignore_eos=True)
    seed = 10 if sampling == "greedy" else 11
    _, (outcome,), log = _same_on_both(engines, [_prompt(seed)], params)
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] == 32
    assert log[0][0] and log[0][1] == sorted(log[0][2]), log[0]  # the first step: the probe, encoder-only
    assert not any(encoder_only for encoder_only, _, _ in log[1:])


def test_a_request_that_keeps_every_row_starts_over_unrewritten(engines):
    params = greedy_params(6, extra_args={"asymvlm_keep_ratio": 1.0})
    _, (outcome,), log = _same_on_both(engines, [_prompt(20)], params)
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 64
    # The probe (encoder-only), then, not rewritten but started over, the whole prompt.
    (probe_id,) = log[0][1]
    assert log[0][0] and log[1][2] == {probe_id: outcome["prompt_tokens"]}, log[:2]


def test_a_probe_that_would_fill_a_block_runs_the_forward_pass(engines):
    """Text before the image past a 32-token block: that block would enter the prefix cache
    unwritten, so the step keeps its forward pass; a later request reuses the block."""
    prompt = _prompt(30, LONG_PREFIX)
    _, (outcome,), log = _same_on_both(engines, [prompt], greedy_params(6))
    assert outcome["status"] == "pruned" and not log[0][0] and log[0][1] == sorted(log[0][2])
    # Same prefix, another image: a prefix-cache hit on the written block, pruned, same answer.
    _, (outcome,), log = _same_on_both(engines, [_prompt(31, LONG_PREFIX)], greedy_params(6))
    assert outcome["status"] == "pruned"


def test_a_probe_beside_other_work_runs_the_forward_pass(engines):
    """Two requests at once: their probes share the first step (encoder-only); a request
    arriving while another decodes is probed in a step with a forward pass."""
    _, outcomes, log = _same_on_both(engines, [_prompt(40), _prompt(41)], greedy_params(6))
    assert [o["status"] for o in outcomes] == ["pruned", "pruned"]
    assert log[0][0] and len(log[0][1]) == 2

    llm = engines["encoder_only"]
    engine = llm.llm_engine
    steps = _Steps(llm)
    free = num_free_blocks(llm)
    try:
        engine.add_request("first", _prompt(42), greedy_params(8))
        for _ in range(3):  # the probe (encoder-only), the pruned prefill, a decode step
            engine.step()
        engine.add_request("second", _prompt(43), greedy_params(4))
        finished = {}
        for _ in range(20):
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
            if not engine.has_unfinished_requests():
                break
    finally:
        steps.close()
    assert len(finished) == 2 and not engine.has_unfinished_requests()
    # The engine core knows the requests by the ids vLLM makes of the given ones (a suffix added).
    first, second = (next(r for _, probes, _ in steps.log for r in probes if r.startswith(name))
                     for name in ("first", "second"))
    assert steps.log[0][0] and steps.log[0][1] == [first] and not steps.log[1][0] and not steps.log[2][0]
    probe_steps = [(encoder_only, sorted(scheduled)) for encoder_only, probes, scheduled in steps.log
                   if second in probes]
    assert probe_steps == [(False, sorted([first, second]))], probe_steps
    assert finished["second"].kv_transfer_params["asymvlm"]["status"] == "pruned"
    assert num_free_blocks(llm) == free
