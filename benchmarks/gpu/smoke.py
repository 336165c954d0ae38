"""The plugin on a real-shape model on the GPU (benchmark tooling; ``run.sh`` calls it).

    python benchmarks/gpu/smoke.py MODEL_DIR --out FILE.jsonl                 # step a: smoke
    python benchmarks/gpu/smoke.py MODEL_DIR --throughput 64 --out FILE.jsonl # step d: plain vs plugin

Weights are vLLM's dummy ones (``load_format="dummy"``), bf16, Triton attention, vision attention
on SDPA, async scheduling as vLLM defaults on GPUs. Each step writes one JSON line: what ran, how
long it took, the outcome, and which stand-in ops were called. The route is in every line
(torch version, stand-in ops, attention backend): only ratios between plain vLLM and the plugin,
measured in the same process, carry over to a real vLLM build.

* **smoke**: image requests, greedy, seeded sampling and penalties, each must answer with
  status ``pruned``; a long answer past a 64-token eviction budget must report evictions.
* **throughput**: ``--throughput N`` image requests (16 output tokens) through plain vLLM, then
  through the plugin at uniform keep 50 %, same flags; requests per second and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path


def _route() -> dict:
    import torch

    try:
        import standins

        calls = dict(standins.CALLS)
    except ImportError:
        calls = None
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "attention": "TRITON_ATTN", "standin_calls": calls}


def _engine_args(model: str, image_tokens: int) -> dict:
    return dict(load_format="dummy", dtype="bfloat16", enforce_eager=True, attention_backend="TRITON_ATTN",
                mm_encoder_attn_backend="TORCH_SDPA", compilation_config={"custom_ops": ["none"]},
                max_model_len=max(4096, image_tokens + 1024), max_num_seqs=32, gpu_memory_utilization=0.45,
                limit_mm_per_prompt={"image": 1}, seed=0)


def _image_size(model: str) -> int:
    config = json.loads((Path(model) / "config.json").read_text())
    return 1120 if "qwen" in config.get("model_type", "") else 336


def _chat(size: int, question: str, shade: int = 0):
    from PIL import Image

    image = Image.new("RGB", (size, size), (200, 30 + shade % 200, 30))
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": question}]}]


def _free(llm) -> None:
    import torch
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    torch.cuda.empty_cache()


def smoke(model: str, emit) -> None:
    from vllm import LLM, SamplingParams

    from asymvlm_vllm.engine.plugin import asymvlm_engine_args

    size = _image_size(model)
    started = time.time()
    config = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
    llm = LLM(**asymvlm_engine_args(model, config, **_engine_args(model, 2000)))
    emit(step="engine_up", seconds=round(time.time() - started, 1),
         async_scheduling=llm.llm_engine.vllm_config.scheduler_config.async_scheduling)
    cases = {
        "greedy": SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        "seeded": SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
        "penalties": SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.1, presence_penalty=0.1,
                                    ignore_eos=True),
        "evicting": SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True,
                                   extra_args={"asymvlm_text_budget": 64}),
    }
    for i, (name, params) in enumerate(cases.items()):
        started = time.time()
        (out,) = llm.chat([_chat(size, "Describe the image.", i)], params)
        outcome = (out.kv_transfer_params or {}).get("asymvlm", {})
        ok = outcome.get("status") == "pruned" and len(out.outputs[0].token_ids) == params.max_tokens
        if name == "evicting":
            ok = ok and outcome.get("text", {}).get("evicted_blocks", 0) > 0
        emit(step=name, ok=ok, seconds=round(time.time() - started, 2), prompt_tokens=len(out.prompt_token_ids),
             outcome=outcome, tokens=list(out.outputs[0].token_ids)[:16])
    _free(llm)


def throughput(model: str, n: int, emit) -> None:
    from vllm import LLM, SamplingParams

    from asymvlm_vllm.engine.plugin import asymvlm_engine_args

    size = _image_size(model)
    chats = [_chat(size, f"Question {i}: what is in the image?", i) for i in range(n)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    rates = {}
    for name in ("plain vLLM", "AsymVLM keep 50%"):
        if name == "plain vLLM":
            llm = LLM(model=model, **_engine_args(model, 2000))
        else:
            config = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
            llm = LLM(**asymvlm_engine_args(model, config, **_engine_args(model, 2000)))
        llm.chat(chats[:2], params)  # warm-up
        started = time.time()
        outs = llm.chat(chats, params)
        seconds = time.time() - started
        rates[name] = n / seconds
        emit(step="throughput", engine=name, requests=n, seconds=round(seconds, 2), requests_per_second=rates[name],
             prompt_tokens=sum(len(o.prompt_token_ids) for o in outs))
        _free(llm)
    emit(step="throughput_ratio", ratio=rates["AsymVLM keep 50%"] / rates["plain vLLM"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/smoke.py", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--throughput", type=int, default=0, metavar="N")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(**row) -> None:
        row = {"model": Path(args.model).name, **row, **_route()}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print("RESULT " + json.dumps(row), flush=True)

    try:
        if args.throughput:
            throughput(args.model, args.throughput, emit)
        else:
            smoke(args.model, emit)
    except BaseException:
        traceback.print_exc()
        emit(step="failed", error=traceback.format_exc().splitlines()[-1])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
