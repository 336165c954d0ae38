"""AsymVLM under tensor parallelism 2 in the real vLLM engine, on CPU (tiny LLaVA).

vLLM runs TP=2 on CPU with its multiprocess executor: two worker processes, and, since the
test-only op shim has no ``init_shm_manager``, ``CpuCommunicator`` falls back to
``torch.distributed`` (gloo) for the collectives. What it needs here: thread binding off
(``VLLM_CPU_OMP_THREADS_BIND=nobind``): its default ("auto") binds each rank to its own NUMA
node and stops with "Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers" on a
one-node machine (``vllm/utils/ompmultiprocessing.py``, ``_get_autobind_cpu_ids``).

Checked: every rank runs the probe (the text embedding is a collective) and computes a decision
of its own; the scheduler receives rank 0's; both ranks then build the pruned rows of every
image from the keep set in the same ``SchedulerOutput`` (the same rows, bit for bit); the
tokens equal those of the same engine with one rank; every KV block comes back.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); the workers are
reached with ``LLM.collective_rpc``, which pickles the functions below by reference (the
workers import this module).
"""

from __future__ import annotations

import pytest

from .helpers import (
    chat_messages, engine_image, free_llm, generated_tokens, greedy_params, make_plugin_llm, num_free_blocks,
    scheduler,
)

pytestmark = pytest.mark.slow

PRUNE_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
KV_CACHE_BYTES = 64 * 2**20
MAX_TOKENS = 6
IMAGE_TOKENS = 64


def _requests():
    return [
        chat_messages(engine_image(30), "What is shown in this picture?"),
        chat_messages([engine_image(31), engine_image(32)], "Compare the two charts."),
        chat_messages(None, "Describe a chart in one sentence."),
    ]


# ---------------------------------------------------------------- run on every worker


def _install_recorder(worker) -> int:
    """Record, on this rank, its own decisions and the pruned rows it builds."""
    from vllm.distributed import get_tensor_model_parallel_rank

    runner = worker.model_runner
    log = {"decide": {}, "materialize": {}}
    worker._asymvlm_tp_log = log
    collect, materialize = runner._collect_decisions, runner._materialize

    def traced_collect():
        collect()
        for request_id, decision in runner._asymvlm_pending.items():
            log["decide"][request_id] = decision.error or [list(image.keep_rows) for image in decision.images]

    def traced_materialize(identifier, how):
        materialize(identifier, how)
        rows = runner.encoder_cache.get(identifier)
        log["materialize"][identifier] = (how.source, list(how.keep_rows),
                                          None if rows is None else rows.detach().to("cpu").clone())

    runner._collect_decisions = traced_collect
    runner._materialize = traced_materialize
    return get_tensor_model_parallel_rank()


def _fetch_log(worker) -> dict:
    return worker._asymvlm_tp_log


# ---------------------------------------------------------------- engines


def _evicting_run(llm):
    """One long answer with a 32-token eviction budget (asked per request)."""
    sched = scheduler(llm)
    sched.eviction_log = []
    try:
        (out,) = llm.chat([chat_messages(engine_image(33), "Describe this picture at length.")],
                          greedy_params(160, extra_args={"asymvlm_text_budget": 32}))
    finally:
        log, sched.eviction_log = sched.eviction_log, None
    return list(out.outputs[0].token_ids), [choice.block_indices for _, choice in log]


@pytest.fixture(scope="module")
def one_rank_tokens(engine_models):
    """The same requests on the same engine with one rank (in-process executor), and the
    evicting request's tokens and evictions."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        llm = make_plugin_llm(engine_models("llava"), PRUNE_HALF, monkeypatch, KV_CACHE_BYTES)
        try:
            tokens = generated_tokens(llm.chat(_requests(), greedy_params(MAX_TOKENS)))
            return _TokensWithEviction(tokens, _evicting_run(llm))
        finally:
            free_llm(llm)


class _TokensWithEviction(list):
    def __init__(self, tokens, eviction):
        super().__init__(tokens)
        self.eviction = eviction


def _record_evictions(worker) -> int:
    """Record, on this rank, the blocks its runner chose to evict."""
    from vllm.distributed import get_tensor_model_parallel_rank

    runner = worker.model_runner
    log = worker._asymvlm_eviction_log = []
    evict = runner._text_evict

    def traced_evict():
        evict()
        log.extend(choice.block_indices for choice in runner._text_choices.values())

    runner._text_evict = traced_evict
    return get_tensor_model_parallel_rank()


def _fetch_evictions(worker) -> list:
    return worker._asymvlm_eviction_log


@pytest.fixture(scope="module")
def tp_llm(engine_models, one_rank_tokens):
    import vllm.envs

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        vllm.envs.disable_envs_cache()  # an earlier engine may have cached the env
        llm = make_plugin_llm(engine_models("llava"), PRUNE_HALF, monkeypatch, KV_CACHE_BYTES,
                              tensor_parallel_size=2, distributed_executor_backend="mp")
        try:
            yield llm
        finally:
            free_llm(llm)


def test_both_ranks_apply_the_one_decision(tp_llm, one_rank_tokens):
    import torch

    assert sorted(tp_llm.collective_rpc(_install_recorder)) == [0, 1]
    free_before = num_free_blocks(tp_llm)
    outputs = tp_llm.chat(_requests(), greedy_params(MAX_TOKENS))
    assert num_free_blocks(tp_llm) == free_before and not scheduler(tp_llm).requests
    rank0, rank1 = tp_llm.collective_rpc(_fetch_log)

    outcomes = [(o.kv_transfer_params or {}).get("asymvlm") for o in outputs]
    assert [o and (o["status"], o["vision_tokens_kept"]) for o in outcomes] == [
        ("pruned", IMAGE_TOKENS // 2), ("pruned", IMAGE_TOKENS), None]
    assert generated_tokens(outputs) == one_rank_tokens

    # Both ranks probed both image requests (the probe's text embedding is a collective).
    assert set(rank0["decide"]) == set(rank1["decide"]) and len(rank0["decide"]) == 2
    # What the scheduler applied is rank 0's decision: the outcome's kept counts.
    for request_id, keep_sets in rank0["decide"].items():
        assert isinstance(keep_sets, list), keep_sets  # no error
    applied = {(source, tuple(rows)) for source, rows, _ in rank0["materialize"].values()}
    decided = {tuple(rows) for keep_sets in rank0["decide"].values() for rows in keep_sets}
    assert {rows for _, rows in applied} == decided and len(applied) == 3  # three images
    # Rank 1 built exactly the same entries from the same keep sets, with the same rows.
    assert rank1["materialize"].keys() == rank0["materialize"].keys()
    for identifier, (source, rows, tensor) in rank0["materialize"].items():
        source1, rows1, tensor1 = rank1["materialize"][identifier]
        assert (source1, rows1) == (source, rows)
        assert tensor is not None and tensor1 is not None and tensor.shape[0] == len(rows)
        assert torch.equal(tensor, tensor1), identifier


def test_both_ranks_evict_the_same_blocks(tp_llm, one_rank_tokens):
    """Each rank scores its own heads; the per-rank head means are all-reduced before choosing,
    so both ranks evict the blocks the one-rank engine evicts and the answer is unchanged."""
    assert sorted(tp_llm.collective_rpc(_record_evictions)) == [0, 1]
    free_before = num_free_blocks(tp_llm)
    tokens, evictions = _evicting_run(tp_llm)
    rank0, rank1 = tp_llm.collective_rpc(_fetch_evictions)
    one_rank_tokens_, one_rank_evictions = one_rank_tokens.eviction
    assert len(one_rank_evictions) >= 3
    assert rank0 == rank1 == evictions == one_rank_evictions
    assert tokens == one_rank_tokens_
    assert num_free_blocks(tp_llm) == free_before and not scheduler(tp_llm).requests
