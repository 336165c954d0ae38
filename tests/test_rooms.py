"""Each room imports only what it may (see asymvlm_vllm/__init__.py)."""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
# room -> (source folder, top-level modules it must never import, even lazily)
ROOMS = {
    "asymvlm_vllm.core": (REPO / "asymvlm_vllm" / "core", {"vllm", "transformers", "triton"}),
    "asymvlm_vllm.kernels": (REPO / "kernels", {"vllm", "transformers"}),
    "asymvlm_vllm.hf": (REPO / "asymvlm_vllm" / "hf", {"vllm"}),  # torch itself may load triton
}


def _loaded_after_import(module):
    code = (
        f"import sys, json, {module}; "
        "print(json.dumps([m for m in ('vllm', 'transformers', 'triton', 'torch') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_forbidden_packages_are_installed_so_the_checks_mean_something():
    for name in ("vllm", "transformers", "triton"):
        assert importlib.util.find_spec(name) is not None, f"{name} is not installed"


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_importing_a_room_leaves_forbidden_packages_unloaded(room):
    _, forbidden = ROOMS[room]
    assert not _loaded_after_import(room) & forbidden


def test_importing_the_package_is_light():
    assert _loaded_after_import("asymvlm_vllm") == set()


def _imported_top_levels(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_no_source_file_of_a_room_imports_a_forbidden_package(room):
    folder, forbidden = ROOMS[room]
    for path in folder.rglob("*.py"):
        assert not _imported_top_levels(path) & forbidden, f"{path} imports {_imported_top_levels(path) & forbidden}"


def test_only_the_hf_room_imports_transformers():
    package = REPO / "asymvlm_vllm"
    offenders = [
        str(path.relative_to(REPO))
        for path in [*package.rglob("*.py"), *(REPO / "kernels").rglob("*.py")]
        if "transformers" in _imported_top_levels(path) and package / "hf" not in path.parents
    ]
    assert offenders == []


def test_only_the_engine_room_imports_vllm():
    package = REPO / "asymvlm_vllm"
    offenders = [
        str(path.relative_to(REPO))
        for path in [*package.rglob("*.py"), *(REPO / "kernels").rglob("*.py")]
        if "vllm" in _imported_top_levels(path) and package / "engine" not in path.parents
    ]
    assert offenders == []


@pytest.mark.parametrize("module", ["asymvlm_vllm.engine", "asymvlm_vllm.engine.protocol", "asymvlm_vllm.engine.plugin"])
def test_the_engine_room_loads_vllm_only_when_used(module):
    # vLLM imports the plugin module in every process it starts; it must stay cheap.
    assert "vllm" not in _loaded_after_import(module)


def test_building_the_cli_parser_stays_light():
    code = (
        "import sys, json; from asymvlm_vllm.cli import build_parser; build_parser(); "
        "print(json.dumps([m for m in ('vllm', 'transformers', 'triton', 'torch') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
