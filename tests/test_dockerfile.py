"""The Dockerfile installs what the README's "Set up" installs, and serves with the plugin.

Docker is not run here (no daemon in CI); these checks read the Dockerfile and .dockerignore.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def _instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    out = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _all(keyword: str) -> list[str]:
    return [rest for kw, rest in _instructions() if kw == keyword]


def _readme_install_command() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    (command,) = [line for line in re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].splitlines()
                  if "uv pip install" in line]
    return command


def _uv_installs() -> list[list[str]]:
    """The argument lists of every ``uv pip install`` the Dockerfile runs."""
    installs = []
    for run in _all("RUN"):
        for part in run.split("&&"):
            words = shlex.split(part)
            for i in range(len(words) - 2):
                if words[i].endswith("uv") and words[i + 1:i + 3] == ["pip", "install"]:
                    installs.append(words[i + 3:])
    return installs


def test_base_image_has_the_python_the_lock_was_resolved_for():
    (base,) = _all("FROM")
    header = (REPO / "requirements" / "lock.txt").read_text().split("\n", 3)[:3]
    (python,) = re.findall(r"--python-version (\d+\.\d+)", "\n".join(header))
    assert re.fullmatch(rf"python:{re.escape(python)}(-[a-z0-9.-]+)?", base), (base, python)


def test_installs_exactly_the_lock_with_the_overrides_like_the_readme():
    readme = _readme_install_command()
    (uv_version,) = re.findall(r"uv==[\w.]+", readme)
    assert any(uv_version in run.split() for run in _all("RUN")), f"the image installs {uv_version}, as the README does"
    installs = _uv_installs()
    assert len(installs) >= 1
    for args in installs:
        # the README's flags, in the README's order
        assert " ".join(args).count("-r requirements/lock.txt --override requirements/overrides.txt") == 1, args
        assert "-e" not in args and "--editable" not in args, "the image installs the package non-editable"
        assert not any(a.startswith(("--no-deps", "--upgrade", "-U", "--prerelease")) for a in args), args
    assert installs[-1][-1] == ".", "the last install is the package itself"
    # requirements/ is in the build context before the first install
    copies = [(i, rest) for i, (kw, rest) in enumerate(_instructions()) if kw == "COPY"]
    first_install = next(i for i, (kw, rest) in enumerate(_instructions()) if kw == "RUN" and "uv pip install" in rest)
    assert any(i < first_install and rest.split()[0].rstrip("/") == "requirements" for i, rest in copies)


def test_serves_with_the_plugin_as_a_non_root_user():
    (entrypoint,) = _all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["vllm", "serve"]
    (cmd,) = _all("CMD")
    cmd = json.loads(cmd)
    assert cmd[0].startswith("/models/")
    assert cmd[cmd.index("--plugin") + 1] == "asymvlm"
    preset = cmd[cmd.index("--asymvlm-config") + 1]
    assert (REPO / "configs" / f"{preset}.yaml").is_file()
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert _all("EXPOSE") == ["8000"]
    users = _all("USER")
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert any("HF_HUB_OFFLINE=1" in env for env in _all("ENV"))


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "asymvlm_vllm/engine/plugin.py",
                                  "kernels/__init__.py", "configs/llava-1.5.yaml", "requirements/lock.txt",
                                  "requirements/overrides.txt"])
def test_dockerignore_keeps_what_the_build_needs(path):
    assert (REPO / path).exists(), path
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    assert not any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns), path


def test_dockerignore_leaves_out_local_state():
    patterns = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", "build", "*.egg-info"} <= patterns
