"""Serving throughput as vLLM users measure it: plain ``vllm serve`` against ``vllm serve --plugin
asymvlm``, both driven by vLLM's own load generator (``vllm bench serve``) in the same run.

For each memory regime, plain vLLM and the plugin are started with identical flags on
127.0.0.1 (all of a regime's servers at once, idle but for the one measured); each serves every
concurrency level, the sides taking turns, ``--rounds`` times (the median round is reported),
with
``vllm bench serve --backend openai-chat --endpoint /v1/chat/completions --dataset-name random-mm``
(one image per request, fixed size, fixed input and output lengths, ``--ignore-eos``), or with
``--dataset FILE.jsonl`` image-QA requests of your own (``custom_image``: a question and local
image files per line). The seed differs per concurrency level and is the same for both sides,
so the two servers see the same requests. Before every level the server's prefix,
multimodal and encoder caches are emptied (vLLM's dev endpoints, ``VLLM_SERVER_DEV_MODE=1`` on
these servers only), so no level reuses what an earlier one cached.
``--compare-probe-forward`` adds a third server, the plugin with every probe running the
language model (``vision.encoder_only_probes: false``, the behaviour before commit 2cb6f9a): a
before/after of the encoder-only probe in the same run.
While a level runs, ``/metrics`` is sampled: peak KV-cache usage, preemptions and, for the
plugin, the vision tokens kept (these count the load generator's warm-up requests too). Every server is stopped, also on failure.

Regimes: ``relaxed`` (the engine's own KV pool) and ``tight`` (``--num-gpu-blocks-override
--tight-blocks``, a pool that holds a few requests). Rows carry req/s, output tok/s, TTFT, TPOT
and ITL (mean, p50, p99), each also as a ratio to plain vLLM at the same regime and
concurrency, plus the commit, whether the tree was dirty, the device, versions and every flag.

    python benchmarks/serve.py --model /models/llava-1.5-7b-hf [--concurrency 1 8 32]
    python benchmarks/serve.py --shape qwen2.5-vl-7b --image 448x448 --keep-ratio 0.5   # no weights needed
    python benchmarks/serve.py --cpu-test-engine            # tiny random LLaVA on CPU (test op stand-ins)
    python benchmarks/serve.py --smoke                      # what CI runs: a handful of requests

On CPU (``--cpu-test-engine``) the servers run vLLM's CPU engine with the test suite's pure-torch
stand-ins for vLLM's compiled ops (``tests/engine/cpu_shim``, benchmark-only), on a tiny
random-weight model unless ``--model`` is given: the ratios then measure per-request overheads,
not what pruning saves on a real model. With random weights, scores (and adaptive keep ratios)
say nothing about real images; pass ``--keep-ratio`` for a fixed keep.

Without weights on the machine, ``--shape`` serves a real-shaped LLaVA-1.5-7B, Gemma-3-4B or
Qwen2.5-VL-7B with ``--load-format dummy`` (``benchmarks/gpu/models.py``: the hub shapes, and the
project's tokenizer padded to the real vocabulary). Compute and memory do not depend on weight
values, so throughput and latency are those of the real model at the same kept count; the keep
*decisions* are those of random projections (small, similar gaps for every image), so fix the
ratio with ``--keep-ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from benchmarks.common import append_rows, metrics_sample, provenance, refuse_dirty_results  # noqa: E402

LATENCY_KEYS = ("ttft", "tpot", "itl")
RATIO_KEYS = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
              "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms")
CPU_SERVE_FLAGS = ("--enforce-eager", "--dtype", "float32", "--block-size", "32",
                   "--compilation-config", '{"custom_ops": ["none"]}')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(sample: dict[str, float], name: str) -> float:
    """Sum of ``name``'s samples over their labels."""
    return sum(v for k, v in sample.items() if k == name or k.startswith(name + "{"))


class Server:
    """One ``vllm serve`` process group."""

    def __init__(self, model: str, flags: list[str], env: dict, log: Path, startup_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1",
                        "--port", str(self.port), *flags]
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}; log tail:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s; log tail:\n{self.tail()}")
            time.sleep(1)

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(no log: {e})"

    def stop(self) -> None:
        """SIGTERM to the process group (API server, engine core, workers), then SIGKILL."""
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def sampling(url: str, period: float = 0.5):
    """Samples ``/metrics`` while the block runs: yields a dict that gets ``peak_kv_usage`` and
    the first and last samples."""
    result: dict = {"peak_kv_usage": 0.0}
    done = threading.Event()

    def loop():
        while not done.is_set():
            try:
                sample = metrics_sample(url)
                result["peak_kv_usage"] = max(result["peak_kv_usage"], metric(sample, "vllm:kv_cache_usage_perc"))
            except Exception:  # a busy server may answer late; the next sample counts
                pass
            done.wait(period)

    result["before"] = metrics_sample(url)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join(timeout=30)
        result["after"] = metrics_sample(url)


def bench_command(args, server: Server, concurrency: int, seed: int, out_dir: Path, name: str) -> list[str]:
    height, width = _hw(args.image)
    xargs = {}
    if args.keep_ratio is not None:
        xargs["asymvlm_keep_ratio"] = args.keep_ratio
    if args.text_budget is not None:
        xargs["asymvlm_text_budget"] = args.text_budget
    command = [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve",
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", server.url,
        "--model", args.model_name, "--tokenizer", args.model_dir,
        *dataset_flags(args, height, width),
        "--num-prompts", str(args.num_prompts or max(4 * concurrency, 16)), "--max-concurrency", str(concurrency),
        "--seed", str(seed), "--ignore-eos", "--temperature", "0", "--disable-tqdm",
        "--num-warmups", str(args.num_warmups if args.num_warmups is not None else concurrency),
        "--percentile-metrics", ",".join(LATENCY_KEYS), "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
    ]
    # Random weights emit special tokens too; skipped, they would stream as empty deltas, which the
    # load generator does not time as tokens (TTFT would include them, TPOT and ITL would not).
    body = {"skip_special_tokens": False, **({"vllm_xargs": xargs} if xargs else {})}
    command += ["--extra-body", json.dumps(body)]
    if args.trust_remote_code:
        command.append("--trust-remote-code")
    return command


def dataset_flags(args, height: int, width: int) -> list[str]:
    """``vllm bench serve``'s dataset: random-mm (one image of a fixed size, fixed lengths), or
    the image-QA JSONL of ``--dataset`` (images read and sent inline by the load generator)."""
    if args.dataset is not None:
        return ["--dataset-name", "custom_image", "--dataset-path", str(args.dataset.resolve()),
                "--custom-output-len", str(args.output_len), "--custom-ensure-client-side-data"]
    return ["--dataset-name", "random-mm", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
            "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
            "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
            "--random-mm-bucket-config", str({(height, width, 1): 1.0})]


def reset_caches(server: "Server") -> None:
    """Empty the server's prefix, multimodal and encoder caches (vLLM's dev endpoints), so that
    no level starts with what an earlier one left (a dataset repeats its images)."""
    import httpx

    for path in ("/reset_mm_cache", "/reset_encoder_cache"):
        httpx.post(server.url + path, timeout=60).raise_for_status()
    response = httpx.post(server.url + "/reset_prefix_cache", timeout=60)
    response.raise_for_status()
    if response.json().get("success") is not True:
        raise RuntimeError(f"{server.url} did not reset its prefix cache")


def _hw(image: str) -> tuple[int, int]:
    width, height = (int(x) for x in image.lower().split("x"))
    return height, width


def run_level(args, server: Server, concurrency: int, seed: int, work: Path, label: str, env: dict) -> dict:
    name = f"{label}-c{concurrency}.json"
    command = bench_command(args, server, concurrency, seed, work, name)
    reset_caches(server)
    with sampling(server.url) as sampled:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.level_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads((work / name).read_text())
    before, after = sampled["before"], sampled["after"]
    tokens = metric(after, "asymvlm_vision_tokens_total") - metric(before, "asymvlm_vision_tokens_total")
    kept = metric(after, "asymvlm_vision_tokens_kept_total") - metric(before, "asymvlm_vision_tokens_kept_total")
    row = {key: result.get(key) for key in RATIO_KEYS}
    row.update(completed=result.get("completed"), failed=result.get("failed", 0), duration_s=result.get("duration"),
               num_prompts=result.get("num_prompts", result.get("completed")),
               peak_kv_usage=sampled["peak_kv_usage"],
               preemptions=metric(after, "vllm:num_preemptions_total") - metric(before, "vllm:num_preemptions_total"),
               vision_tokens=tokens or None, kept_ratio=(kept / tokens) if tokens else None)
    return row


def environment(args) -> dict:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_test_engine else \
        f"cpu ({os.cpu_count()} cores, test op stand-ins)"
    return provenance(device, "vllm", "torch", "transformers")


def save_chart(rows: list[dict], path: Path) -> Path:
    """Request throughput and mean TTFT against concurrency, plain vs plugin, per regime (PNG)."""
    from PIL import Image, ImageDraw

    regimes = sorted({r["regime"] for r in rows})
    panels = [(regime, key) for regime in regimes for key in ("request_throughput", "mean_ttft_ms")]
    width, height, pad = 420, 300, 50
    img = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(img)
    colors = {"plain vLLM": (90, 90, 90), "AsymVLM, probe with forward pass": (31, 119, 180),
              "AsymVLM": (214, 39, 40)}
    colors = {side: color for side, color in colors.items() if any(r["side"] == side for r in rows)}
    for p, (regime, key) in enumerate(panels):
        x0 = p * width
        sub = [r for r in rows if r["regime"] == regime and r.get(key) is not None]
        if not sub:
            continue
        levels = sorted({r["concurrency"] for r in sub})
        top = max(r[key] for r in sub) * 1.15 or 1.0

        def xy(level, value):
            i = levels.index(level)
            x = x0 + pad + (i / max(1, len(levels) - 1)) * (width - 2 * pad)
            return x, height - pad - value / top * (height - 2 * pad)

        draw.text((x0 + pad, 10), f"{regime}: {key.replace('_', ' ')}", fill="black")
        draw.line([(x0 + pad, height - pad), (x0 + width - pad, height - pad)], fill="black")
        draw.line([(x0 + pad, pad), (x0 + pad, height - pad)], fill="black")
        draw.text((x0 + 4, pad - 12), f"{top:.3g}", fill="black")
        for level in levels:
            x, _ = xy(level, 0)
            draw.text((x - 6, height - pad + 6), str(level), fill="black")
        draw.text((x0 + width // 2 - 30, height - 20), "concurrency", fill="black")
        for side, color in colors.items():
            points = [xy(r["concurrency"], r[key]) for r in sorted(sub, key=lambda r: r["concurrency"]) if r["side"] == side]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        for i, (side, color) in enumerate(colors.items()):
            draw.text((x0 + width - pad - 200, pad + 14 * i), side, fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="benchmarks/serve.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model directory (default with --cpu-test-engine: a tiny random LLaVA)")
    parser.add_argument("--shape", choices=("llava-1.5-7b", "gemma-3-4b", "qwen2.5-vl-7b"), default=None,
                        help="serve a real-shaped model with random weights (--load-format dummy): the hub shapes "
                             "and the project's tokenizer padded to the real vocabulary (benchmarks/gpu/models.py)")
    parser.add_argument("--cpu-test-engine", action="store_true",
                        help="vLLM's CPU engine with the test op stand-ins (tests/engine/cpu_shim)")
    parser.add_argument("--smoke", action="store_true",
                        help="CI: --cpu-test-engine, concurrency 2, 4 prompts, relaxed regime only")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--num-prompts", type=int, default=None, help="per level (default: max(16, 4 x concurrency))")
    parser.add_argument("--input-len", type=int, default=24, help="text tokens per request")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--image", default="64x64", metavar="WxH", help="random-mm image size (default 64x64)")
    parser.add_argument("--regimes", nargs="+", choices=("relaxed", "tight"), default=["relaxed", "tight"])
    parser.add_argument("--tight-blocks", type=int, default=64,
                        help="KV blocks of the tight regime; they must hold one --max-model-len request")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="both servers (default: the model's; 512 with --cpu-test-engine)")
    parser.add_argument("--num-warmups", type=int, default=None,
                        help="warm-up requests per level, not timed (default: the concurrency)")
    parser.add_argument("--asymvlm-config", default=None, help="--asymvlm-config of the plugin server")
    parser.add_argument("--compare-probe-forward", action="store_true",
                        help="a third server: the plugin with vision.encoder_only_probes false (every probe runs "
                             "the language model, as before commit 2cb6f9a), for a before/after in the same run")
    parser.add_argument("--dataset", type=Path, default=None, metavar="FILE.jsonl",
                        help="image-QA requests instead of random-mm: one JSON object per line, "
                             '{"prompt": "question", "image_files": ["path.png"]} (vllm bench\'s custom_image)')
    parser.add_argument("--keep-ratio", type=float, default=None, help="per-request asymvlm_keep_ratio")
    parser.add_argument("--text-budget", type=int, default=None, help="per-request asymvlm_text_budget")
    parser.add_argument("--trust-remote-code", action="store_true", help="both servers and the load generator")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more `vllm serve` argument for both servers (repeat it; --serve-arg=--flag)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per side and level, sides taking turns; each row is the median round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--level-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json", help="JSON list the rows are appended to")
    parser.add_argument("--png", type=Path, default=RESULTS / "serve.png")
    parser.add_argument("--allow-dirty", action="store_true", help="write to benchmarks/results from a dirty tree")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cpu_test_engine = True
        args.concurrency, args.num_prompts, args.regimes = [2], 4, ["relaxed"]
        args.output_len = min(args.output_len, 4)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    env_info = environment(args)
    refuse_dirty_results((args.out, args.png), env_info["dirty"], args.allow_dirty, "benchmarks/serve.py")
    work = Path(tempfile.mkdtemp(prefix="asymvlm-serve-"))
    env = dict(os.environ)
    serve_flags = [*args.serve_arg]
    if args.cpu_test_engine:
        from tests.engine.helpers import subprocess_env

        env = subprocess_env()
        serve_flags = [*CPU_SERVE_FLAGS, *serve_flags]
        if args.max_model_len is None:
            args.max_model_len = 512
        if args.model is None:
            from asymvlm_vllm.hf.tiny import build_tiny_model

            args.model = str(build_tiny_model("llava", work / "tiny-llava"))
    if args.shape is not None:
        if args.model is not None:
            raise SystemExit("benchmarks/serve.py: give --model DIR or --shape NAME, not both")
        from benchmarks.gpu.models import SHAPES

        args.model = str(SHAPES[args.shape](work / args.shape))
        serve_flags += ["--load-format", "dummy"]
    if args.model is None:
        raise SystemExit("benchmarks/serve.py: give --model DIR or --shape NAME "
                         "(or --cpu-test-engine for a tiny model on CPU)")
    args.model_dir = args.model_name = str(Path(args.model).resolve())
    if args.trust_remote_code:
        serve_flags.append("--trust-remote-code")
    if args.max_model_len is not None:
        serve_flags += ["--max-model-len", str(args.max_model_len)]
    plugin_flags = ["--plugin", "asymvlm"] + (["--asymvlm-config", args.asymvlm_config] if args.asymvlm_config else [])
    common = {**env_info, "model": args.model, "input_len": args.input_len, "output_len": args.output_len,
              "image": args.image, "keep_ratio_option": args.keep_ratio, "text_budget_option": args.text_budget,
              "asymvlm_config": args.asymvlm_config, "serve_flags": serve_flags, "smoke": args.smoke,
              "dataset": str(args.dataset) if args.dataset else None, "shape": args.shape,
              "seed": args.seed, "tight_blocks": args.tight_blocks if "tight" in args.regimes else None}
    rows: list[dict] = []
    try:
        for regime in args.regimes:
            rows += run_regime(args, regime, plugin_flags, serve_flags, env, work, common)
    finally:  # the regimes measured so far are kept, each with both sides
        if rows:
            write(args, rows)
    return rows


def tight_flags(args, serve_flags: list[str]) -> list[str]:
    """A pool of ``--tight-blocks`` blocks, and a context that fits it (vLLM keeps one block back)."""
    block = int(serve_flags[serve_flags.index("--block-size") + 1]) if "--block-size" in serve_flags else 16
    fits = (args.tight_blocks - 1) * block
    if args.max_model_len is not None and args.max_model_len <= fits:
        return ["--num-gpu-blocks-override", str(args.tight_blocks)]
    if fits < args.input_len + args.output_len:
        raise SystemExit(f"benchmarks/serve.py: --tight-blocks {args.tight_blocks} of {block} tokens hold no request")
    return ["--num-gpu-blocks-override", str(args.tight_blocks), "--max-model-len", str(fits)]


SIDE_LABELS = {"plain vLLM": "plain", "AsymVLM, probe with forward pass": "plugin-probe-forward", "AsymVLM": "plugin"}


def sides(args, plugin_flags: list[str], work: Path) -> list[tuple[str, list[str]]]:
    """(side, extra ``vllm serve`` flags): plain vLLM, [the plugin probing with a forward pass,]
    the plugin."""
    out = [("plain vLLM", [])]
    if args.compare_probe_forward:
        from asymvlm_vllm.core import AsymVLMConfig

        config = AsymVLMConfig.load(args.asymvlm_config) if args.asymvlm_config else AsymVLMConfig()
        config = config.model_copy(update={"vision": config.vision.model_copy(update={"encoder_only_probes": False})})
        path = work / "probe-forward.yaml"
        path.write_text(config.to_yaml())
        out.append(("AsymVLM, probe with forward pass", ["--plugin", "asymvlm", "--asymvlm-config", str(path)]))
    out.append(("AsymVLM", plugin_flags))
    return out


def run_regime(args, regime: str, plugin_flags, serve_flags, env, work: Path, common: dict) -> list[dict]:
    """Every side's server up at once, then per level ``--rounds`` rounds of one run per side in
    turn (a machine's drift hits every side alike); each side's row is its median round by
    request throughput, with every round's req/s beside it."""
    rows = []
    regime_flags = tight_flags(args, serve_flags) if regime == "tight" else []
    servers: dict[str, Server] = {}
    try:
        for side, flags in sides(args, plugin_flags, work):
            servers[side] = Server(args.model, [*flags, *serve_flags, *regime_flags],
                                   {**env, "VLLM_SERVER_DEV_MODE": "1"},
                                   work / f"{regime}-{SIDE_LABELS[side]}.log", args.startup_timeout)
        for level, concurrency in enumerate(args.concurrency):
            runs: dict[str, list[dict]] = {side: [] for side in servers}
            for round_ in range(args.rounds):
                for side, server in servers.items():
                    label = f"{regime}-{SIDE_LABELS[side]}-r{round_}"
                    runs[side].append(run_level(args, server, concurrency, args.seed + 1000 * level, work, label, env))
            for side, server in servers.items():
                ranked = sorted(runs[side], key=lambda r: r["request_throughput"])
                row = ranked[len(ranked) // 2]
                rows.append({**common, "regime": regime, "side": side, "concurrency": concurrency,
                             "server_flags": server.command[5:], "rounds": args.rounds,
                             "request_throughput_rounds": [r["request_throughput"] for r in runs[side]], **row})
                print(f"{regime:>7} {side:>32} c={concurrency:<3} {row['request_throughput']:.3f} req/s  "
                      f"TTFT {row['mean_ttft_ms']:.1f} ms  TPOT {row['mean_tpot_ms']:.1f} ms  "
                      f"kept {row['kept_ratio'] if row['kept_ratio'] is not None else '-'}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return rows


def write(args, rows: list[dict]) -> None:
    for row in rows:
        base = next(r for r in rows if r["side"] == "plain vLLM" and r["regime"] == row["regime"]
                    and r["concurrency"] == row["concurrency"])
        for key in RATIO_KEYS:
            row[f"{key}_ratio"] = row[key] / base[key] if row[key] is not None and base[key] else None
    print(f"\n{'regime':>7} | {'concurrency':>11} | req/s ratio | out tok/s ratio | TTFT ratio | TPOT ratio | ITL ratio | kept")
    for row in rows:
        if row["side"] != "plain vLLM":
            print(f"{row['side']:>32} " if args.compare_probe_forward else "", end="")
            print(f"{row['regime']:>7} | {row['concurrency']:>11} | {row['request_throughput_ratio']:11.2f} | "
                  f"{row['output_throughput_ratio']:15.2f} | {row['mean_ttft_ms_ratio']:10.2f} | "
                  f"{row['mean_tpot_ms_ratio']:10.2f} | {row['mean_itl_ms_ratio']:9.2f} | {row['kept_ratio']}")
    append_rows(args.out, rows)
    save_chart(rows, args.png)
    print(f"wrote {len(rows)} rows to {args.out} and a chart to {args.png}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
