import os

import pytest
import torch
from hypothesis import settings

# Without CUDA the kernel tests run under Triton's interpreter. TRITON_INTERPRET must be set
# before triton.language is first imported (its standard library is @jit-decorated at import),
# and the transformers tests import it through torch long before tests/kernels is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI replays a fixed set of examples so a red run is reproducible; locally they are random.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """A function family -> tiny random-weight model directory; builds each family at most once
    per session (``asymvlm_vllm.hf.tiny``, imported when first used)."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    built = {}

    def get(family: str):
        if family not in built:
            from asymvlm_vllm.hf.tiny import build_tiny_model

            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get
