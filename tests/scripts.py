"""Loading a script that is not part of an installed package (a benchmark, a model directory's
remote code) as a module, for the tests that drive it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """Execute the file at ``path`` as module ``name`` (default: ``script_<stem>``), registered in
    ``sys.modules`` so that its dataclasses and pickling find it."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
