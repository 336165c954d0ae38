"""Where the plugin's time goes per image request: probe step, scoring, rewrite, block hashes,
encoder-cache copy, re-prefill, against plain vLLM's time to first token, same run.

Three in-process engines of vLLM: plain; with ``--plugin asymvlm`` and its probe running the
language model's forward pass (``vision.encoder_only_probes: false``, how every probe ran before
commit 2cb6f9a); and with the plugin's defaults, where a step that only probes skips the forward
pass. The same requests go to all three one at a time (concurrency 1, so every step belongs to
one request), interleaved, each stepped by hand until its first token. Per request it records
each engine step's wall time and what the plugin did inside it, by timing the plugin's own
methods on the live engine:

* ``probe step``: the step that runs the encoder and decides (its ``decide``: text embedding,
  scoring and selection, launched in ``_execute_mm_encoder`` and read back after the forward);
* ``rewrite``: applying the decision in the scheduler: planning the pruned prompt, then the
  rewrite proper (recomputing the block hashes, registering the pruned encoder-cache entries);
* ``schedule``: the plugin scheduler's ``schedule`` (vLLM's own included) in all steps;
* ``encoder-cache copy``: the runner slicing the kept rows out of the full encoder output;
* ``prefill step``: the step that prefills the pruned prompt and samples the first token;
* ``decode step``: the median one-token decode step after it, what an engine step costs with
  almost nothing to compute: the floor of the probe's extra step;
* ``re-prefill``: the probe step's tokens (the text before the image), computed again after
  the rewrite unless the prefix cache gives them back; an encoder-only probe never computes
  them the first time.

Rows (one per engine, with per-request medians of each part) go to
``benchmarks/results/probe_cost.json`` with commit, dirty flag, device and versions::

    python benchmarks/probe_cost.py --cpu-test-engine              # tiny LLaVA, CPU, ~1 min
    python benchmarks/gpu/models.py /tmp/m --cpu-mid && \
    python benchmarks/probe_cost.py --cpu-test-engine --model /tmp/m/llava-mid --requests 20  # CPU, real prefill work
    python benchmarks/probe_cost.py --model /models/llava-1.5-7b-hf  # a GPU and a local model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_engine_arguments, append_rows, engine_parts, in_process_engines, provenance, refuse_dirty_results  # noqa: E402

PARTS = ("schedule", "decide", "read_back", "plan_rewrite", "rewrite", "encoder_cache_copy")


class Timers:
    """Seconds spent in named methods of live engine objects, per request being timed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started

        setattr(owner, name, timed)


def _instrument(llm, plugin: bool) -> Timers:
    timers = Timers()
    sched, runner = engine_parts(llm)
    timers.wrap(sched, "schedule", "schedule")
    if plugin:
        timers.wrap(runner, "_decide", "decide")
        timers.wrap(runner, "_collect_decisions", "read_back")
        timers.wrap(runner, "_materialize", "encoder_cache_copy")
        timers.wrap(sched, "_plan_rewrite", "plan_rewrite")
        timers.wrap(sched, "_rewrite", "rewrite")
    return timers


def _one_request(llm, timers: Timers, prompt: dict, params, name: str) -> dict:
    engine, (sched, _) = llm.llm_engine, engine_parts(llm)
    timers.seconds.clear()
    scheduled: list[int] = []
    schedule = sched.schedule

    def traced(*args, **kwargs):
        output = schedule(*args, **kwargs)
        scheduled.append(sum(output.num_scheduled_tokens.values()))
        return output

    sched.schedule = traced
    steps: list[float] = []
    started = time.perf_counter()
    engine.add_request(name, prompt, params)
    ttft = None
    first_token_step = None
    outcome = None
    try:
        while engine.has_unfinished_requests():
            step_started = time.perf_counter()
            outputs = engine.step()
            steps.append(time.perf_counter() - step_started)
            for output in outputs:
                if output.outputs and output.outputs[0].token_ids and ttft is None:
                    ttft = time.perf_counter() - started
                    first_token_step = len(steps)
                if output.finished:
                    outcome = (output.kv_transfer_params or {}).get("asymvlm")
    finally:
        sched.schedule = schedule
    prefill = [(s, n) for s, n in zip(steps[:first_token_step], scheduled) if n]
    decode = steps[first_token_step:]
    return {"ttft_seconds": ttft, "steps": len(prefill), "step_seconds": [s for s, _ in prefill],
            "tokens_scheduled": [n for _, n in prefill], "decode_step_seconds": decode,
            "parts": dict(timers.seconds), "outcome": outcome}


def _requests(count: int, offset: int):
    import numpy as np
    from PIL import Image

    for i in range(count):  # 224 x 224 noise, a new image per request (no prefix-cache hits)
        pixels = np.random.default_rng(1000 + offset + i).integers(0, 256, (224, 224, 3), dtype=np.uint8)
        yield {"prompt": "USER: <image>\nWhat is shown in this picture? Answer briefly.\nASSISTANT:",
               "multi_modal_data": {"image": Image.fromarray(pixels)}}


def _summary(runs: list[dict]) -> dict:
    mean = statistics.fmean
    steps = max(len(r["step_seconds"]) for r in runs)
    median = statistics.median
    per_step = [median(r["step_seconds"][i] for r in runs if len(r["step_seconds"]) > i) for i in range(steps)]
    tokens = [mean(r["tokens_scheduled"][i] for r in runs if len(r["tokens_scheduled"]) > i) for i in range(steps)]
    parts = {p: median(r["parts"].get(p, 0.0) for r in runs) for p in PARTS}
    decode = [s for r in runs for s in r["decode_step_seconds"]]
    return {"requests": len(runs), "ttft_mean_seconds": mean(r["ttft_seconds"] for r in runs),
            "decode_step_median_seconds": statistics.median(decode) if decode else None,
            "ttft_median_seconds": statistics.median(r["ttft_seconds"] for r in runs),
            "steps_to_first_token": mean(r["steps"] for r in runs), "step_median_seconds": per_step,
            "tokens_per_step": tokens, "parts_seconds": parts}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="benchmarks/probe_cost.py", description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--decide-with", choices=("auto", "torch", "triton"), default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "probe_cost.json")
    parser.add_argument("--allow-dirty", action="store_true", help="write results/ from an uncommitted tree")
    args = parser.parse_args(argv)
    if not args.model and not args.cpu_test_engine:
        parser.error("give --model DIR or --cpu-test-engine")
    from common import checkout

    refuse_dirty_results([args.out], checkout().get("dirty"), args.allow_dirty, "benchmarks/probe_cost.py")
    config = {"vision": {"budget": {"rule": "uniform", "ratio": args.keep_ratio}, "min_keep": 1,
                         "decide_with": args.decide_with}}
    build, free, device = in_process_engines(args.model, args.cpu_test_engine, "probe-cost")
    from vllm import SamplingParams

    # Three tokens: the steps after the first token are one-token decode steps, what an engine
    # step costs with almost no compute (the floor the probe's extra step cannot go below).
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    env = provenance(device, "vllm", "torch")
    # The probe with its forward pass ("before": every probe step ran the language model, as up
    # to commit f99ab57) and without it when a step only probes ("after", the default), measured
    # in the same run against the same plain engine.
    variants = {"plain": None, "plugin, probe with forward pass": {"encoder_only_probes": False},
                "plugin": {"encoder_only_probes": True}}
    engines = {name: build(None if extra is None else {"vision": {**config["vision"], **extra}})
               for name, extra in variants.items()}
    timers = {name: _instrument(llm, variants[name] is not None) for name, llm in engines.items()}
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    try:
        for i, prompt in enumerate(_requests(args.warmup + args.requests, 0)):
            for name, llm in engines.items():  # interleaved: drift hits every engine alike
                run = _one_request(llm, timers[name], prompt, params, f"{i}")
                if i >= args.warmup:
                    runs[name].append(run)
    finally:
        free(list(engines.values()))
    rows = []
    for name, extra in variants.items():
        summary = _summary(runs[name])
        kept = [r["outcome"].get("vision_tokens_kept") for r in runs[name] if r["outcome"]]
        rows.append({**env, "engine": name, "model": args.model or "tiny LLaVA", "keep_ratio": args.keep_ratio if extra is not None else 1.0,
                     "decide_with": args.decide_with if extra is not None else None,
                     "encoder_only_probes": None if extra is None else extra["encoder_only_probes"],
                     "vision_tokens_kept_mean": statistics.fmean(kept) if kept else None, **summary})
    plain = rows[0]
    print(f"time to first token, median of {args.requests} requests one at a time:")
    for row in rows:
        row["ttft_ratio"] = row["ttft_median_seconds"] / plain["ttft_median_seconds"]
        row["ttft_extra_seconds"] = row["ttft_median_seconds"] - plain["ttft_median_seconds"]
        print(f"  {row['engine']:>31}: {row['ttft_median_seconds'] * 1e3:6.2f} ms ({row['ttft_ratio']:.2f}x) in "
              f"{row['steps_to_first_token']:.0f} steps: " + ", ".join(
                  f"{s * 1e3:.2f} ms ({t:.0f} tokens)" for s, t in zip(row["step_median_seconds"], row["tokens_per_step"]))
              + f"; a one-token decode step {row['decode_step_median_seconds'] * 1e3:.2f} ms")
        if row["encoder_only_probes"] is not None:
            print("  " + " " * 33 + "per request: " + ", ".join(
                f"{p} {v * 1e3:.2f} ms" for p, v in row["parts_seconds"].items()))
    append_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
