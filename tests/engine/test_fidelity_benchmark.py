"""``benchmarks/fidelity.py --smoke --served``: the shapes VLM's accuracy through the transformers
path and through ``vllm serve --plugin asymvlm`` (real server, CPU engine), which must agree."""

import json

import pytest

from tests.scripts import BENCHMARKS, load_script

fidelity = load_script(BENCHMARKS / "fidelity.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    return fidelity.main(["--smoke", "--served", "--cpu-test-engine", "--out", str(out / "rows.json"),
                          "--png", str(out / "chart.png"), "--allow-dirty"]), out


def test_rows_carry_provenance_and_the_chart_is_written(rows):
    rows, out = rows
    assert json.loads((out / "rows.json").read_text()) == rows
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        assert {"commit", "dirty", "device", "torch", "transformers", "model", "scorer"} <= row.keys()


def test_the_ranker_table_is_complete_and_shaped_like_the_papers(rows):
    rows, _ = rows
    table = {(r["ranker"], r["keep_ratio"]): r for r in rows if r["table"] == "rankers"}
    assert set(table) == {(n, k) for n in fidelity.RANKERS for k in fidelity.KEEP_RATIOS}
    full = table[("learned", 1.0)]["accuracy"]
    assert full >= 0.85  # 48 items: the shipped model's ≥ 0.93, with room for a small sample
    assert all(table[(n, 1.0)]["accuracy"] == full for n in fidelity.RANKERS)  # keep 1.0 prunes nothing
    # The oracle keeps the answer's cells; a position-only ranker does not.
    assert table[("oracle", 0.125)]["kept_answer_cell"] == 1.0 and table[("oracle", 0.125)]["accuracy"] >= full - 0.1
    assert table[("spiral", 0.125)]["accuracy"] < table[("oracle", 0.125)]["accuracy"]
    assert table[("learned", 0.125)]["accuracy"] > table[("random", 0.125)]["accuracy"]


def test_the_budget_table_compares_at_matched_average_keep(rows):
    rows, _ = rows
    budgets = [r for r in rows if r["table"] == "budgets"]
    assert len(budgets) == 4  # methods A and B, each with its uniform twin
    for adaptive, uniform in zip(budgets[::2], budgets[1::2]):
        assert adaptive["budget"].startswith("method") and uniform["budget"] == "uniform at the same average"
        assert abs(adaptive["average_keep"] - uniform["average_keep"]) <= 1 / 64 + 1e-9


def test_the_served_plugin_gives_the_transformers_answers(rows):
    rows, _ = rows
    served = [r for r in rows if r["table"] == "served"]
    assert [r["budget"] for r in served] == ["uniform 1", "uniform 0.25", "method A (threshold)"]
    for row in served:
        assert row["items"] == 24
        # Every request was pruned, exactly as the transformers path pruned it (no prefix-cache hit).
        assert row["statuses"] == ["pruned"], row
        assert row["served_average_keep"] == pytest.approx(row["transformers_average_keep"]), row
        assert row["same_answer"] >= 23 / 24, row
        assert abs(row["accuracy"] - row["transformers_accuracy"]) <= 1 / 24 + 1e-9, row
