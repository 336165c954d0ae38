"""``benchmarks/scorer_objectives.py --smoke``: every scorer variant trained and measured, one chosen
on the calibration split and saved as a scorer file the shipped model loads."""

import json

from asymvlm_vllm.core import load_scorer
from tests.scripts import BENCHMARKS, load_script

scorer_objectives = load_script(BENCHMARKS / "scorer_objectives.py")


def test_smoke_trains_measures_chooses_and_saves(tmp_path):
    scorer = tmp_path / "scorer.safetensors"
    rows = scorer_objectives.main(["--smoke", "--out", str(tmp_path / "rows.json"), "--save", str(scorer),
                                   "--allow-dirty"])
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    names = [r["scorer"] for r in rows]
    assert names == ["cosine (w = 1)", *list(scorer_objectives.VARIANTS)[:2], "direct supervision (labels)"]
    for row in rows:
        assert {"commit", "dirty", "device", "torch", "transformers"} <= row.keys()
        for split in ("select", "test"):
            for keep in scorer_objectives.KEEPS:
                assert 0.0 <= row[f"{split}_accuracy_keep_{keep:g}"] <= 1.0
    (chosen,) = [r for r in rows if r["chosen"]]
    trained = [r for r in rows if r["objective"] != "cosine"]
    score = lambda r: r["select_accuracy_keep_0.125"] + r["select_accuracy_keep_0.25"]  # noqa: E731
    assert chosen["objective"] != "cosine" and score(chosen) == max(score(r) for r in trained)
    training = load_scorer(scorer, expected_hidden_size=128).metadata.training
    assert training.samples == 24
    if chosen["objective"] == "paper":
        assert training.objective == "soft-mask hidden states"
        assert training.compared == chosen["settings"]["compared"]
        assert training.mask_temperature == chosen["settings"]["mask_temperature"]
    else:
        assert training.objective == "answer cells" and training.mask_temperature is None
