"""Language-model prefill time on the transformers reference path, pruned vs unpruned, next to the FLOPs ratio.

A random-weight LLaVA-1.5-shaped model (576 image tokens from a 336 px CLIP tower; a language
model of ``--hidden`` width and ``--layers`` layers) prefills one image + question at several
keep ratios. Only the language model's forward over the (pruned) input embeddings is timed; the
vision tower, projector and token selection run once, untimed, and there is no LM head or decoding. Each row gives the LM input length, the paper's FLOPs estimate
(``prefill_flops``) and the measured median prefill time, each as a ratio to keep-all measured
in the same run (this machine is noisy; only the ratios mean something).

    .venv/bin/python benchmarks/hf_prefill.py [--smoke] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import time
from pathlib import Path

from common import RESULTS, write_rows


def build_model(hidden: int, layers: int, image_size: int, dtype):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=14, projection_dim=256)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=(image_size // 14) ** 2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype).eval().requires_grad_(False)
    model.set_attn_implementation("sdpa")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/hf_prefill.py", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 repetitions (CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rep", type=int, default=7, help="timed repetitions per ratio (median is reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "hf_prefill.json")
    args = parser.parse_args()
    import torch

    from asymvlm_vllm.core import CosineRanker, UniformBudget
    from asymvlm_vllm.core.flops import prefill_flops
    from asymvlm_vllm.hf.families import adapter_for
    from asymvlm_vllm.hf.fidelity import last_hidden_states
    from asymvlm_vllm.hf.pruning import prune_prompt

    hidden, layers, image_size, rep = (128, 2, 112, 2) if args.smoke else (args.hidden, args.layers, 336, args.rep)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(hidden, layers, image_size, dtype).to(args.device)
    num_image = (image_size // 14) ** 2
    gen = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, 32000, (36,), generator=gen)  # ~ a DocVQA question in a chat template
    ids = torch.cat([text_ids[:5], torch.full((num_image,), 32000), text_ids[5:]])[None].to(args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, image_size, image_size, generator=gen).to(args.device, dtype)}
    adapter = adapter_for(model)
    cfg = model.config.get_text_config()

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def median_seconds(prompt) -> float:
        times = []
        with torch.inference_mode():
            last_hidden_states(model, prompt)  # warm-up
            for _ in range(rep):
                sync()
                start = time.perf_counter()
                last_hidden_states(model, prompt)
                sync()
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.inference_mode():
        prompts = {r: prune_prompt(model, adapter, inputs, CosineRanker(), UniformBudget(r)) for r in (1.0, 0.75, 0.5, 0.25)}
    # Interleave the ratios so drift in machine load hits all of them alike.
    seconds = {r: [] for r in prompts}
    for _ in range(3):
        for r, prompt in prompts.items():
            seconds[r].append(median_seconds(prompt))
    base_tokens = prompts[1.0].lm_lengths[0]
    base_flops = prefill_flops(base_tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
    base_time = statistics.median(seconds[1.0])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("ASYMVLM_BENCH_COMMIT", "unknown")
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "commit": commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "model": f"random LLaVA-shaped, LM hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {num_image} image tokens",
           "dtype": str(dtype).removeprefix("torch.")}
    rows = []
    for r, prompt in prompts.items():
        tokens = prompt.lm_lengths[0]
        flops = prefill_flops(tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
        t = statistics.median(seconds[r])
        rows.append({**env, "keep_ratio": r, "vision_kept": prompt.vision_tokens_kept[0], "lm_tokens": tokens,
                     "flops_ratio": flops / base_flops, "prefill_ms": t * 1e3, "time_ratio": t / base_time})
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
