"""`asymvlm train-scorer`: train the scorer weight ``w`` offline (Appendix C/D) and write a scorer file."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import integer_at_least, number_in

# Appendix D's defaults; the parser leaves these flags at None so that --resume can tell which
# ones were given (a given flag must match the checkpoint, an omitted one takes its value).
DEFAULTS = dict(samples=1500, epochs=3, lr=1e-3, strength=5.0, temperature=1.0, reg=1e-3, keep_ratio=0.5, seed=0,
                compare="text")
_SETTING_OF_FLAG = dict(epochs="epochs", lr="learning_rate", strength="mask_strength",
                        temperature="mask_temperature", reg="weight_regularization",
                        keep_ratio="keep_ratio", seed="seed", compare="compared")


def add_parser(commands) -> None:
    """Register the subcommand on ``commands`` (argparse sub-parsers)."""
    p = commands.add_parser(
        "train-scorer",
        help="train the scorer weight w on local VQA data (transformers path)",
        description=(
            "Train AsymVLM's per-dimension scorer weight w for one model, offline, on local data "
            "(a JSONL manifest or DocVQA/ChartQA/TextVQA parquet files). The model is frozen; batch size 1."
        ),
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True,
                   help="JSONL file ({image, question, answer|answers} per line), or a parquet file, "
                        "folder or glob (DocVQA/ChartQA/TextVQA layout)")
    p.add_argument("-o", "--output", required=True, help="scorer .safetensors file to write")
    p.add_argument("--samples", type=integer_at_least(1), help=f"training samples drawn from --data (default {DEFAULTS['samples']})")
    p.add_argument("--epochs", type=integer_at_least(1), help=f"epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--lr", type=number_in(0), help=f"AdamW learning rate (default {DEFAULTS['lr']:g})")
    p.add_argument("--strength", type=number_in(0), help=f"soft-mask strength C (default {DEFAULTS['strength']:g})")
    p.add_argument("--temperature", type=number_in(0),
                   help=f"soft-mask temperature tau (default {DEFAULTS['temperature']:g})")
    p.add_argument("--reg", type=number_in(0, low_inclusive=True),
                   help=f"lambda of lambda*||w-1||^2 (default {DEFAULTS['reg']:g})")
    p.add_argument("--keep-ratio", type=number_in(0, 1), help=f"keep ratio of the soft mask (default {DEFAULTS['keep_ratio']:g})")
    p.add_argument("--seed", type=integer_at_least(0), help=f"seed of the sample draw and order (default {DEFAULTS['seed']})")
    p.add_argument("--compare", choices=("text", "answer"),
                   help="which last-layer hidden states the loss compares: every text position, prompt and answer "
                        "(Appendix C, default), or only the positions that predict the answer")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default: <output without suffix>.checkpoints)")
    p.add_argument("--checkpoint-every", type=integer_at_least(1), default=250,
                   help="checkpoint every N steps, besides each epoch's end (default 250)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run of this checkpoint exactly")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype (default float32)")
    p.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    p.add_argument("--heldout", metavar="FILE", help="held-out data: report its discrepancy under real pruning")
    p.add_argument("--heldout-samples", type=integer_at_least(1), default=200,
                   help="held-out samples drawn from --heldout (default 200)")
    p.add_argument("--eval-samples", type=integer_at_least(1), default=64,
                   help="training samples the loss before/after is measured on (default 64)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the processor code shipped in the --model directory (Phi-3.5-Vision needs it); "
                        "off by default: pass it only for a directory you trust")
    p.set_defaults(run=run)


def _check_writable(output: Path) -> None:
    from ..core.errors import AsymVLMError

    if output.is_dir():
        raise AsymVLMError(f"cannot write the scorer to {output}: it is a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".asymvlm-probe-", dir=output.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise AsymVLMError(f"cannot write the scorer to {output}: {exc.strerror or exc}") from None


def _fmt(value) -> str:
    return "" if isinstance(value, str) else "g"


def _settings(args, checkpoint):
    """The run's settings: flags, else the checkpoint's values, else the defaults."""
    from ..core.errors import AsymVLMError
    from ..hf.training import TrainingSettings

    values, conflicts = {}, []
    for flag, name in _SETTING_OF_FLAG.items():
        given = getattr(args, flag)
        if checkpoint is not None:
            theirs = getattr(checkpoint.settings, name)
            if given is not None and given != theirs:
                conflicts.append(f"--{flag.replace('_', '-')} {given:{_fmt(given)}} (the checkpoint has {theirs:{_fmt(theirs)}})")
            values[name] = theirs
        else:
            values[name] = given if given is not None else DEFAULTS[flag]
    samples = args.samples if args.samples is not None else DEFAULTS["samples"]
    if checkpoint is not None:
        if args.samples is not None and args.samples != checkpoint.num_samples:
            conflicts.append(f"--samples {args.samples} (the checkpoint has {checkpoint.num_samples})")
        samples = checkpoint.num_samples
    if conflicts:
        raise AsymVLMError("cannot resume with other settings: " + "; ".join(conflicts) + "; drop those flags")
    return TrainingSettings(**values), samples


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.errors import AsymVLMError
    from ..core.scorer_file import save_scorer
    from ..hf import PrunedVLM
    from ..hf.data import load_samples
    from ..hf.training import heldout_discrepancy, load_checkpoint, scorer_metadata, train_scorer, training_objective

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    settings, num_samples = _settings(args, checkpoint)
    output = Path(args.output)
    _check_writable(output)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else output.with_name(output.stem + ".checkpoints")

    samples = load_samples(args.data, limit=num_samples, seed=settings.seed)
    heldout = load_samples(args.heldout, limit=args.heldout_samples, seed=settings.seed) if args.heldout else None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise AsymVLMError(f"--device: {exc}") from None
    vlm = PrunedVLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code)
    vlm.model.to(device)
    print(f"model {type(vlm.model).__name__} (hidden size {vlm.hidden_size}) on {device}, {args.dtype}")
    print(f"{len(samples)} training samples from {args.data}; {settings.epochs} epoch(s) of {len(samples)} steps "
          f"(batch size 1); keep ratio {settings.keep_ratio:g}, C {settings.mask_strength:g}, "
          f"tau {settings.mask_temperature:g}, lr {settings.learning_rate:g}, lambda {settings.weight_regularization:g}, "
          f"compared states: {settings.compared}")
    if len(samples) < num_samples:
        print(f"note: the data holds {len(samples)} samples, fewer than the {num_samples} asked for; using all")

    evaluation = samples[: args.eval_samples]
    loss_before = training_objective(vlm, evaluation, None, settings)
    print(f"training loss on {len(evaluation)} samples with w = 1: {loss_before:.6g}")
    try:
        result = train_scorer(vlm, samples, settings, checkpoint_dir=checkpoint_dir,
                              checkpoint_every=args.checkpoint_every, resume=checkpoint, dataset=str(args.data))
    except KeyboardInterrupt:
        latest = sorted(checkpoint_dir.glob("step-*.safetensors"))
        hint = f"; continue with --resume {latest[-1]}" if latest else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    loss_after = training_objective(vlm, evaluation, result.weight, settings)
    print(f"training loss on {len(evaluation)} samples: w = 1 {loss_before:.6g} -> trained {loss_after:.6g}")
    if heldout is not None:
        cosine = heldout_discrepancy(vlm, heldout, None, settings.keep_ratio)
        trained = heldout_discrepancy(vlm, heldout, result.weight, settings.keep_ratio)
        print(f"held-out discrepancy ({len(heldout)} samples, real pruning at keep ratio {settings.keep_ratio:g}): "
              f"w = 1 {cosine:.6g} -> trained {trained:.6g} ({(trained / cosine - 1) * 100:+.1f}%)")
    metadata = scorer_metadata(vlm, settings, len(samples), result.final_loss, str(args.data))
    try:
        save_scorer(output, result.weight, metadata)
    except OSError as exc:
        raise AsymVLMError(f"cannot write the scorer to {output}: {exc.strerror or exc}") from None
    w = result.weight
    print(f"wrote {output}: w in [{float(w.min()):.3f}, {float(w.max()):.3f}], mean {float(w.mean()):.3f}, "
          f"{result.steps} steps; checkpoints in {checkpoint_dir}")
    return 0
