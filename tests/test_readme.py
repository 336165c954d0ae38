"""The README's set-up commands are what CI runs, and its examples run."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def _setup_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_commands():
    commands = _setup_commands()
    assert len(commands) == 2, commands  # one to install, one to test
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == commands


def test_readme_python_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme.split("## The algorithm core", 1)[1].split("\n## ", 1)[0], flags=re.S)
    out = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kept" in out.stdout
