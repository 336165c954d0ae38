"""Helpers for engine-level tests: the real vLLM engine, in-process, on CPU, with tiny models.

Importing this module prepares the process (idempotent, see :func:`configure_cpu_engine_env`),
so it must be imported before vLLM is; ``tests/engine/conftest.py`` does that at collection.
vLLM itself is imported lazily, inside the helpers.

Example::

    from tests.engine.helpers import chat_messages, engine_image, free_llm, greedy_params, make_llm, num_free_blocks

    llm = make_llm(model_dir)                      # ~6 s in-process
    free0 = num_free_blocks(llm)
    out = llm.chat([chat_messages(engine_image(0), "Describe the image.")], greedy_params(8))
    tokens = list(out[0].outputs[0].token_ids)
    assert num_free_blocks(llm) == free0
    free_llm(llm)
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

import torch

__all__ = [
    "ENGINE_ENV", "EnginePool", "FAMILY_ENGINE_ARGS", "SHIM_DIR", "block_pool", "chat_messages", "chat_prompt",
    "configure_cpu_engine_env", "engine_core", "engine_image", "family_engine_args", "free_llm", "free_llms",
    "generated_tokens", "greedy_params", "make_llm", "make_plugin_llm", "model_runner", "num_free_blocks",
    "recorded_decisions", "scheduler", "subprocess_env", "trusts_remote_code",
]

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"
REPO_ROOT = Path(__file__).resolve().parents[2]

# CPU platform; 1 GiB of KV cache; no hub; the engine core in this process (so tests can reach the
# scheduler and the model runner, and start-up takes ~6 s instead of ~30 s).
ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def configure_cpu_engine_env() -> None:
    """Set :data:`ENGINE_ENV` (without overriding what the caller set), put the TEST-ONLY CPU-op
    shim on ``sys.path`` (vLLM then finds its ``vllm.general_plugins`` entry point) and register
    it right away as well. Idempotent; call before vLLM is imported."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    shim = str(SHIM_DIR)
    if shim not in sys.path:
        sys.path.insert(0, shim)
    import asymvlm_test_cpu_shim

    asymvlm_test_cpu_shim.register()


def subprocess_env(base: dict | None = None) -> dict:
    """Environment for a child process that runs vLLM (e.g. ``vllm serve``): :data:`ENGINE_ENV`
    plus ``PYTHONPATH`` with the shim folder (its entry point loads it there, and in the engine
    core process that ``vllm serve`` always starts) and the repo root. Variables already in
    ``base`` (default: ``os.environ``) win, except ``PYTHONPATH``, which is prepended to."""
    env = dict(os.environ if base is None else base)
    for key, value in ENGINE_ENV.items():
        env.setdefault(key, value)
    parts = [str(SHIM_DIR), str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


configure_cpu_engine_env()
_TORCH_SET_NUM_THREADS = torch.set_num_threads  # vLLM's CPU worker monkey-patches it


# ---------------------------------------------------------------- engine construction

# What a family's tiny checkpoint needs beyond :func:`make_llm`'s defaults. Phi-3.5-Vision's
# directory carries its processor as remote code, so the tests (the user here) opt in with
# ``trust_remote_code``; an image is 457-757 tokens (1 x 2 to 2 x 2 HD crops), hence the longer
# context and prefill step.
FAMILY_ENGINE_ARGS: dict[str, dict] = {
    "phi3_v": dict(trust_remote_code=True, max_model_len=2048, max_num_batched_tokens=2048),
}


def family_engine_args(family: str) -> dict:
    """:data:`FAMILY_ENGINE_ARGS` of ``family`` (a copy; empty for most families)."""
    return dict(FAMILY_ENGINE_ARGS.get(family, {}))


def trusts_remote_code(family: str) -> bool:
    """Whether the tests load ``family``'s tiny checkpoint with ``trust_remote_code=True``."""
    return bool(FAMILY_ENGINE_ARGS.get(family, {}).get("trust_remote_code", False))


def make_llm(model_dir, **overrides):
    """A ``vllm.LLM`` for a tiny model on CPU with the test defaults; ``overrides`` win.

    Defaults: eager, float32, 512-token context, 4 sequences, 512 batched tokens, block size 32
    (CPU needs a multiple of 32), seed 0, no custom ops (pure-torch paths), up to 2 images per
    prompt, prefix caching on.
    """
    from vllm import LLM

    threads = torch.get_num_threads()
    kwargs = dict(
        model=str(model_dir), enforce_eager=True, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=512,
        dtype="float32", block_size=32, seed=0, compilation_config={"custom_ops": ["none"]},
        limit_mm_per_prompt={"image": 2}, enable_prefix_caching=True,
    )
    kwargs.update(overrides)
    llm = LLM(**kwargs)
    llm._asymvlm_test_threads = threads  # restored by free_llm
    return llm


def free_llm(llm) -> None:
    """Shut an in-process LLM down and release its memory (model, KV cache, process group), so
    that the next :func:`make_llm` in this process starts clean. Drop your own references too.

    Also undoes what vLLM's CPU worker does to the whole (pytest) process: it replaces
    ``torch.set_num_threads`` with a no-op and drops torch to one thread. (It also seeds
    ``random``/``numpy``/``torch`` globally with the engine seed; that is not undone.)
    """
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    threads = getattr(llm, "_asymvlm_test_threads", None)
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        gc.collect()
        torch.set_num_threads = _TORCH_SET_NUM_THREADS
        if threads is not None:
            torch.set_num_threads(threads)


def make_plugin_llm(model_dir, config, monkeypatch, kv_cache_bytes: int = 64 * 2**20, **overrides):
    """:func:`make_llm` with AsymVLM (``config``: a preset, file or mapping; None: plain vLLM) and
    a KV cache of ``kv_cache_bytes``. vLLM's CPU platform lets ``VLLM_CPU_KVCACHE_SPACE`` (1 GiB in
    the test env) override ``kv_cache_memory_bytes``, so ``monkeypatch`` unsets it; small caches
    let several engines live side by side in one test module."""
    from asymvlm_vllm.engine.plugin import asymvlm_engine_args

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kwargs = dict(kv_cache_memory_bytes=kv_cache_bytes, **overrides)
    if config is not None:
        kwargs = asymvlm_engine_args(model_dir, config, **kwargs)
        kwargs.pop("model")
    return make_llm(model_dir, **kwargs)


def free_llms(llms) -> None:
    """Shut several in-process LLMs down. Each ``free_llm`` costs full garbage collections and
    process-wide cleanup, so all but the last only stop their executor and scheduler (what
    ``EngineCore.shutdown`` does before that cleanup) and the last runs the cleanup once."""
    llms = list(llms)
    if not llms:
        return
    last = llms.pop()
    while llms:
        core = engine_core(llms.pop())
        core.model_executor.shutdown()
        core.scheduler.shutdown()
        del core
    free_llm(last)


class EnginePool:
    """A test module's engines, built on first use and all freed together at its end
    (:func:`free_llms`); a context manager. ``model_dirs``: family -> tiny model directory (the
    ``engine_models`` fixture)."""

    def __init__(self, model_dirs):
        import pytest

        self.model_dirs = model_dirs
        self.monkeypatch = pytest.MonkeyPatch()
        self.llms: dict = {}
        self.processors: dict = {}

    def build(self, key, family: str, config, kv_cache_bytes: int, **overrides):
        """The engine ``key`` (:func:`make_plugin_llm` of ``family`` with ``config``, the family's
        :data:`FAMILY_ENGINE_ARGS` and ``overrides``, which win)."""
        if key not in self.llms:
            kwargs = {**family_engine_args(family), **overrides}
            self.llms[key] = make_plugin_llm(self.model_dirs(family), config, self.monkeypatch, kv_cache_bytes,
                                             **kwargs)
        return self.llms[key]

    def processor(self, family: str):
        """The family's transformers processor (for prompt text)."""
        if family not in self.processors:
            from transformers import AutoProcessor

            self.processors[family] = AutoProcessor.from_pretrained(
                self.model_dirs(family), local_files_only=True, trust_remote_code=trusts_remote_code(family))
        return self.processors[family]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        llms = list(self.llms.values())
        self.llms.clear()
        try:
            free_llms(llms)
        finally:
            self.monkeypatch.undo()


# ---------------------------------------------------------------- reaching the engine's parts


def engine_core(llm):
    """The in-process ``EngineCore`` (needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError(f"{type(client).__name__} has no in-process engine core; "
                           "set VLLM_ENABLE_V1_MULTIPROCESSING=0 before the LLM is built")
    return core


def scheduler(llm):
    """The engine core's scheduler (``vllm.v1.core.sched.scheduler.Scheduler`` or a subclass)."""
    return engine_core(llm).scheduler


def model_runner(llm):
    """The driver worker's model runner (``CPUModelRunner`` or a subclass)."""
    return engine_core(llm).model_executor.driver_worker.worker.model_runner


@contextlib.contextmanager
def recorded_decisions(sched):
    """Inside the block, every decision the AsymVLM scheduler applies, by request id."""
    decisions = {}
    apply = sched._apply_decision

    def record(request_id, decision):
        decisions[request_id] = decision
        return apply(request_id, decision)

    sched._apply_decision = record
    try:
        yield decisions
    finally:
        del sched._apply_decision


def block_pool(llm):
    """The scheduler's KV ``BlockPool``."""
    return scheduler(llm).kv_cache_manager.block_pool


def num_free_blocks(llm) -> int:
    return block_pool(llm).get_num_free_blocks()


# ---------------------------------------------------------------- requests


def engine_image(seed: int = 0, height: int = 224, width: int = 224):
    """A deterministic noise image with flat rectangles (``tests/hf/conftest.py:random_image``).
    224 x 224 gives 64 image tokens for every tiny family but LLaVA-NeXT (88) and Phi-3-V (757: its
    HD transform makes 2 x 2 crops of a square; 128 x 64 gives 2 x 1 crops, 469 tokens; 64 x 128
    gives 1 x 2, 457)."""
    from tests.hf.conftest import random_image

    return random_image(seed, height, width)


def chat_messages(image, question: str) -> list[dict]:
    """One user turn in OpenAI style for ``LLM.chat``: the image(s) (a PIL image, a list of them,
    or None for a text-only turn) first, then the question."""
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    content = [{"type": "image_pil", "image_pil": img} for img in images]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def chat_prompt(processor, num_images: int, question: str) -> str:
    """The chat template's text of one user turn with ``num_images`` images, then ``question``.

    Phi-3.5-Vision's template takes string content: its images are the ``<|image_k|>`` tags, each
    on its own line before the text, as vLLM renders a chat's image parts for such a template."""
    if type(processor).__name__ == "Phi3VProcessor":
        content = "".join(f"<|image_{k}|>\n" for k in range(1, num_images + 1)) + question
        return processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                       add_generation_prompt=True, tokenize=False)
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def greedy_params(max_tokens: int = 8, **kwargs):
    """``SamplingParams`` for exactly ``max_tokens`` greedy tokens (EOS ignored)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def generated_tokens(outputs) -> list[list[int]]:
    """The generated token ids of each ``RequestOutput`` (first completion)."""
    return [list(o.outputs[0].token_ids) for o in outputs]
