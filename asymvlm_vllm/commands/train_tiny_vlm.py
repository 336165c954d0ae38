"""`asymvlm train-tiny-vlm`: train the shapes-task LLaVA from scratch on the CPU, offline."""

from __future__ import annotations

import argparse
import platform
from dataclasses import asdict
import sys
from pathlib import Path

from . import integer_at_least, number_in

# ShapesTrainingSettings' defaults (kept here so that --help imports nothing heavy).
DEFAULTS = dict(steps=4500, batch_size=32, lr=2e-3, seed=0)


def add_parser(commands) -> None:
    """Register the subcommand on ``commands`` (argparse sub-parsers)."""
    p = commands.add_parser(
        "train-tiny-vlm",
        help="train the tiny shapes-task LLaVA from scratch (CPU, offline, about 15 minutes on 2 cores)",
        description=(
            "Train a LLaVA-architecture VLM (CLIP 64-wide x 2 layers, GELU projector, Llama 128-wide x 2 layers) "
            "from scratch on the synthetic shapes task (what colour is the circle? is there a ring? how many red "
            "shapes?), evaluate it on the task's test split, and write a Hugging Face model directory with a card. "
            "Deterministic for a seed; checkpoints every --checkpoint-every steps, and --resume continues a run "
            "exactly. The package ships the result (asymvlm demo uses it)."
        ),
    )
    p.add_argument("-o", "--output", required=True, help="model directory to write")
    p.add_argument("--steps", type=integer_at_least(1), default=DEFAULTS["steps"],
                   help=f"optimizer steps (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=integer_at_least(1), default=DEFAULTS["batch_size"],
                   help=f"task items per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=number_in(0), default=DEFAULTS["lr"], help=f"peak AdamW learning rate (default {DEFAULTS['lr']:g})")
    p.add_argument("--seed", type=integer_at_least(0), default=DEFAULTS["seed"], help="initialisation and data seed (default 0)")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default: <output>.checkpoints)")
    p.add_argument("--checkpoint-every", type=integer_at_least(1), default=250, help="default 250")
    p.add_argument("--resume", metavar="CKPT", help="continue the run of this checkpoint exactly")
    p.add_argument("--eval-items", type=integer_at_least(1), default=1000,
                   help="test-split items the finished model is scored on (default 1000)")
    p.set_defaults(run=run)

    data = commands.add_parser(
        "shapes-data",
        help="write a split of the shapes task as PNG files and a JSONL manifest",
        description=("Write items of the shapes task (train, calibration or test split; every item a pure "
                     "function of its split and index) as PNG files and <split>.jsonl, the format that "
                     "asymvlm train-scorer and asymvlm calibrate read."),
    )
    data.add_argument("-o", "--output", required=True, help="folder to write into")
    data.add_argument("--split", choices=("train", "calibration", "test"), default="train")
    data.add_argument("--items", type=integer_at_least(1), default=1500, help="default 1500")
    data.set_defaults(run=run_data)


def run_data(args: argparse.Namespace) -> int:
    from ..hf.shapes import write_split

    manifest = write_split(args.output, args.split, args.items)
    print(f"wrote {args.items} {args.split} items: {manifest}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..hf import PrunedVLM, quiet_progress_bars, shapes
    from ..hf.shapes_vlm import ShapesTrainingSettings, accuracy, save_shapes_vlm, train_shapes_vlm, write_card

    quiet_progress_bars()
    settings = ShapesTrainingSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                      seed=args.seed)
    output = Path(args.output)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else output.with_name(output.name + ".checkpoints")
    print(f"training the shapes VLM: {settings.steps} steps of {settings.batch_size} items, lr {settings.learning_rate:g}, "
          f"seed {settings.seed}, {torch.get_num_threads()} threads; checkpoints in {checkpoint_dir}")
    try:
        model, processor, result = train_shapes_vlm(settings, checkpoint_dir=checkpoint_dir,
                                                    checkpoint_every=args.checkpoint_every, resume=args.resume)
    except KeyboardInterrupt:
        latest = sorted(checkpoint_dir.glob("step-*.safetensors"))
        hint = f"; continue with --resume {latest[-1]}" if latest else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    save_shapes_vlm(model, processor, output)
    vlm = PrunedVLM.from_pretrained(output)
    items = shapes.make_items("test", args.eval_items)
    scored = accuracy(vlm, items)
    by_kind = {k: sum(c for c, it in zip(scored["correct"], items) if it.kind == k)
               / max(1, sum(it.kind == k for it in items)) for k in shapes.KINDS}
    card = {
        "model": "tiny LLaVA trained on the shapes task (asymvlm_vllm.hf.shapes)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
        "steps": result.steps, "wall_seconds": round(result.seconds, 1),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "test_items": len(items), "accuracy_keep_1": scored["accuracy"],
        "accuracy_by_kind": by_kind,
        "final_loss_mean_last_50": sum(result.loss_history[-50:]) / max(1, len(result.loss_history[-50:])),
        "asymvlm_vllm": __version__, "torch": torch.__version__,
    }
    write_card(output, card)
    print(f"wrote {output}: {result.steps} steps in {result.seconds:.0f} s; test accuracy (keep 1.0, "
          f"{len(items)} items) {scored['accuracy']:.3f} — "
          + ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items()))
    return 0
