"""What text eviction costs per decode step in vLLM's engine: plain decoding vs eviction, same run.

One engine (vLLM's own engine with the AsymVLM plugin, in process) generates ``--requests``
long answers of ``--output-tokens`` greedy tokens from a local model directory, twice, with
the budget asked per request:

* ``never due``: a budget above every answer (what every user of the plugin pays: nothing but
  the compaction check);
* ``evict``: a budget of ``--budget`` generated tokens.

Reported: decode time per step (median over the steps after the first ``--warmup``), the time the
evicting runs spent choosing blocks (the outcome's ``eviction_seconds``), that time as a share
of all decode steps and of the steps that evicted, and the ratios of the evicting run to the
never-due run. Rows go to ``benchmarks/results/eviction_cost.json`` with commit, dirty flag,
device and versions.

On a machine without a GPU, ``--cpu-test-engine`` runs vLLM's CPU engine with the test suite's
pure-torch stand-ins for vLLM's compiled CPU ops (``tests/engine/cpu_shim``) and a tiny
random-weight model built offline: the plumbing, not a speed claim. The number that matters is
the one on a GPU, with a real model directory::

    python benchmarks/eviction_cost.py --model /models/gemma-3-4b-it --output-tokens 512 --budget 90
    python benchmarks/eviction_cost.py --cpu-test-engine          # anywhere, ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_engine_arguments, append_rows, in_process_engines, provenance  # noqa: E402


def _run(llm, requests: int, output_tokens: int, budget: int, warmup: int, tag: str = "warmup") -> dict:
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True,
                            extra_args={"asymvlm_text_budget": budget})
    for i in range(requests):
        engine.add_request(f"{tag}-{i}", {"prompt": f"Request {i} ({tag}): tell a long story about shapes."}, params)
    step_seconds, outcomes = [], []
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        outputs = engine.step()
        step_seconds.append(time.perf_counter() - started)
        outcomes += [o.kv_transfer_params["asymvlm"]["text"] for o in outputs if o.finished]
    decode = step_seconds[warmup:]
    choose = sum(o["eviction_seconds"] for o in outcomes)
    return {"steps": len(step_seconds), "median_step_seconds": statistics.median(decode),
            "decode_seconds": sum(decode), "evicted_blocks": sum(o["evicted_blocks"] for o in outcomes),
            "eviction_steps": sum(o["eviction_steps"] for o in outcomes), "eviction_seconds": choose,
            "eviction_share_of_decode": choose / sum(decode)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="benchmarks/eviction_cost.py", description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=160)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting; the fastest is kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "eviction_cost.json")
    args = parser.parse_args(argv)
    if not args.model and not args.cpu_test_engine:
        parser.error("give --model DIR or --cpu-test-engine")
    build, _, device = in_process_engines(args.model, args.cpu_test_engine, "eviction-cost")
    config = {"text": {"enabled": True, "budget_tokens": args.budget}}
    env = provenance(device, "vllm", "torch")
    rows = []
    llm = build(config)
    _run(llm, args.requests, 2 * args.warmup + 8, 1 << 20, args.warmup)  # warm the engine up; not reported
    runs: dict[str, list[dict]] = {"never due": [], "evict": []}
    for round_ in range(args.rounds):  # interleaved, so that drift hits both settings alike
        for name, budget in (("never due", 1 << 20), ("evict", args.budget)):
            runs[name].append(_run(llm, args.requests, args.output_tokens, budget, args.warmup, tag=f"{name}-{round_}"))
    for name, budget in (("never due", 1 << 20), ("evict", args.budget)):
        metrics = min(runs[name], key=lambda m: m["median_step_seconds"])  # the least disturbed round
        rows.append({**env, "setting": name, "budget": budget, "requests": args.requests,
                     "output_tokens": args.output_tokens, "rounds": args.rounds, **metrics})
        print(f"{name:>9}: {metrics['steps']} steps, median {metrics['median_step_seconds'] * 1e3:.2f} ms/step, "
              f"{metrics['evicted_blocks']} blocks evicted in {metrics['eviction_steps']} request-steps, "
              f"choosing {metrics['eviction_seconds'] * 1e3:.1f} ms = {100 * metrics['eviction_share_of_decode']:.2f} % "
              f"of decode time", flush=True)
    base, evict = rows
    evict["median_step_ratio"] = evict["median_step_seconds"] / base["median_step_seconds"]
    evict["decode_seconds_ratio"] = evict["decode_seconds"] / base["decode_seconds"]
    print(f"evicting / never due: median step {evict['median_step_ratio']:.3f}x, decode time {evict['decode_seconds_ratio']:.3f}x")
    append_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
