"""Serving capacity on an H200-sized KV pool: plain vLLM vs AsymVLM, with vLLM's real scheduler.

vLLM's own scheduler, KV cache manager and block pool (and, for AsymVLM, its
:class:`~asymvlm_vllm.engine.scheduler.AsymVLMScheduler`) serve ``--requests`` Phi-3.5-V-shaped
requests that all arrive at once: one image between a ``--prefix-tokens`` chat-template prefix
and a question (``--text-tokens`` text in all), and ``--output-tokens`` generated tokens each.
The image is Phi-3.5-V's layout of an ``--image`` of W x H pixels at ``--num-crops`` (default a
US-letter page scan, 1700 x 2200, at the 16 crops used for documents): its token count comes
from the tiny Phi-3.5-V's processor (``asymvlm_vllm/hf/phi3v_remote``, the real HD-transform
arithmetic, 336-px crops of 144 tokens) and its separator rows (a newline after each row of
patches, one global separator: 61 of 2,509 rows here) from ``core.layouts``; they are never
pruned, so a keep ratio applies to the other rows. ``--image-tokens N`` models a generic image
of N rows without separators instead. The model runner is
:class:`~asymvlm_vllm.engine.simulation.SimulatedRunner` (no GPU, no weights): it samples one
token per finished prefill or decode step and answers each probe with a keep set, either a
fixed keep ratio (``uniform`` budget rule) or *adaptive*: the default
:class:`~asymvlm_vllm.core.budget.ThresholdBudget` of ``asymvlm_vllm.core.config`` applied
to importance gaps that a real ranker produced, drawn (with replacement, seeded) from a file
written by ``benchmarks/measure_gaps.py`` (``--gaps``; default the one shipped in
``benchmarks/results``, measured on the tiny random Phi-3.5-V, whose provenance each row
records). ``--gaps paper`` draws from N(0.218, 0.047) instead, the distribution the default
thresholds were cut from (so it only shows the rule's mechanics).

KV pool (vLLM's ``gpu_memory_utilization`` share of the GPU, less the weights)::

    bytes_per_token = 2 (K, V) x layers x kv_heads x head_dim x dtype_bytes
                    = 2 x 32 x 32 x 96 x 2 = 393,216 B        (Phi-3.5-V, bf16)
    num_blocks      = floor((utilization x gpu_memory - weights) / (block_size x bytes_per_token))
                    = floor((0.9 x 141e9 - 8e9) / (16 x 393,216)) = 18,898 blocks (302,368 tokens)

Reported per scenario, each also as a ratio to plain vLLM measured in the same run:

* ``peak_running``: most requests running at once with their whole prompt in KV (generating);
  ``peak_running_queue`` is vLLM's running queue, which also holds requests that have only
  their first text tokens (chunked prefill admits them) or are probing;
* ``steps``: scheduler steps until every request is done;
* ``blocks_per_request``: KV blocks per request (each request's peak during its life,
  averaged), and ``pool_capacity`` = usable blocks / that, the requests the pool holds at once;
* ``prefill_flops``: from the measured prompt lengths (``core.flops.prefill_flops``,
  Phi-3.5-V's language model: d = 3,072, m = 8,192, 32 layers; the vision encoder runs in both
  and is not counted);
* also ``peak_blocks_in_use``, ``scheduled_tokens`` (probe prefix and recomputation after
  preemption included), ``preemptions`` and ``mean_finish_step``.

Which resource binds depends on the load: with 10 output tokens and 8,192 batched tokens a step,
the encoder's per-step budget (vLLM sizes it, and its cache, to ``max_num_batched_tokens``)
binds before the KV pool does; ``--output-tokens 256`` makes the KV pool the limit. The AsymVLM
scheduler adds two steps' encoder budget to the cache (room for the probes' full outputs beside
the pruned copies); ``--encoder-cache-size`` sets one cache size for both sides instead.

    .venv/bin/python benchmarks/capacity.py [--quick] [--requests N] [--out FILE] [--png FILE]

Scheduler arithmetic only: the step counts are not times (a pruned prefill step is also
cheaper on a GPU, which this does not measure).

``--workload decode`` is the text-eviction load (paper Sec. 3.4, LLaVA-Bench): Gemma-3-27B-shaped
requests (256 image tokens, 40 text tokens, 512 output tokens) on the H200 pool that model leaves
(bf16, 62 layers x 16 KV heads x 128: 507,904 B per token, 54 GB of weights), plain vLLM against
eviction at a budget of 90 generated tokens, with and without half the vision tokens. Gemma 3's
sliding-window layers (window 1,024) hold as many blocks as its full layers at these lengths, so
one full-attention group stands for both. The simulated runner chooses *which* blocks to evict
at random, but the count (the fewest whole blocks that bring the answer back to the budget) and
so every number reported is the same for any choice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vLLM is imported: no GPU needed

RESULTS = Path(__file__).resolve().parent / "results"
GAPS = RESULTS / "gaps_tiny_phi3v.json"

# Phi-3.5-vision-instruct's language model (Phi-3-mini).
LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE, DTYPE_BYTES = 32, 32, 96, 3072, 8192, 2


# Gemma-3-27B's language model, for the decode-heavy workload.
GEMMA3_LAYERS, GEMMA3_KV_HEADS, GEMMA3_HEAD_DIM, GEMMA3_WEIGHTS_GB = 62, 16, 128, 54.0


def kv_pool_blocks(gpu_memory_gb: float, utilization: float, weights_gb: float, block_size: int,
                   layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> int:
    """Blocks of ``block_size`` tokens that fit ``utilization x gpu_memory - weights`` (decimal GB)."""
    bytes_per_token = 2 * layers * kv_heads * head_dim * DTYPE_BYTES
    return int((utilization * gpu_memory_gb * 1e9 - weights_gb * 1e9) // (block_size * bytes_per_token))


SCENARIOS = [
    ("plain vLLM", None, None),
    ("keep 75%", {"vision": {"budget": {"rule": "uniform", "ratio": 0.75}}}, 0.75),
    ("keep 65%", {"vision": {"budget": {"rule": "uniform", "ratio": 0.65}}}, 0.65),
    ("keep 50%", {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}}}, 0.5),
    ("adaptive", {}, None),  # the default ThresholdBudget on measured gaps (--gaps)
]
EVICTION_BUDGET = 90  # the paper's LLaVA-Bench setting
DECODE_SCENARIOS = [
    ("plain vLLM", None, None),
    ("evict 90", {"vision": {"enabled": False}, "text": {"enabled": True, "budget_tokens": EVICTION_BUDGET}}, 1.0),
    ("keep 50% + evict 90", {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}},
                             "text": {"enabled": True, "budget_tokens": EVICTION_BUDGET}}, 0.5),
]


def run_scenario(args, num_blocks: int, asymvlm_config: dict | None) -> dict:
    import numpy as np

    from asymvlm_vllm.core.flops import prefill_flops
    from asymvlm_vllm.engine.simulation import SimulatedRunner, build_scheduler, drive, make_request

    sched = build_scheduler(num_blocks, args.block_size, asymvlm_config, max_num_batched_tokens=args.max_num_batched_tokens,
                            max_num_seqs=args.max_num_seqs, encoder_cache_size=args.encoder_cache_size,
                            max_model_len=args.image_tokens + args.text_tokens + args.output_tokens + 16)
    runner = SimulatedRunner(sched, keep_ratio=None if asymvlm_config is not None else 1.0, rng_seed=args.seed,
                             structural_rows=args.structural_rows, **args.gap_model)
    rng = np.random.default_rng(args.seed)
    requests = []
    for i in range(args.requests):
        words = [1, 32010, 29871, 13][: args.prefix_tokens]  # "<s><|user|>\n"-like: shared by every request
        words = [w % 900 + 10 for w in words] + rng.integers(10, 900, args.text_tokens - len(words)).tolist()
        requests.append(make_request(sched, f"req{i:05d}", words, images=[(args.prefix_tokens, args.image_tokens, f"image{i:05d}")],
                                     max_tokens=args.output_tokens))
    finish_step: dict[str, int] = {}

    def after_update(step, so, outputs):
        for engine_outputs in outputs.values():
            for out in engine_outputs.outputs:
                if out.finish_reason is not None:
                    finish_step[out.request_id] = step

    pool = sched.kv_cache_manager.block_pool
    at_full_pool: list[int] = []

    def after_schedule(step, so, mro):
        # Requests generating while the pool is (nearly) full: what the KV cache sustains, as
        # opposed to the peak, which with every request arriving at once is the first
        # admission of prompts.
        if pool.get_num_free_blocks() <= 0.05 * num_blocks:
            at_full_pool.append(sum(1 for r in sched.running if r.num_computed_tokens >= r.num_prompt_tokens))

    started = time.perf_counter()
    result = drive(sched, runner, requests, after_update=after_update, after_schedule=after_schedule)
    seconds = time.perf_counter() - started
    assert len(result.finished) == args.requests and not sched.requests
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == num_blocks - 1

    kept = []
    statuses: dict[str, int] = {}
    for request_id, out in result.finished.items():
        outcome = (out.kv_transfer_params or {}).get("asymvlm")
        kept.append((outcome or {}).get("vision_tokens_kept", args.image_tokens))
        status = (outcome or {}).get("status", "plain")
        statuses[status] = statuses.get(status, 0) + 1
    flops = sum(prefill_flops(k + args.text_tokens, HIDDEN, INTERMEDIATE, LAYERS) for k in kept)
    evicted = sum((((out.kv_transfer_params or {}).get("asymvlm") or {}).get("text") or {}).get("evicted_blocks", 0)
                  for out in result.finished.values())
    return {
        "peak_running": result.peak_decoding,
        "encoder_cache_size": sched.encoder_cache_manager.cache_size,
        "blocks_freed": int(evicted),
        "sustained_running": float(np.median(at_full_pool)) if at_full_pool else float(result.peak_decoding),
        "peak_running_queue": result.peak_running,
        "peak_blocks_in_use": result.peak_blocks_in_use,
        "steps": result.num_steps,
        "model_steps": result.num_model_steps,
        "blocks_per_request": float(np.mean([result.peak_blocks[r.request_id] for r in requests])),
        "pool_capacity": int((num_blocks - 1) // np.mean([result.peak_blocks[r.request_id] for r in requests])),
        "vision_tokens_kept_mean": float(np.mean(kept)),
        "prefill_flops": float(flops),
        "scheduled_tokens": int(sum(result.scheduled_tokens.values())),
        "preemptions": int(sum(r.num_preemptions for r in requests)),
        "mean_finish_step": float(np.mean(list(finish_step.values()))),
        "statuses": statuses,
        "wall_seconds": round(seconds, 2),
    }


def phi3v_image(width: int, height: int, num_crops: int) -> tuple[int, list[int]]:
    """Rows of a W x H image in Phi-3.5-V's prompt, and which of them are separators: the token
    count from the tiny model's processor, the separators from the HD layout."""
    import importlib.util

    from asymvlm_vllm.core.layouts import hd_image_layout

    path = Path(__file__).resolve().parents[1] / "asymvlm_vllm" / "hf" / "phi3v_remote" / "image_processing_phi3_v.py"
    spec = importlib.util.spec_from_file_location("phi3v_image_processing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    processor = module.Phi3VImageProcessor(num_crops=num_crops)
    tokens = processor.calc_num_image_tokens_from_image_size(width, height)
    hd_width, hd_height = module.calc_hd_transform_size(width, height, hd_num=num_crops)
    layout = hd_image_layout(hd_height, hd_width, tokens)  # the processor's token count is the layout's
    return tokens, layout.separator_mask().nonzero().flatten().tolist()


RATIOS = [("peak_running", "peak running"), ("sustained_running", "running, full pool"), ("steps", "steps to drain"),
          ("blocks_per_request", "KV blocks / request"), ("prefill_flops", "prefill FLOPs")]


def chart_title(row: dict) -> str:
    return (f"Ratio to plain vLLM: {row['requests']} requests ({row['image_tokens']} image + {row['text_tokens']} text "
            f"tokens, {row['output_tokens']} out), {row['num_blocks']} KV blocks, encoder cache {row['encoder_cache_size']}")


def save_chart(rows: list[dict], path: Path, title: str = "Capacity vs plain vLLM") -> Path:
    """Grouped bars: each metric's ratio to plain vLLM, one colour per scenario (Pillow only)."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError):
            return ImageFont.load_default()

    width, height = 900, 480
    left, top, right, bottom = 70, 60, 880, 400
    colors = [(140, 140, 140), (70, 130, 180), (60, 170, 110), (230, 140, 30), (190, 60, 60)]
    values = [[row[f"{key}_ratio"] for key, _ in RATIOS] for row in rows]
    top_value = max(2.0, math.ceil(max(max(v) for v in values) * 2) / 2)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    small, label = font(13), font(15)
    draw.text((left, 15), title, fill=(0, 0, 0), font=label)

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * v / top_value

    step = 0.5 if top_value <= 4 else 1.0
    tick = 0.0
    while tick <= top_value + 1e-9:
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225) if tick else (0, 0, 0))
        draw.text((left - 40, y - 7), f"{tick:.1f}", fill=(0, 0, 0), font=small)
        tick += step
    draw.line([(left, y_of(1.0)), (right, y_of(1.0))], fill=(0, 0, 0), width=1)
    group = (right - left) / len(RATIOS)
    bar = group * 0.8 / len(rows)
    for g, (_, name) in enumerate(RATIOS):
        x0 = left + g * group + group * 0.1
        for s, row in enumerate(rows):
            v = values[s][g]
            x = x0 + s * bar
            draw.rectangle([x, y_of(v), x + bar - 2, bottom], fill=colors[s % len(colors)])
            draw.text((x, y_of(v) - 15), f"{v:.2f}", fill=(0, 0, 0), font=font(10))
        draw.text((x0, bottom + 8), name, fill=(0, 0, 0), font=small)
    for s, row in enumerate(rows):
        x = left + s * 165
        draw.rectangle([x, bottom + 40, x + 14, bottom + 54], fill=colors[s % len(colors)])
        draw.text((x + 20, bottom + 40), row["scenario"], fill=(0, 0, 0), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="benchmarks/capacity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="60 requests, 64 output tokens (decode: 512), a pool of 8 plain requests' worth "
                             "(KV-bound; seconds)")
    parser.add_argument("--workload", choices=("vqa", "decode"), default="vqa",
                        help="vqa: Phi-3.5-V-shaped prompts, vision pruning; decode: Gemma-3-27B-shaped long "
                             "answers, text eviction (defaults below change to 256 image / 40 text / 512 out)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--image", default="1700x2200", metavar="WxH",
                        help="vqa: the Phi-3.5-V image size whose layout the requests carry (default 1700x2200)")
    parser.add_argument("--num-crops", type=int, default=16, help="vqa: Phi-3.5-V's num_crops (default 16)")
    parser.add_argument("--image-tokens", type=int, default=None,
                        help="a generic image of this many rows, no separators (decode default: 256)")
    parser.add_argument("--text-tokens", type=int, default=36, help="text tokens in the prompt (prefix included)")
    parser.add_argument("--prefix-tokens", type=int, default=4, help="text tokens before the image")
    parser.add_argument("--output-tokens", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-gb", type=float, default=141.0)
    parser.add_argument("--utilization", type=float, default=0.9)
    parser.add_argument("--weights-gb", type=float, default=8.0)
    parser.add_argument("--num-blocks", type=int, default=None, help="override the computed KV pool")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--encoder-cache-size", type=int, default=None,
                        help="encoder-cache capacity in embeddings, the same for plain vLLM and the plugin (default: "
                             "vLLM's, max-num-batched-tokens, plus the plugin's room for pruning, as in a real engine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "capacity.json", help="JSON list the rows are appended to")
    parser.add_argument("--png", type=Path, default=RESULTS / "capacity.png")
    parser.add_argument("--allow-dirty", action="store_true", help="write to benchmarks/results from a dirty tree")
    parser.add_argument("--gaps", default=str(GAPS), metavar="FILE|paper",
                        help="adaptive: importance gaps written by benchmarks/measure_gaps.py (default: measured on the "
                             "tiny Phi-3.5-V), or 'paper' for N(0.218, 0.047)")
    args = parser.parse_args(argv)
    args.gap_model, gap_source = {}, {"gaps": "paper N(0.218, 0.047)"}
    if args.gaps != "paper" and args.workload == "vqa":
        measured = json.loads(Path(args.gaps).read_text())
        values = np.asarray(measured["gaps"], dtype=np.float64)
        args.gap_model = {"gap_model": lambda rng, v=values: float(v[rng.integers(len(v))])}
        gap_source = {"gaps": str(args.gaps), "gaps_model": measured.get("model"),
                      "gaps_commit": measured.get("commit"), "gaps_mean": float(values.mean()),
                      "gaps_std": float(values.std()), "gaps_count": int(values.size)}
    scenarios = SCENARIOS
    args.structural_rows, args.separators = None, 0
    if args.workload == "vqa" and args.image_tokens is None:
        width, height = (int(x) for x in args.image.lower().split("x"))
        args.image_tokens, separators = phi3v_image(width, height, args.num_crops)
        args.separators = len(separators)
        args.structural_rows = lambda num_rows, rows=tuple(separators): rows if num_rows == args.image_tokens else ()
    if args.workload == "decode":
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, value in (("--image-tokens", 256), ("--text-tokens", 40), ("--output-tokens", 512),
                            ("--weights-gb", GEMMA3_WEIGHTS_GB), ("--requests", 1000)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
        scenarios = DECODE_SCENARIOS
        num_blocks = args.num_blocks or kv_pool_blocks(args.gpu_memory_gb, args.utilization, args.weights_gb,
                                                       args.block_size, GEMMA3_LAYERS, GEMMA3_KV_HEADS, GEMMA3_HEAD_DIM)
    else:
        num_blocks = args.num_blocks or kv_pool_blocks(args.gpu_memory_gb, args.utilization, args.weights_gb,
                                                       args.block_size)
    if args.quick:
        args.requests = min(args.requests, 60)
        args.output_tokens = 512 if args.workload == "decode" else 64
        per_request = math.ceil((args.image_tokens + args.text_tokens + args.output_tokens) / args.block_size)
        num_blocks = args.num_blocks or 8 * per_request + 1

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import append_rows, provenance, refuse_dirty_results

    env = provenance(f"cpu ({os.cpu_count()} cores), scheduler only", "vllm")
    refuse_dirty_results((args.out, args.png), env.get("dirty"), args.allow_dirty, "benchmarks/capacity.py")
    common = {**env, "requests": args.requests, "num_blocks": num_blocks, "block_size": args.block_size,
              "image_tokens": args.image_tokens, "separator_rows": args.separators,
              "image": args.image if args.structural_rows is not None else None,
              "num_crops": args.num_crops if args.structural_rows is not None else None,
              "text_tokens": args.text_tokens, "output_tokens": args.output_tokens,
              "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
              "encoder_cache_size": args.encoder_cache_size or args.max_num_batched_tokens, "quick": args.quick,
              "workload": args.workload, "eviction_budget": EVICTION_BUDGET if args.workload == "decode" else None,
              **gap_source}
    rows = []
    for name, config, ratio in scenarios:
        metrics = run_scenario(args, num_blocks, config)
        rows.append({**common, "scenario": name, "keep_ratio": ratio, **metrics})
        print(f"{name:>11}: peak running {metrics['peak_running']:5d}  running queue {metrics['peak_running_queue']:5d}  "
              f"blocks in use {metrics['peak_blocks_in_use']:6d}  steps {metrics['steps']:6d}  "
              f"blocks/request {metrics['blocks_per_request']:7.1f}  kept {metrics['vision_tokens_kept_mean']:7.1f}  "
              f"freed {metrics['blocks_freed']:6d}  preemptions {metrics['preemptions']:5d}  "
              f"({metrics['wall_seconds']} s)", flush=True)
    base = rows[0]
    for row in rows:
        for key in ("peak_running", "sustained_running", "steps", "blocks_per_request", "pool_capacity", "prefill_flops",
                    "scheduled_tokens", "mean_finish_step"):
            row[f"{key}_ratio"] = row[key] / base[key]

    print(f"\n{'scenario':>19} | kept/image | peak running | running, full pool | steps to drain | KV blocks/request | "
          f"blocks freed | prefill FLOPs")
    for row in rows:
        print(f"{row['scenario']:>19} | {row['vision_tokens_kept_mean']:10.0f} | {row['peak_running']:5d} ({row['peak_running_ratio']:.2f}x) | "
              f"{row['sustained_running']:7.0f} ({row['sustained_running_ratio']:.2f}x) | "
              f"{row['steps']:6d} ({row['steps_ratio']:.2f}x) | {row['blocks_per_request']:7.1f} ({row['blocks_per_request_ratio']:.2f}x) | "
              f"{row['blocks_freed']:12d} | {row['prefill_flops_ratio']:.3f}x")
    append_rows(args.out, rows)
    save_chart(rows, args.png, chart_title(rows[0]))
    print(f"wrote {len(rows)} rows to {args.out} and a chart to {args.png}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
