"""The installed distribution: pins, layout of kernels/ and configs/, the console command."""

import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def test_installed_stack_is_the_locked_one():
    assert md.version("vllm") == "0.33.0"
    locked = dict(
        line.split("==") for line in (REPO / "requirements" / "lock.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in ("torch", "transformers", "triton", "pydantic", "safetensors", "vllm", "certifi"):
        assert md.version(name).split("+")[0] == locked[name], name


def test_distribution_metadata():
    dist = md.distribution("asymvlm-vllm")
    assert "vllm==0.33.0" in dist.requires
    assert dist.metadata["Requires-Python"] == ">=3.11"
    entry_points = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert entry_points[("console_scripts", "asymvlm")] == "asymvlm_vllm.cli:main"
    assert entry_points[("vllm.general_plugins", "asymvlm")] == "asymvlm_vllm.engine.plugin:register"


def test_kernels_are_installed_inside_the_package(tmp_path):
    # From another folder, in isolated mode: only the installed distribution can answer.
    code = (
        "import importlib.util as u, json; "
        "k = u.find_spec('asymvlm_vllm.kernels'); t = u.find_spec('kernels'); "
        "print(json.dumps([k.origin, t and t.origin]))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    ours, top_level = json.loads(out.stdout)
    assert Path(ours).parent.name == "kernels"
    assert top_level is None or Path(top_level).parent.resolve() != Path(ours).parent.resolve()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list tracked files")
def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("asymvlm_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"asymvlm_vllm", wheel.name.split("-py3")[0] + ".dist-info"}, tops  # no bare kernels/ or configs/
    assert "asymvlm_vllm/kernels/__init__.py" in names
    # Every source package is in the wheel, and the demo's bundled sample (package data).
    sources = {str(p.relative_to(REPO)) for p in (REPO / "asymvlm_vllm").rglob("*.py")}
    assert sources <= set(names), sources - set(names)
    assert {"asymvlm_vllm/assets/sample.png", "asymvlm_vllm/assets/sample.json"} <= set(names)
    # The trained shapes VLM, its scorer, config and card, and the demo's task image.
    shipped = {f"asymvlm_vllm/assets/shapes_vlm/{n}" for n in (
        "config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja",
        "card.json")}
    beside = {f"asymvlm_vllm/assets/{n}" for n in ("shapes.png", "shapes.json", "shapes_scorer.safetensors",
                                                   "shapes_asymvlm.yaml")}
    assert shipped | beside <= set(names)
    # vLLM loads every *.safetensors in a model directory as weights: only the model's may be there.
    assert [n for n in names if n.startswith("asymvlm_vllm/assets/shapes_vlm/") and n.endswith(".safetensors")] == [
        "asymvlm_vllm/assets/shapes_vlm/model.safetensors"]
    presets = sorted(n for n in names if n.startswith("asymvlm_vllm/configs/") and n.endswith(".yaml"))
    assert [Path(n).stem for n in presets] == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_console_command_runs():
    exe = Path(sys.executable).parent / "asymvlm"
    out = subprocess.run([str(exe), "config", "presets"], capture_output=True, text=True, check=True)
    assert "llava-1.5" in out.stdout and "UNCALIBRATED" in out.stdout
