"""Shared pieces of the kernel benchmarks: timing, the bandwidth floor, and result rows.

Every benchmark times its kernel and the torch reference in the same run and reports the
ratio, plus achieved GB/s against the bytes the operation must move and the HBM bandwidth
measured in that same run. ``--smoke`` runs the same code on CPU under Triton's interpreter
at tiny shapes (wall-clock, meaningless numbers) so CI keeps the benchmarks from rotting.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def parse_args(name: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (CI)")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json", help="JSON file the rows are appended to")
    parser.add_argument("--rep", type=int, default=200, help="timed repetitions (median is reported)")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        args.rep = 2
    return args


def device_for(args: argparse.Namespace) -> str:
    import torch

    if args.smoke:
        return "cpu"
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --smoke for a CPU check of the code path)")
    return "cuda"


def time_us(fn: Callable[[], object], device: str, rep: int = 200, warmup: int = 25) -> float:
    """Median microseconds of ``fn()``: CUDA events on GPU, wall clock under --smoke."""
    import torch

    if device != "cuda":
        fn()
        samples = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def launch_floor_us(device: str, rep: int = 200) -> float:
    """Median time of an (almost) empty kernel launch on this device."""
    import torch

    x = torch.zeros(1, device=device)
    return time_us(lambda: x.add_(1), device, rep)


def measured_bandwidth_gbps(device: str, nbytes: int = 1 << 30, rep: int = 20) -> float:
    """HBM bandwidth from a device-to-device copy (reads + writes ``nbytes`` each)."""
    import torch

    if device != "cuda":
        nbytes = 1 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, rep)
    return 2 * nbytes / us / 1e3


def checkout() -> dict:
    """``commit`` (short hash) and ``dirty`` (uncommitted changes outside ``benchmarks/results``,
    None when unknown) of the checkout the benchmark runs from."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"],
                                capture_output=True, text=True, cwd=root, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": os.environ.get("ASYMVLM_BENCH_COMMIT", "unknown"), "dirty": None}  # copies without .git


def metrics_sample(url: str) -> dict[str, float]:
    """Every sample on a vLLM server's ``/metrics`` (vLLM's and AsymVLM's), by name with labels."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def refuse_dirty_results(paths, dirty: bool | None, allow_dirty: bool, script: str) -> None:
    """Stop before a benchmark writes rows under ``benchmarks/results`` from a tree with
    uncommitted changes (their commit would not be the code that ran), unless allowed."""
    results = (Path(__file__).resolve().parent / "results").resolve()
    if dirty and not allow_dirty and any(results == Path(p).resolve().parent or results in Path(p).resolve().parents
                                         for p in paths):
        raise SystemExit(f"{script}: the tree has uncommitted changes; commit them, pass --allow-dirty (the rows "
                         "then say dirty: true), or write elsewhere (--out/--png)")


def provenance(device: str, *packages: str) -> dict:
    """What every result row records: the checkout (commit, dirty), the date, ``device``, the
    Python version and each of ``packages``' ``__version__``."""
    import importlib
    import platform

    return {**checkout(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "python": platform.python_version(),
            **{name: importlib.import_module(name).__version__ for name in packages}}


def environment(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1, smoke only)"
    return provenance(name, "torch", "triton")


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the JSON list at ``path`` (created with its folder if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(existing + rows, indent=1) + "\n")


def write_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the JSON list at ``path`` and print them as a table."""
    append_rows(path, rows)
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"wrote {len(rows)} rows to {path}")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model DIR`` / ``--cpu-test-engine``: what :func:`in_process_engines` builds."""
    parser.add_argument("--model", help="a local model directory")
    parser.add_argument("--cpu-test-engine", action="store_true",
                        help="vLLM's CPU engine with the test suite's op stand-ins and a tiny random LLaVA")


def in_process_engines(model: str | None, cpu_test_engine: bool, name: str):
    """``(build, free, device)`` for a benchmark that drives vLLM engines in its own process.

    ``build(config)`` is an ``LLM`` with AsymVLM and ``config`` (None: plain vLLM), its engine core
    in this process so the benchmark can reach the scheduler and the runner; ``free(llms)`` shuts
    engines down. With ``cpu_test_engine``, vLLM's CPU engine with the test suite's op stand-ins
    (``tests/engine/cpu_shim``, benchmark-only) and ``model`` (random weights if it has none) or a
    tiny random LLaVA built under ``$TMPDIR/asymvlm-<name>-llava``; otherwise the local model
    directory ``model``.
    """
    root = Path(__file__).resolve().parent.parent
    if cpu_test_engine:
        sys.path.insert(0, str(root))
        import pytest
        from tests.engine.helpers import free_llms, make_plugin_llm  # sets the CPU engine's env before vLLM loads

        from asymvlm_vllm.hf.tiny import build_tiny_model

        if model is None:
            directory = build_tiny_model("llava", Path(os.environ.get("TMPDIR", "/tmp")) / f"asymvlm-{name}-llava")
            extra, what = {}, "tiny LLaVA"
        else:  # a directory without weights (benchmarks/gpu/models.py) runs with random ones
            directory, what = Path(model), Path(model).name
            extra = {} if any(directory.glob("*.safetensors")) else {"load_format": "dummy"}

        def build(config):
            return make_plugin_llm(directory, config, pytest.MonkeyPatch(), 256 * 2**20, max_model_len=2048,
                                   max_num_batched_tokens=2048, **extra)
        return build, free_llms, f"cpu ({os.cpu_count()} cores), test op stand-ins, {what}"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM

    from asymvlm_vllm.engine.plugin import asymvlm_engine_args

    def build(config):
        return LLM(model=model) if config is None else LLM(**asymvlm_engine_args(model, config))

    def free(llms):
        pass  # the process ends
    return build, free, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def engine_parts(llm) -> tuple[Any, Any]:
    """The scheduler and the driver worker's model runner of an ``LLM`` whose engine core runs
    in this process (what :func:`in_process_engines` builds)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler, core.model_executor.driver_worker.worker.model_runner
