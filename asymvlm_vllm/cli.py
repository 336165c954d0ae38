"""The ``asymvlm`` console command. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import integer_at_least


def _config_presets(args: argparse.Namespace) -> int:
    from .core import AsymVLMConfig, list_presets

    for name in list_presets():
        config = AsymVLMConfig.from_preset(name)
        state = "calibrated" if config.calibrated else "UNCALIBRATED"
        print(f"{name:16s} {', '.join(config.architectures):40s} {config.vision.budget.rule:9s} {state}")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from .core import AsymVLMConfig

    config = AsymVLMConfig.load(args.config)
    if config.vision.enabled:
        config.vision.make_ranker()  # loads and checks the scorer file, if any
    if not config.calibrated:
        print(f"warning: {args.config} is not calibrated for its model; run `asymvlm calibrate`", file=sys.stderr)
    print(config.to_yaml(), end="")
    return 0


def _scorer_init(args: argparse.Namespace) -> int:
    import torch

    from .core import ScorerMetadata, save_scorer

    metadata = ScorerMetadata(architecture=args.architecture, hidden_size=args.hidden_size)
    path = save_scorer(args.output, torch.ones(args.hidden_size), metadata)
    print(f"wrote {path}: w = 1 (cosine) for {args.architecture}, hidden size {args.hidden_size}")
    return 0


def _scorer_inspect(args: argparse.Namespace) -> int:
    from .core import load_scorer

    scorer = load_scorer(args.scorer)
    w = scorer.weight
    print(scorer.metadata.model_dump_json(indent=2))
    print(
        f"weight: shape {tuple(w.shape)} {w.dtype}, min {w.min():.4f} mean {w.mean():.4f} "
        f"max {w.max():.4f}, {int((w == 1).sum())} of {w.numel()} at 1.0"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asymvlm", description="AsymVLM for vLLM: tools around the serving plugin.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="list presets, check a config").add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND"
    )
    config.add_parser("presets", help="list the bundled presets").set_defaults(run=_config_presets)
    check = config.add_parser("check", help="validate a YAML file or preset and print it resolved")
    check.add_argument("config", help="a YAML file or a preset name")
    check.set_defaults(run=_config_check)

    scorer = commands.add_parser("scorer", help="create or inspect scorer files").add_subparsers(
        dest="scorer_command", required=True, metavar="SUBCOMMAND"
    )
    init = scorer.add_parser("init", help="write an untrained scorer (w = 1, i.e. cosine)")
    init.add_argument("--architecture", required=True, help="HF architecture, e.g. LlavaForConditionalGeneration")
    init.add_argument("--hidden-size", type=integer_at_least(1), required=True, help="the language model's hidden size")
    init.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    init.set_defaults(run=_scorer_init)
    inspect = scorer.add_parser("inspect", help="check a scorer file and print its metadata")
    inspect.add_argument("scorer", help="a .safetensors scorer file")
    inspect.set_defaults(run=_scorer_inspect)

    from .commands import calibrate, demo, train_scorer, train_tiny_vlm

    for module in (demo, train_scorer, calibrate, train_tiny_vlm):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .core.errors import AsymVLMError

    try:
        return args.run(args)
    except AsymVLMError as e:
        print(f"asymvlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
