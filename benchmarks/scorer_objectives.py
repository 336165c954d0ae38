"""Does the paper's scorer objective learn what direct supervision learns? On the shapes VLM.

Trains the scorer weight ``w`` several ways on the task's train split and measures the shapes
VLM's accuracy when pruning with each (uniform keep 0.25 and 0.125):

* ``asymvlm train-scorer``'s objective (Appendix C/D: the soft score mask, MSE of last hidden
  states), at its defaults and with the knobs the paper leaves open: the mask temperature τ,
  the keep ratio used in training, and which hidden states are compared (every text position
  or only those that predict the answer);
* direct supervision, for reference: ``w`` trained so the answer's cells score highest
  (cross-entropy of ``softmax(s / τ)`` against them), which needs labels the paper's objective
  does without;
* cosine (``w = 1``).

The scorer is chosen on the calibration split (the sum of its accuracies at both keep ratios)
among every trained one, and reported on the test split. ``--save FILE`` writes it (the package
ships the result); its metadata says which objective trained it.

    .venv/bin/python benchmarks/scorer_objectives.py --save asymvlm_vllm/assets/shapes_scorer.safetensors
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from benchmarks.common import append_rows, provenance, refuse_dirty_results  # noqa: E402

KEEPS = (0.25, 0.125)
DIRECT = "direct supervision (labels)"
# name: train-scorer settings that differ from Appendix D's defaults
VARIANTS = {
    "paper defaults (tau 1, keep 0.5, text states)": {},
    "tau 0.1": {"mask_temperature": 0.1},
    "keep 0.25": {"keep_ratio": 0.25},
    "answer states": {"compared": "answer"},
    "tau 0.1, answer states": {"mask_temperature": 0.1, "compared": "answer"},
    "tau 0.1, keep 0.25, answer states": {"mask_temperature": 0.1, "keep_ratio": 0.25, "compared": "answer"},
    "keep 0.125, answer states, C 10": {"keep_ratio": 0.125, "compared": "answer", "mask_strength": 10.0},
    "answer states, lr 1e-2": {"compared": "answer", "learning_rate": 1e-2},
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/scorer_objectives.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="shapes VLM directory (default: the shipped one)")
    p.add_argument("--train-items", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--select-items", type=int, default=300, help="calibration-split items the variant is chosen on")
    p.add_argument("--test-items", type=int, default=1000)
    p.add_argument("--variants", nargs="+", default=None, help="names from VARIANTS (default: all)")
    p.add_argument("--save", type=Path, default=None, help="write the chosen paper-objective scorer here")
    p.add_argument("--smoke", action="store_true", help="CI: 24 train items, 1 epoch, 2 variants, 32 + 32 items")
    p.add_argument("--out", type=Path, default=RESULTS / "scorer_objectives.json")
    p.add_argument("--allow-dirty", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_items, args.epochs, args.select_items, args.test_items = 24, 1, 32, 32
        args.variants = args.variants or list(VARIANTS)[:2]
    return args


DIRECT_LR = 1e-2


def direct_supervision(vlm, items, epochs: int, temperature: float = 0.1, lr: float = DIRECT_LR):
    """``w`` trained so that each item's answer cells score highest (labels needed)."""
    import torch

    from asymvlm_vllm.core.positions import text_query_mask
    from asymvlm_vllm.core.scorer_file import SCORER_WEIGHT_RANGE
    from asymvlm_vllm.core.scoring import score_vision_tokens
    from asymvlm_vllm.hf.shapes_vlm import _looked_at

    pairs = []
    with torch.no_grad():
        for item in items:
            cells = _looked_at(item) or item.relevant[:1]
            inputs = vlm.process([item.pil_image()], [item.question])
            (features,) = vlm.image_features(inputs)
            ids = inputs["input_ids"][0]
            image = ids == vlm.model.config.image_token_index
            text = text_query_mask(ids, image, vlm.adapter.structure_token_ids(vlm.model))
            pairs.append((features.float(), vlm.model.get_input_embeddings()(ids[text]).float(), list(cells)))
    weight = torch.ones(vlm.hidden_size, requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for i in torch.randperm(len(pairs), generator=generator).tolist():
            vision, text, cells = pairs[i]
            scores = score_vision_tokens(vision, text, weight) / temperature
            loss = -(torch.log_softmax(scores, 0)[cells]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                weight.clamp_(*SCORER_WEIGHT_RANGE)
    return weight.detach()


def measure(vlm, weight, items) -> dict:
    from asymvlm_vllm.core import CosineRanker, LearnedRanker, UniformBudget
    from asymvlm_vllm.hf.shapes_vlm import accuracy

    ranker = CosineRanker() if weight is None else LearnedRanker(weight)
    out = {}
    for keep in KEEPS:
        result = accuracy(vlm, items, UniformBudget(keep), ranker)
        out[f"accuracy_keep_{keep:g}"] = result["accuracy"]
        out[f"kept_answer_cell_keep_{keep:g}"] = sum(result["kept_relevant"]) / len(items)
    return out


def main(argv=None) -> list[dict]:
    from asymvlm_vllm.core.scorer_file import save_scorer
    from asymvlm_vllm.hf import PrunedVLM, quiet_progress_bars, shapes
    from asymvlm_vllm.hf.data import load_samples
    from asymvlm_vllm.hf.shapes_vlm import shipped_model_dir
    from asymvlm_vllm.hf.training import TrainingSettings, heldout_discrepancy, scorer_metadata, train_scorer

    args = parse_args(argv)
    common = provenance("cpu", "torch", "transformers")
    refuse_dirty_results((args.out,), common["dirty"], args.allow_dirty, "benchmarks/scorer_objectives.py")
    quiet_progress_bars()
    model_dir = args.model or shipped_model_dir()
    vlm = PrunedVLM.from_pretrained(model_dir)
    work = Path(tempfile.mkdtemp(prefix="asymvlm-scorers-"))
    samples = load_samples(shapes.write_split(work, "train", args.train_items))
    train_items = shapes.make_items("train", args.train_items)
    select = shapes.make_items("calibration", args.select_items)
    test = shapes.make_items("test", args.test_items)
    heldout = load_samples(shapes.write_split(work, "calibration", min(64, args.select_items)))
    names = args.variants or list(VARIANTS)
    rows, weights = [], {}
    for name in ["cosine (w = 1)", *[n for n in names if n != DIRECT], DIRECT]:
        start = time.perf_counter()
        settings = None
        if name == "cosine (w = 1)":
            weight = None
        elif name == DIRECT:
            weight = direct_supervision(vlm, train_items, args.epochs)
        else:
            settings = TrainingSettings(epochs=args.epochs, **VARIANTS[name])
            weight = train_scorer(vlm, samples, settings, progress=False).weight
        seconds = time.perf_counter() - start
        weights[name] = (weight, settings)
        row = {"scorer": name, "objective": "paper" if settings is not None else name.split(" (")[0],
               "settings": None if settings is None else asdict(settings), "train_items": args.train_items,
               "train_seconds": round(seconds, 1), "select_items": len(select), "test_items": len(test),
               "heldout_discrepancy_keep_0.25": heldout_discrepancy(vlm, heldout, weight, 0.25),
               **{f"select_{k}": v for k, v in measure(vlm, weight, select).items()},
               **{f"test_{k}": v for k, v in measure(vlm, weight, test).items()}}
        rows.append(row)
        print(f"{name:42s} select@0.25 {row['select_accuracy_keep_0.25']:.3f} @0.125 "
              f"{row['select_accuracy_keep_0.125']:.3f} | test@0.25 {row['test_accuracy_keep_0.25']:.3f} "
              f"@0.125 {row['test_accuracy_keep_0.125']:.3f} ({seconds:.0f} s)", flush=True)
    trained = [r for r in rows if r["objective"] != "cosine"]
    best = max(trained, key=lambda r: (r["select_accuracy_keep_0.125"] + r["select_accuracy_keep_0.25"]))
    for r in rows:
        r["chosen"] = r is best
    print(f"chosen on the calibration split: {best['scorer']}")
    if args.save is not None:
        weight, settings = weights[best["scorer"]]
        dataset = f"shapes task, train split, {len(samples)} items"
        if settings is None:  # direct supervision: none of train-scorer's knobs apply
            metadata = scorer_metadata(vlm, TrainingSettings(epochs=args.epochs), len(samples), None, dataset)
            training = metadata.training.model_copy(update={
                "objective": "answer cells", "keep_ratio": None, "mask_strength": None, "mask_temperature": None,
                "weight_regularization": None, "compared": None, "learning_rate": DIRECT_LR})
            metadata = metadata.model_copy(update={"training": training})
        else:
            metadata = scorer_metadata(vlm, settings, len(samples), None, dataset)
        save_scorer(args.save, weight, metadata)
        print(f"wrote {args.save}")
    rows = [{**common, "model": str(model_dir), **r} for r in rows]
    append_rows(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
