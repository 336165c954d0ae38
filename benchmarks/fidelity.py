"""Accuracy against pruning: the paper's Tables 4 and 5 in miniature, on the shapes VLM trained here.

Table 4 (rankers): accuracy at keep 1.0 / 0.75 / 0.5 / 0.25 / 0.125 for the learned scorer,
cosine (w = 1), spiral, random, and the answer-cell oracle (:class:`AnswerCellRanker`, a
ceiling: it knows the answer).

Table 5 (budgets): Method A (threshold rule) and Method B (linear rule), each calibrated with
``asymvlm_vllm.hf.calibration.calibrate`` (exact match) on the task's calibration split, then
measured on the held-out test split against a uniform budget at the same average keep ratio.

``--served`` sends the same test items to ``vllm serve MODEL --plugin asymvlm`` (OpenAI chat
completions, greedy, per-request ``asymvlm_keep_ratio``; the adaptive rows with the calibrated
Method A rule in the server's config) and compares its answers, item by item, with the
transformers path's.

Every row carries the commit, dirty flag, device and versions; rows are appended to
``benchmarks/results/fidelity.json`` and plotted to ``fidelity.png``.

    .venv/bin/python benchmarks/fidelity.py                       # transformers path, ~5 min on 2 cores
    .venv/bin/python benchmarks/fidelity.py --served --cpu-test-engine   # + the served plugin on CPU
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from benchmarks.common import append_rows, provenance, refuse_dirty_results  # noqa: E402

KEEP_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.125)
RANKERS = ("learned", "cosine", "spiral", "random", "oracle")
TARGETS = (0.25, 0.125)
RATIO_GRID = (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75, 1.0)  # whole tokens of 64: 4, 8, 12, 16, 24, ...
MAX_MODEL_LEN = "256"  # a task prompt is 78 tokens


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/fidelity.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="shapes VLM directory (default: the shipped one)")
    p.add_argument("--scorer", type=Path, default=None, help="learned scorer file (default: the shipped one)")
    p.add_argument("--items", type=int, default=1000, help="test-split items (default 1000)")
    p.add_argument("--calibration-items", type=int, default=500, help="calibration-split items (default 500)")
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS),
                   help="Table 5's target average keep ratios (default 0.25 0.125)")
    p.add_argument("--served", action="store_true", help="also run the served plugin and compare")
    p.add_argument("--served-items", type=int, default=200, help="test items sent to the server (default 200)")
    p.add_argument("--served-keep-ratios", type=float, nargs="+", default=[1.0, 0.5, 0.125])
    p.add_argument("--served-only", action="store_true",
                   help="with --served: skip Tables 4 and 5 (calibrate only the served Method A rule)")
    p.add_argument("--cpu-test-engine", action="store_true", help="vLLM's CPU engine with the test op stand-ins")
    p.add_argument("--smoke", action="store_true", help="CI: 48 test items, 64 calibration items, one target")
    p.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    p.add_argument("--png", type=Path, default=RESULTS / "fidelity.png")
    p.add_argument("--allow-dirty", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.items, args.calibration_items, args.targets = 48, 64, [0.25]
        args.served_items, args.served_keep_ratios = 24, [1.0, 0.25]
    return args


def load(args):
    from asymvlm_vllm.core import UniformBudget, load_scorer
    from asymvlm_vllm.core.config import VisionPruningConfig
    from asymvlm_vllm.hf import PrunedVLM, quiet_progress_bars
    from asymvlm_vllm.hf.shapes_vlm import shipped_model_dir, shipped_scorer

    quiet_progress_bars()
    model_dir = args.model or shipped_model_dir()
    scorer = args.scorer or shipped_scorer()
    vision = VisionPruningConfig(budget=UniformBudget(1.0), scorer=scorer, min_keep=1)
    vlm = PrunedVLM.from_pretrained(model_dir, vision)
    return vlm, Path(model_dir), Path(scorer), load_scorer(scorer).weight


def rankers(weight):
    from asymvlm_vllm.core import CosineRanker, LearnedRanker, RandomRanker, SpiralRanker
    from asymvlm_vllm.hf.shapes import AnswerCellRanker

    return {"learned": LearnedRanker(weight), "cosine": CosineRanker(), "spiral": SpiralRanker(),
            "random": RandomRanker(0), "oracle": lambda item: AnswerCellRanker(item.relevant)}


def by_kind(items, correct) -> dict:
    from asymvlm_vllm.hf.shapes import KINDS

    out = {}
    for kind in KINDS:
        hits = [c for c, it in zip(correct, items) if it.kind == kind]
        out[kind] = sum(hits) / len(hits) if hits else None
    return out


def ranker_table(vlm, items, ranked) -> tuple[list[dict], dict]:
    from asymvlm_vllm.core import UniformBudget
    from asymvlm_vllm.hf.shapes_vlm import accuracy

    rows, answers = [], {}
    full = accuracy(vlm, items, UniformBudget(1.0), ranked["learned"])
    for ratio in KEEP_RATIOS:
        for name, ranker in ranked.items():
            result = full if ratio == 1.0 else accuracy(vlm, items, UniformBudget(ratio), ranker)
            answers[(name, ratio)] = result["answers"]
            rows.append({"table": "rankers", "path": "transformers", "ranker": name, "keep_ratio": ratio,
                         "items": len(items), "accuracy": result["accuracy"],
                         "accuracy_by_kind": by_kind(items, result["correct"]),
                         "kept_answer_cell": sum(result["kept_relevant"]) / len(items)})
            print(f"rankers  {name:8s} keep {ratio:<6g} accuracy {result['accuracy']:.3f}", flush=True)
    return rows, answers


def budget_table(vlm, calibration, items, targets, methods=("threshold", "linear")) -> tuple[list[dict], dict]:
    from asymvlm_vllm.core import UniformBudget
    from asymvlm_vllm.hf.calibration import calibrate
    from asymvlm_vllm.hf.shapes_vlm import accuracy

    samples = [(it.pil_image(), it.question, (it.answer,)) for it in calibration]
    rows, rules = [], {}
    table = None
    for target in targets:
        for method in methods:
            report = calibrate(vlm, samples, method=method, objective="exact", target=target, max_new_tokens=4,
                               batch_size=32, table=table, ratio_grid=RATIO_GRID)
            table = report.table
            rule = report.chosen.rule
            rules[(method, target)] = rule
            if not items:
                continue
            adaptive = accuracy(vlm, items, rule)
            average = sum(adaptive["keep_ratios"]) / len(items)
            uniform = accuracy(vlm, items, UniformBudget(min(1.0, average)))
            for name, result, described in ((f"method {'A' if method == 'threshold' else 'B'} ({method})", adaptive,
                                             rule.describe()),
                                            ("uniform at the same average", uniform, f"uniform {average:.4f}")):
                rows.append({"table": "budgets", "path": "transformers", "budget": name, "rule": described,
                             "target": target, "method": method, "items": len(items),
                             "average_keep": sum(result["keep_ratios"]) / len(items), "accuracy": result["accuracy"],
                             "accuracy_by_kind": by_kind(items, result["correct"]),
                             "calibration_items": len(calibration),
                             "calibration_accuracy": report.chosen.objective if result is adaptive else None})
                print(f"budgets  target {target:<6g} {name:34s} keep {rows[-1]['average_keep']:.3f} "
                      f"accuracy {result['accuracy']:.3f}", flush=True)
    return rows, rules


def data_url(item) -> str:
    buf = io.BytesIO()
    item.pil_image().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def served_answers(url: str, model: str, items, xargs: dict) -> list[tuple[str, str | None, float | None]]:
    """Per item: the answer, the plugin's outcome status, and the kept fraction of its vision tokens."""
    import httpx

    def ask(item):
        body = {"model": model, "temperature": 0.0, "max_tokens": 4, "vllm_xargs": xargs,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(item)}},
                                                          {"type": "text", "text": item.question}]}]}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        response.raise_for_status()
        body = response.json()
        outcome = (body.get("kv_transfer_params") or {}).get("asymvlm") or {}
        kept = outcome.get("vision_tokens_kept", outcome.get("vision_tokens"))
        total = outcome.get("vision_tokens")
        return (body["choices"][0]["message"]["content"] or "").strip(), outcome.get("status"), (
            kept / total if kept is not None and total else None)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, items))


def served_table(args, model_dir: Path, scorer: Path, rule, items, hf_answers: dict, hf_keep: dict,
                 work: Path) -> list[dict]:
    import yaml

    from asymvlm_vllm.hf.shapes import is_correct
    from benchmarks.serve import CPU_SERVE_FLAGS, Server

    env = dict(os.environ)
    flags = []
    if args.cpu_test_engine:
        from tests.engine.helpers import subprocess_env

        env, flags = subprocess_env(), [*CPU_SERVE_FLAGS, "--max-model-len", MAX_MODEL_LEN]
    config = {"architectures": ["LlavaForConditionalGeneration"], "calibrated": True,
              "vision": {"enabled": True, "ranker": "learned", "scorer": str(scorer.resolve()),
                         "budget": dataclasses.asdict(rule), "min_keep": 1}}
    config_path = work / "asymvlm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # Every case sends the same images: with prefix caching the later cases would hit the first
    # case's cache and run unpruned (status prefix_cached), measuring nothing.
    flags.append("--no-enable-prefix-caching")
    server = Server(str(model_dir), [*flags, "--plugin", "asymvlm", "--asymvlm-config", str(config_path)], env,
                    work / "server.log", startup_timeout=900)
    rows = []
    try:
        cases = [(f"uniform {r:g}", {"asymvlm_keep_ratio": r, "asymvlm_min_keep": 1}, ("learned", r))
                 for r in args.served_keep_ratios] + [("method A (threshold)", {}, ("adaptive", None))]
        for label, xargs, key in cases:
            results = served_answers(server.url, str(model_dir), items, xargs)
            answers = [a for a, _, _ in results]
            kept = [k for _, _, k in results if k is not None]
            statuses = sorted({st for _, st, _ in results if st is not None})
            reference = hf_answers[key][:len(items)]
            served_acc = sum(is_correct(a, it.answer) for a, it in zip(answers, items)) / len(items)
            hf_acc = sum(is_correct(a, it.answer) for a, it in zip(reference, items)) / len(items)
            same = sum(a == b for a, b in zip(answers, reference)) / len(items)
            rows.append({"table": "served", "path": "vllm serve --plugin asymvlm", "budget": label, "items": len(items),
                         "accuracy": served_acc, "transformers_accuracy": hf_acc, "same_answer": same,
                         "keep_ratio": key[1], "statuses": statuses,
                         "served_average_keep": sum(kept) / len(kept) if kept else None,
                         "transformers_average_keep": hf_keep.get(key)})
            print(f"served   {label:22s} accuracy {served_acc:.3f} (transformers {hf_acc:.3f}), "
                  f"same answer on {same:.1%} of {len(items)} items; kept {rows[-1]['served_average_keep']} "
                  f"(transformers {rows[-1]['transformers_average_keep']:.4f}), statuses {statuses}", flush=True)
    finally:
        server.stop()
    return rows


def latest_tables(path: Path) -> list[dict]:
    """The Table 4 and 5 rows of the latest full run recorded in ``path`` (for a served-only run's chart)."""
    import json

    tables = [r for r in json.loads(path.read_text()) if r["table"] in ("rankers", "budgets")]
    last = tables[-1]["date"] if tables else None
    return [r for r in tables if r["date"] == last]


def save_chart(rows: list[dict], path: Path) -> Path:
    """Left: accuracy against keep ratio per ranker (Table 4). Right: adaptive against uniform
    budgets at the same average keep (Table 5). PNG, drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height, pad = 480, 320, 50
    img = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(img)
    colors = {"learned": (214, 39, 40), "cosine": (31, 119, 180), "spiral": (44, 160, 44),
              "random": (127, 127, 127), "oracle": (148, 103, 189)}
    ratios = sorted(KEEP_RATIOS)

    def xy(ratio, accuracy):
        x = pad + ratios.index(ratio) / (len(ratios) - 1) * (width - 2 * pad)
        return x, height - pad - accuracy * (height - 2 * pad)

    draw.text((pad, 10), "Table 4 in miniature: accuracy against keep ratio", fill="black")
    draw.line([(pad, height - pad), (width - pad, height - pad)], fill="black")
    draw.line([(pad, pad), (pad, height - pad)], fill="black")
    for value in (0.0, 0.5, 1.0):
        draw.text((8, xy(ratios[0], value)[1] - 6), f"{value:.1f}", fill="black")
    for ratio in ratios:
        draw.text((xy(ratio, 0)[0] - 10, height - pad + 6), f"{ratio:g}", fill="black")
    draw.text((width // 2 - 30, height - 20), "keep ratio", fill="black")
    for i, (name, color) in enumerate(colors.items()):
        points = [xy(r["keep_ratio"], r["accuracy"]) for r in sorted(rows, key=lambda r: r.get("keep_ratio") or 0)
                  if r["table"] == "rankers" and r["ranker"] == name]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((width - pad - 70, pad + 14 * i), name, fill=color)

    budgets = [r for r in rows if r["table"] == "budgets"]
    x0 = width
    draw.text((x0 + pad, 10), "Table 5 in miniature: adaptive vs uniform (label: avg keep)", fill="black")
    draw.line([(x0 + pad, height - pad), (x0 + width - pad, height - pad)], fill="black")
    low = min([r["accuracy"] for r in budgets], default=0.0) - 0.05
    high = max([r["accuracy"] for r in budgets], default=1.0) + 0.02
    slot = (width - 2 * pad) / max(1, len(budgets))
    for k, r in enumerate(budgets):
        left = x0 + pad + k * slot + 4
        top = height - pad - (r["accuracy"] - low) / max(1e-9, high - low) * (height - 2 * pad)
        color = (214, 39, 40) if r["budget"].startswith("method") else (127, 127, 127)
        draw.rectangle([left, top, left + slot - 8, height - pad], fill=color)
        draw.text((left, top - 24), f"{r['accuracy']:.3f}", fill="black")
        draw.text((left, top - 12), f"{r['average_keep']:.3f}", fill="black")
        label = ("A" if "threshold" in r["budget"] else "B" if "linear" in r["budget"] else "unif")
        draw.text((left, height - pad + 6), f"{label}@{r['target']:g}", fill="black")
    draw.text((x0 + 4, pad - 12), f"accuracy axis from {low:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv=None) -> list[dict]:
    import torch

    from asymvlm_vllm.hf import shapes

    args = parse_args(argv)
    common = provenance("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(), "torch",
                        "transformers")
    refuse_dirty_results((args.out, args.png), common["dirty"], args.allow_dirty, "benchmarks/fidelity.py")
    vlm, model_dir, scorer, weight = load(args)
    common.update(model=str(model_dir), scorer=str(scorer), smoke=args.smoke)
    items = shapes.make_items("test", args.items)
    calibration = shapes.make_items("calibration", args.calibration_items)
    if args.served_only:
        rows, answers = [], {}
        _, rules = budget_table(vlm, calibration, items[:0], args.targets[:1], methods=("threshold",))
    else:
        rows, answers = ranker_table(vlm, items, rankers(weight))
        budget_rows, rules = budget_table(vlm, calibration, items, args.targets)
        rows += budget_rows
    if rows:
        append_rows(args.out, [{**common, **row} for row in rows])  # kept even if the served part fails
    written = len(rows)
    if args.served:
        from asymvlm_vllm.hf.shapes_vlm import accuracy

        from asymvlm_vllm.core import UniformBudget

        served = items[:args.served_items]
        rule = rules[("threshold", args.targets[0])]
        keeps, answers = {}, {}
        for key, budget in [(("adaptive", None), rule)] + [(("learned", r), UniformBudget(r))
                                                             for r in args.served_keep_ratios]:
            result = accuracy(vlm, served, budget)
            answers[key], keeps[key] = result["answers"], sum(result["keep_ratios"]) / len(served)
        work = Path(tempfile.mkdtemp(prefix="asymvlm-fidelity-"))
        rows += served_table(args, model_dir, scorer, rule, served, answers, keeps, work)
    rows = [{**common, **row} for row in rows]
    append_rows(args.out, rows[written:])
    save_chart(rows if not args.served_only else latest_tables(args.out), args.png)
    print(f"wrote {len(rows)} rows to {args.out} and {args.png}")
    return rows


if __name__ == "__main__":
    main()
