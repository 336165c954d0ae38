"""`asymvlm demo`: prune one image prompt, generate, and show what pruning saved."""

from __future__ import annotations

import argparse

from . import integer_at_least, number_in


def add_parser(commands) -> None:
    """Register the subcommand on ``commands`` (argparse sub-parsers)."""
    parser = commands.add_parser(
        "demo",
        help="prune one image prompt and show tokens, FLOPs and time saved",
        description=(
            "Run AsymVLM's vision-token pruning on one image and question, generate an answer, and print "
            "the vision tokens in and kept, the importance gap, the keep ratio, the language model's input "
            "length and prefill FLOPs with and without pruning, and the measured CPU prefill time. Writes "
            "heatmap.png, mask.png and report.json. Without --model it runs the shapes VLM that ships in the package "
            "(a tiny LLaVA trained offline on a synthetic shapes task) with its learned scorer on the bundled task "
            "image and question, checks its answer, and shows what the spiral ranker at keep 0.25 does instead."
        ),
    )
    parser.add_argument("--model", metavar="DIR", help="local model directory (default: the shapes VLM shipped in the package)")
    parser.add_argument("--image", metavar="FILE", help="image file (default: the bundled shapes image, or the sample chart with --model); needs --question")
    parser.add_argument("--question", help="question about the image (default: the bundled question about the bundled image)")
    parser.add_argument("--config", metavar="FILE_OR_PRESET",
                        help="AsymVLM YAML file or preset name (default: the preset of the model's architecture; "
                             "the shipped config, learned scorer and calibrated budget, for the shapes VLM)")
    parser.add_argument("--keep-ratio", type=number_in(0.0, 1.0), metavar="R",
                        help="force a uniform keep ratio R in (0, 1]: keeps floor(N * R) vision tokens (min 1)")
    parser.add_argument("--output-dir", default="asymvlm-demo", metavar="DIR",
                        help="where heatmap.png, mask.png and report.json go (default: ./asymvlm-demo)")
    parser.add_argument("--max-new-tokens", type=integer_at_least(1), default=24, metavar="N", help="default: 24")
    parser.add_argument("--repeats", type=integer_at_least(1), default=5, metavar="N",
                        help="prefill timings per prompt; the medians are compared (default: 5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights dtype on the CPU (default: float32)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the processor code shipped in the --model directory (Phi-3.5-Vision needs it); "
                             "off by default: pass it only for a directory you trust")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..hf import quiet_progress_bars
    from ..hf.demo import format_report, run_demo

    quiet_progress_bars()  # the report is the output; weight-loading bars are noise

    report = run_demo(
        model_dir=args.model, image=args.image, question=args.question, config=args.config,
        keep_ratio=args.keep_ratio, output_dir=args.output_dir, max_new_tokens=args.max_new_tokens,
        repetitions=args.repeats, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
    )
    print(format_report(report))
    return 0
