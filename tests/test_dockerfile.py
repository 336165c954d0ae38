"""The Dockerfile installs what the README's "Set up" installs, and serves with the plugin.

These checks read the Dockerfile and .dockerignore (CI has no Docker). The image itself is built
and served from by ``tests/docker/smoke.sh`` (opt-in: ``ASYMVLM_DOCKER_SMOKE=1``, see
``tests/docker/test_docker_smoke.py``).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
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


def _base_image() -> str:
    """The base: ``FROM ${BASE}`` with ``ARG BASE=...`` before it (a build may substitute it)."""
    (base,) = _all("FROM")
    instructions = _instructions()
    first_from = next(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    defaults = dict(rest.split("=", 1) for kw, rest in instructions[:first_from] if kw == "ARG" and "=" in rest)
    match = re.fullmatch(r"\$\{?(\w+)\}?", base)
    return defaults[match.group(1)] if match else base


def _pairs(keyword: str) -> dict[str, str]:
    """Every ``key=value`` of every ``keyword`` instruction (ENV, LABEL; later ones win)."""
    pairs = {}
    for rest in _all(keyword):
        for word in shlex.split(rest):
            key, _, value = word.partition("=")
            pairs[key] = value
    return pairs


def _env() -> dict[str, str]:
    return _pairs("ENV")


def _labels() -> dict[str, str]:
    return _pairs("LABEL")


def test_base_is_an_argument_whose_default_is_the_published_base():
    (base,) = _all("FROM")
    assert base in ("${BASE}", "$BASE"), "a test build substitutes the base with --build-arg BASE=..."
    assert _base_image() == "python:3.11-slim-bookworm"


def test_base_image_has_the_python_the_lock_was_resolved_for():
    base = _base_image()
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


def test_healthcheck_asks_vllm_health_on_the_served_port():
    (check,) = _all("HEALTHCHECK")
    options, _, command = check.partition("CMD")
    assert "--start-period=" in options, "loading a model takes minutes"
    command = json.loads(command)
    assert command[0] == "/opt/venv/bin/python", "the slim base has no curl; the venv's python is there"
    assert "http://127.0.0.1:8000/health" in command[-1]


def test_labels_follow_the_oci_conventions():
    labels = _labels()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.title"] == "asymvlm-vllm"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    for key in ("source", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}" in labels, key
    # source and revision come from build arguments (--build-arg REVISION=$(git rev-parse HEAD))
    args = {rest.split("=")[0] for rest in _all("ARG")}
    assert {"REVISION", "SOURCE", "BASE"} <= args


def test_caches_live_in_the_non_root_users_writable_home():
    user = _all("USER")[-1]
    (home,) = {rest for kw, rest in _instructions() if kw == "WORKDIR"}
    assert home == f"/home/{user}"
    assert any(f"useradd --create-home" in run and run.split("&&")[0].split()[-1] == user for run in _all("RUN"))
    env = _env()
    assert env["HOME"] == home
    for key in ("XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
        assert env[key].startswith(home + "/.cache"), key


def test_the_build_trusts_the_system_ca_store_and_bakes_in_no_certificate_or_test_shim():
    """A build behind a TLS proxy mounts its CA bundle over /etc/ssl/certs for the build only
    (tests/docker/smoke.sh does); the Dockerfile copies no certificate and points nothing at one."""
    runs = " ".join(_all("RUN"))
    assert "--cert /etc/ssl/certs/ca-certificates.crt" in runs  # pip (bookworm's pip: certifi otherwise)
    assert all("--system-certs" in args for args in _uv_installs())
    for kw, rest in _instructions():
        if kw in ("COPY", "ADD"):
            assert not re.search(r"\.(crt|pem)\b|cpu_shim|tests", rest), rest
    assert not {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "PYTHONPATH", "VLLM_TARGET_DEVICE"} & _env().keys()


# ------------------------------------------------------------------------------ .dockerignore


def _dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _excluded(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides;
    ``!`` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in _dockerignore_patterns():
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_matcher_follows_docker():
    assert _pattern_regex("**/__pycache__").fullmatch("__pycache__")
    assert _pattern_regex("**/__pycache__").fullmatch("a/b/__pycache__")
    assert _pattern_regex("*").fullmatch("tests") and not _pattern_regex("*").fullmatch("a/b")
    assert _pattern_regex("*.egg-info").fullmatch("x.egg-info")


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "asymvlm_vllm/engine/plugin.py",
                                  "asymvlm_vllm/assets/sample.png", "kernels/__init__.py",
                                  "configs/llava-1.5.yaml", "requirements/lock.txt", "requirements/overrides.txt"])
def test_dockerignore_keeps_what_the_build_needs(path):
    assert (REPO / path).exists(), path
    assert not _excluded(path), path


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "build/lib/x.py", "asymvlm_vllm.egg-info/PKG-INFO",
                                  "tests/engine/cpu_shim/asymvlm_test_cpu_shim.py", "benchmarks/README.md",
                                  "asymvlm_vllm/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v",
                                  ".hypothesis/x", "Dockerfile", ".ci/run"])
def test_dockerignore_leaves_out_local_state_tests_and_the_cpu_shim(path):
    assert _excluded(path), path


def test_build_context_is_small():
    """What Docker would send: every file of the checkout the patterns keep, at most a few MB."""
    negations = [p.lstrip("!").strip("/") for p in _dockerignore_patterns() if p.startswith("!")]
    total, files = 0, 0
    stack = [REPO]
    while stack:
        folder = stack.pop()
        for entry in folder.iterdir():
            rel = entry.relative_to(REPO).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                # a folder Docker leaves out, unless a ! pattern could re-include something in it
                if not (_excluded(rel) and not any(n.startswith(rel + "/") for n in negations)):
                    stack.append(entry)
            elif not _excluded(rel):
                total += entry.lstat().st_size
                files += 1
    assert files > 20
    assert total < 20_000_000, f"{files} files, {total / 1e6:.1f} MB in the build context"


# ------------------------------------------------------------------------------ tests/docker


def test_smoke_script_parses_and_mounts_the_shim_only_for_its_run():
    script = REPO / "tests" / "docker" / "smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--build-arg \"BASE=$BASE_IMAGE\"" in text and '-f "$REPO/Dockerfile"' in text
    assert '-v "$REPO/tests/engine/cpu_shim:/opt/asymvlm-test-cpu-shim:ro"' in text
    assert '-v "$WORK/model:/models/shapes-vlm:ro" -v "$WORK/config:/config:ro"' in text
    assert "rmi --all" in text and "rm --all" in text


def test_smoke_request_png_is_a_valid_64x64_image():
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("smoke_request", REPO / "tests" / "docker" / "smoke_request.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import io

    image = Image.open(io.BytesIO(module.png()))
    image.load()
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((32, 32)) == (220, 30, 30) and image.getpixel((0, 0)) == (30, 60, 200)
