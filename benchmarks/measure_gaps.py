"""Importance gaps as a real ranker produces them, for ``capacity.py``'s adaptive scenario.

Runs the transformers path (``PrunedVLM``, the configured ranker and budget) on ``--images``
seeded synthetic pictures (noise with a few flat shapes, sizes drawn from a page-like range) with
questions from a fixed list, and writes every image's importance gap with its provenance
(model, architecture, ranker, commit, dirty flag, date) to a JSON file:

    python benchmarks/measure_gaps.py --model DIR [--trust-remote-code] --out benchmarks/results/gaps_X.json
    python benchmarks/measure_gaps.py --tiny phi3_v     # the tiny random Phi-3.5-V, built offline

On a tiny random-weight model the gaps are those of random features: they say what the default
thresholds do with a real ranker's output, not what they do on real images. A real model
directory and real images give the real distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import provenance, refuse_dirty_results  # noqa: E402

QUESTIONS = [
    "What is the total amount on this invoice?",
    "Which colour is the largest shape in the chart?",
    "What is written in the top left corner?",
    "How many red shapes are there?",
    "Describe the image in one sentence.",
    "What is the date on this document?",
]


def picture(rng: np.random.Generator):
    """A noise picture with flat rectangles, 128-512 px a side (portrait or landscape)."""
    from PIL import Image

    width, height = (int(x) for x in rng.integers(128, 513, size=2))
    pixels = (rng.random((height, width, 3)) * 255).astype("uint8")
    for _ in range(int(rng.integers(2, 6))):
        y, x = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        pixels[y: y + height // 3, x: x + width // 3] = rng.integers(0, 255, size=3)
    return Image.fromarray(pixels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/measure_gaps.py", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local model directory")
    source.add_argument("--tiny", help="a tiny random model family (asymvlm_vllm.hf.tiny.FAMILIES)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--config", default=None, help="AsymVLM config or preset (default: the architecture's preset)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args(argv)
    origin = provenance(f"cpu ({os.cpu_count()} cores)", "torch", "transformers")
    refuse_dirty_results((args.out,), origin["dirty"], args.allow_dirty, "benchmarks/measure_gaps.py")

    import torch

    from asymvlm_vllm.core.config import AsymVLMConfig, list_presets
    from asymvlm_vllm.hf import PrunedVLM

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="asymvlm-gaps-"))
    if args.tiny:
        from asymvlm_vllm.hf.tiny import build_tiny_model

        model_dir, trust = build_tiny_model(args.tiny, work / args.tiny), args.tiny == "phi3_v"
    else:
        model_dir, trust = Path(args.model), args.trust_remote_code
    architecture = (json.loads((model_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
    config = args.config
    if config is None:
        config = next((name for name in list_presets()
                       if architecture in AsymVLMConfig.load(name).architectures), None)
    vlm = PrunedVLM.from_pretrained(model_dir, config, trust_remote_code=trust)
    rng = np.random.default_rng(args.seed)
    gaps = []
    for i in range(args.images):
        inputs = vlm.process([picture(rng)], [QUESTIONS[i % len(QUESTIONS)]])
        prompt = vlm.prune(inputs)
        gaps += [float(d.decision.gap) for d in prompt.images[0]]
    out = {
        **origin,
        "model": args.model or f"tiny {args.tiny} (asymvlm_vllm.hf.tiny, random weights)",
        "architecture": architecture, "config": config, "ranker": type(vlm.ranker).__name__,
        "images": args.images, "seed": args.seed, "gap_mean": float(np.mean(gaps)), "gap_std": float(np.std(gaps)),
        "gaps": gaps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(gaps)} gaps: mean {out['gap_mean']:.4f}, std {out['gap_std']:.4f} -> {args.out}")
    return out


if __name__ == "__main__":
    main()
