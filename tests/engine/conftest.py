"""Engine-level tests: the real vLLM 0.33 engine, in-process on CPU, with tiny random models.

The PyPI vLLM wheel has no compiled CPU ops; ``cpu_shim/`` (TEST-ONLY) fills them with torch
code. Everything here must happen before vLLM is imported anywhere in the process: the root
``tests/conftest.py`` imports torch but not vLLM, and ``helpers`` sets the environment, puts the
shim on ``sys.path`` and registers it when imported (below, at collection time).

Every test under ``tests/engine`` is marked ``slow``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

if "vllm" in sys.modules:  # the env below may then come too late (e.g. a resolved platform)
    warnings.warn("vllm was imported before tests/engine/conftest.py set up the CPU engine env", stacklevel=1)

# Before anything can import vllm: importing helpers sets the env (setdefault), puts the shim on
# sys.path and registers it (belt and braces: vLLM also loads it through its entry point).
from .helpers import (  # noqa: F401  (re-exported: ``from tests.engine.conftest import make_llm``)
    block_pool, chat_messages, configure_cpu_engine_env, engine_core, engine_image, family_engine_args, free_llm,
    generated_tokens, greedy_params, make_llm, model_runner, num_free_blocks, scheduler, subprocess_env,
    trusts_remote_code,
)

configure_cpu_engine_env()  # already done by the import; explicit for the reader

import pytest  # noqa: E402

ENGINE_FAMILIES = ("gemma3", "llava", "llava_next", "phi3_v", "qwen2_5_vl")

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(slow)


@pytest.fixture(scope="session")
def engine_models(tmp_path_factory):
    """A function ``family -> model dir``: the tiny checkpoint of ``family`` (one of
    ``ENGINE_FAMILIES``), built at most once per session (about a second each; Phi-3-V, with its
    one-layer CLIP ViT-L/14-336, about ten)."""
    from asymvlm_vllm.hf.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("engine-tiny-vlms")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def hf_models(engine_models):
    """family -> a ``PrunedVLM`` (transformers, float32, SDPA) of the same tiny checkpoint (Phi-3-V's
    with ``trust_remote_code=True`` for its processor, see ``FAMILY_ENGINE_ARGS``)."""
    from asymvlm_vllm.hf import PrunedVLM

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = PrunedVLM.from_pretrained(engine_models(family),
                                                      trust_remote_code=trusts_remote_code(family))
        return cache[family]

    yield get
    cache.clear()


@pytest.fixture(scope="session")
def server(engine_models, tmp_path_factory):
    """``vllm serve TINY_LLAVA --plugin asymvlm --asymvlm-config llava-1.5`` on 127.0.0.1, shared by
    the server test modules (:mod:`tests.engine.server`)."""
    from .server import start_server, stop_server

    running = start_server(str(engine_models("llava")), tmp_path_factory.mktemp("vllm-serve") / "server.log")
    try:
        yield running
    finally:
        stop_server(running.process)

