"""Benchmarks never write rows under ``benchmarks/results`` that claim a commit whose code did not run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import BENCHMARKS, load_script

RESULTS = BENCHMARKS / "results"


def _common():
    return load_script(BENCHMARKS / "common.py")


@pytest.mark.parametrize("paths", [(RESULTS / "serve.json",), (Path("/tmp/x.json"), RESULTS / "sub" / "x.png")])
def test_a_dirty_tree_may_not_write_results(paths):
    common = _common()
    with pytest.raises(SystemExit, match="uncommitted changes.*--allow-dirty"):
        common.refuse_dirty_results(paths, True, False, "bench")


@pytest.mark.parametrize(("paths", "dirty", "allow"), [
    ((RESULTS / "serve.json",), False, False),  # clean
    ((RESULTS / "serve.json",), None, False),  # unknown (a copy without .git): the rows say so
    ((RESULTS / "serve.json",), True, True),  # told so: the rows say dirty: true
    ((Path("/tmp/serve.json"), Path("/tmp/serve.png")), True, False),  # not under results/
])
def test_otherwise_it_may(paths, dirty, allow):
    _common().refuse_dirty_results(paths, dirty, allow, "bench")


def test_the_checkout_is_read_from_git():
    info = _common().checkout()
    assert set(info) == {"commit", "dirty"} and isinstance(info["dirty"], bool) and len(info["commit"]) >= 7
