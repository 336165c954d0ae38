"""`asymvlm calibrate`: fit a budget rule (Method A or B) to a model and scorer on local data."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_RATIO_GRID = "0.15,0.25,0.35,0.5,0.65,0.8,1.0"  # calibration.DEFAULT_RATIO_GRID (kept light here)


def add_parser(commands) -> None:
    """Register the subcommand on ``commands`` (argparse sub-parsers)."""
    parser = commands.add_parser(
        "calibrate",
        help="fit the budget rule (gap thresholds or linear map) to a model on local data",
        description=(
            "Measure each sample's importance gap and its objective at every ratio of --ratio-grid once, "
            "then fit Method A (threshold rule, grid search) or Method B (linear rule) so that the average "
            "keep ratio stays at or below --target-keep-ratio. Writes the rule into the scorer file and/or "
            "a YAML config."
        ),
    )
    parser.add_argument("--model", required=True, help="local model directory (config.json, weights, processor)")
    parser.add_argument("--data", required=True,
                        help="calibration data: a JSONL file ({image, question, answer}), a parquet file or a folder of them")
    parser.add_argument("--scorer", help="scorer file (.safetensors): rank with it, and write the calibrated rule into it")
    parser.add_argument("--method", choices=("threshold", "linear"), default="threshold",
                        help="threshold: Method A, three tiers split at two gap thresholds (default); "
                             "linear: Method B, keep ratio linear in the gap")
    parser.add_argument("--objective", choices=("anls", "exact", "fidelity"), default="anls",
                        help="anls / exact: greedy answers scored against the labels (higher is better); "
                             "fidelity: label-free hidden-state discrepancy to the unpruned model (lower is better)")
    parser.add_argument("--target-keep-ratio", type=float, required=True,
                        help="the average fraction of vision tokens to keep, in (0, 1]")
    parser.add_argument("--samples", type=int, default=500, help="use at most this many samples (default 500)")
    parser.add_argument("--ratio-grid", default=DEFAULT_RATIO_GRID,
                        help=f"candidate keep ratios, comma-separated (default {DEFAULT_RATIO_GRID}); "
                             "the model runs once per ratio")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap for anls / exact (default 16)")
    parser.add_argument("--answer-instruction", default=None,
                        help="appended on a new line to each question for anls / exact (default: 'Answer the question "
                             "using a single word or phrase.'; '' for none)")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="linear: the smallest keep ratio (default: the smallest grid ratio)")
    parser.add_argument("--max-ratio", type=float, default=1.0, help="linear: the largest keep ratio (default 1.0)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="linear: how far below the target the achieved average may end (default 0.01)")
    parser.add_argument("--min-keep", type=int, default=1, help="never keep fewer vision tokens per image (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="model dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("-o", "--output", help="write a calibrated YAML config here")
    parser.add_argument("--histogram", help="write a PNG histogram of the gaps (with the chosen thresholds) here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample draw when the data has more than --samples")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the processor code shipped in the --model directory (Phi-3.5-Vision needs it); "
                             "off by default: pass it only for a directory you trust")
    parser.set_defaults(run=run)


def _check_args(args: argparse.Namespace):
    """Every check that needs neither the data nor the model; returns the parsed ratio grid."""
    from ..core.errors import AsymVLMError
    from ..hf.calibration import parse_ratio_grid

    target = args.target_keep_ratio
    if not (math.isfinite(target) and 0.0 < target <= 1.0):
        raise AsymVLMError(f"--target-keep-ratio must be in (0, 1], got {target:g}")
    for flag, value in (("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size), ("--min-keep", args.min_keep)):
        if value < 1:
            raise AsymVLMError(f"{flag} must be at least 1, got {value}")
    grid = parse_ratio_grid(args.ratio_grid)
    if target < grid[0]:
        raise AsymVLMError(
            f"--target-keep-ratio {target:g} is below the smallest --ratio-grid value {grid[0]:g}: "
            "no rule built from the grid keeps that little; add smaller ratios"
        )
    for flag, value in (("--min-ratio", args.min_ratio), ("--max-ratio", args.max_ratio)):
        if value is not None and not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise AsymVLMError(f"{flag} must be in (0, 1], got {value:g}")
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise AsymVLMError(f"--tolerance must be a number > 0, got {args.tolerance:g}")
    if args.method == "linear":
        low = args.min_ratio if args.min_ratio is not None else grid[0]
        if not low <= target <= args.max_ratio:
            raise AsymVLMError(
                f"--target-keep-ratio {target:g} must lie within [--min-ratio, --max-ratio] = [{low:g}, {args.max_ratio:g}]"
            )
    return grid


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _scorer_reference(scorer: Path, config_path: Path) -> str:
    """The scorer path as the YAML should hold it: relative to the YAML's folder when inside it."""
    scorer, folder = scorer.resolve(), config_path.resolve().parent
    try:
        return str(scorer.relative_to(folder))
    except ValueError:
        return str(scorer)


def run(args: argparse.Namespace) -> int:
    grid = _check_args(args)

    import dataclasses

    import torch

    from ..core import AsymVLMConfig, ScorerMetadata, UniformBudget, VisionPruningConfig, load_scorer, save_scorer
    from ..core.budget import ThresholdBudget
    from ..core.errors import AsymVLMError
    from ..hf import PrunedVLM
    from ..hf.calibration import ANSWER_INSTRUCTION, OBJECTIVES, calibrate
    from ..hf.data import load_samples
    from ..plots import save_gap_histogram

    samples = load_samples(args.data, limit=args.samples, seed=args.seed)
    if not samples:
        raise AsymVLMError(f"{args.data} holds no samples")
    scorer = load_scorer(args.scorer) if args.scorer else None

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if str(device).startswith("cuda") else "float32")
    vision = VisionPruningConfig(budget=UniformBudget(1.0), scorer=args.scorer, min_keep=args.min_keep)
    vlm = PrunedVLM.from_pretrained(args.model, vision, dtype=getattr(torch, dtype_name),
                                    trust_remote_code=args.trust_remote_code)
    vlm.model.to(device)
    architecture = type(vlm.model).__name__
    if scorer is not None and scorer.metadata.architecture != architecture:
        raise AsymVLMError(
            f"scorer file {args.scorer} was trained for {scorer.metadata.architecture}, but the model is {architecture}"
        )

    instruction = ANSWER_INSTRUCTION if args.answer_instruction is None else args.answer_instruction
    print(f"calibrating {architecture} ({args.model}) on {len(samples)} samples of {args.data}: "
          f"{args.method} rule, objective {args.objective}, ratios {', '.join(f'{r:g}' for r in grid)}",
          file=sys.stderr)
    report = calibrate(
        vlm, samples, method=args.method, objective=args.objective, target=args.target_keep_ratio,
        ratio_grid=grid, min_ratio=args.min_ratio, max_ratio=args.max_ratio, tolerance=args.tolerance,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        answer_instruction=instruction if args.objective != "fidelity" else "", progress=True,
    )
    rule = report.chosen.rule
    print(report.format())
    table = report.table
    if float(table.values.max() - table.values.min()) == 0.0:
        print(f"warning: every sample scores {float(table.values.flat[0]):g} at every ratio, so the objective "
              "cannot tell the rules apart and the chosen one only meets the budget; check the answers "
              "(--answer-instruction, --max-new-tokens) or use --objective fidelity", file=sys.stderr)

    label = OBJECTIVES[args.objective][0]
    if scorer is not None:
        metadata = ScorerMetadata.model_validate(
            {**scorer.metadata.model_dump(), "calibrated_budget": dataclasses.asdict(rule)}
        )
        save_scorer(args.scorer, scorer.weight, metadata)
        print(f"wrote the calibrated rule into {args.scorer}")
    if args.output:
        output = Path(args.output)
        config = AsymVLMConfig.from_dict({
            "description": (f"{architecture}: {args.method} rule calibrated with `asymvlm calibrate` on "
                            f"{len(samples)} samples of {Path(args.data).name}, target average keep ratio "
                            f"{args.target_keep_ratio:g} (achieved {report.chosen.average_keep:.4f}, "
                            f"{label} {report.chosen.objective:.4g})"),
            "architectures": [architecture],
            "calibrated": True,
            "vision": {
                "enabled": True,
                "ranker": "learned" if args.scorer else "cosine",
                **({"scorer": _scorer_reference(Path(args.scorer), output)} if args.scorer else {}),
                "budget": dataclasses.asdict(rule),
                "min_keep": args.min_keep,
            },
        })
        header = f"# written by `asymvlm calibrate` ({rule.describe()})\n"
        _write_atomically(output, header + config.to_yaml())
        print(f"wrote {output}")
    if args.histogram:
        thresholds = (rule.gap_low, rule.gap_high) if isinstance(rule, ThresholdBudget) else None
        path = save_gap_histogram(report.table.gaps.tolist(), args.histogram, thresholds=thresholds,
                                  title=f"importance gaps: {architecture}, {len(samples)} samples")
        print(f"wrote {path}")
    return 0
