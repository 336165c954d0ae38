"""The scheduler ↔ runner protocol survives pickling, as vLLM's multiprocess executor sends it.

Under tensor parallelism (or any multiprocess executor) the engine core broadcasts each
``SchedulerOutput`` to the workers through a shared-memory ``MessageQueue``, which pickles it
(``pickle.Pickler`` with the highest protocol, ``distributed/device_communicators/shm_broadcast.py``),
and rank 0's ``ModelRunnerOutput`` comes back the same way. AsymVLM's plan rides on the former
(attribute ``asymvlm``) and its decisions on the latter (``asymvlm_decisions``); both are extra
attributes on vLLM's dataclasses. ``tests/engine/test_tp_engine.py`` runs the real thing.
"""

from __future__ import annotations

import pickle

from asymvlm_vllm.engine.protocol import ImageDecision, Materialize, ProbeSpec, RequestDecision, StepPlan
from asymvlm_vllm.engine.simulation import SimulatedRunner, build_scheduler, make_request


def roundtrip(obj):
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def test_protocol_objects_roundtrip():
    plan = StepPlan(
        probes={"r0": ProbeSpec([0, 1], {"asymvlm_keep_ratio": 0.25}), "r1": ProbeSpec([0])},
        materialize={"img#asymvlm2of4-ab": Materialize("img", [0, 3], 4)},
        mrope={"r2": ([[0, 1, 2], [0, 1, 1], [0, 0, 1]], -3)},
    )
    decision = RequestDecision(
        images=[ImageDecision(feature=0, num_rows=4, num_prunable=3, keep_rows=[0, 3], gap=0.25, budget_ratio=0.5)],
        mrope_positions=[[0, 1], [0, 1], [0, 1]], mrope_next_position=7, scoring_seconds=0.01)
    failed = RequestDecision(error="the prompt has no text tokens to score its images against")
    for obj in (plan, StepPlan(), decision, failed):
        copy = roundtrip(obj)
        assert copy == obj and type(copy) is type(obj)
    assert not roundtrip(StepPlan()) and roundtrip(plan)
    assert roundtrip(decision).images[0].num_kept == 2


def test_scheduler_output_and_runner_output_carry_them_through_pickle():
    """vLLM's own objects from a real probe step, with AsymVLM's attributes on them."""
    sched = build_scheduler(64, 8, {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}},
                            max_num_batched_tokens=256, max_num_seqs=8)
    runner = SimulatedRunner(sched, keep_ratio=0.5)
    sched.add_request(make_request(sched, "r0", list(range(10, 20)), images=[(4, 24, "img0")], max_tokens=2))
    scheduler_output = sched.schedule()
    assert list(scheduler_output.asymvlm.probes) == ["r0"]
    runner_output = runner.step(scheduler_output)
    assert list(runner_output.asymvlm_decisions) == ["r0"]

    sent = roundtrip(scheduler_output)
    assert sent.asymvlm == scheduler_output.asymvlm
    assert sent.scheduled_encoder_inputs == {"r0": [0]} and sent.num_scheduled_tokens == {"r0": 4}
    back = roundtrip(runner_output)
    assert back.asymvlm_decisions == runner_output.asymvlm_decisions
    # The scheduler applies the copy as it would the original: rewrite, then re-admission.
    sched.update_from_output(scheduler_output, back)
    assert sched.asymvlm_state("r0").phase == "pruned"
    readmit = roundtrip(sched.schedule())
    assert readmit.num_scheduled_tokens == {"r0": 10 + 12}
    assert list(readmit.asymvlm.materialize) == [sched.requests["r0"].mm_features[0].identifier]
