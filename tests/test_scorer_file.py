import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from asymvlm_vllm.core import (
    LinearBudget,
    ScorerFileError,
    ScorerMetadata,
    ScorerTraining,
    load_scorer,
    save_scorer,
)

META = ScorerMetadata(architecture="LlavaForConditionalGeneration", hidden_size=6)


def _raw(path, tensors, metadata=None):
    """Write a safetensors file directly, bypassing save_scorer's checks."""
    if metadata is None:
        metadata = {"asymvlm": META.model_dump_json()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_round_trip_with_training_and_calibrated_budget(tmp_path):
    meta = ScorerMetadata(
        architecture="Gemma3ForConditionalGeneration",
        hidden_size=4,
        training=ScorerTraining(samples=1500, epochs=3, learning_rate=1e-3, keep_ratio=0.3, mask_strength=5.0,
                                mask_temperature=1.0, weight_regularization=1e-3, seed=0, dataset="docvqa"),
        calibrated_budget=LinearBudget(target_ratio=0.35, slope=-2.0, gap_mean=0.218, min_ratio=0.15, max_ratio=0.6),
    )
    w = torch.tensor([0.0, 1.0, 2.5, 3.0])
    path = save_scorer(tmp_path / "s.safetensors", w, meta)
    scorer = load_scorer(path, expected_hidden_size=4, expected_architecture="Gemma3ForConditionalGeneration")
    assert torch.equal(scorer.weight, w) and scorer.metadata == meta
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


W = torch.ones(6)


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({"weight": torch.ones(2, 3)}, None, r"must have shape \(6,\) .*got \(2, 3\)"),
        ({"weight": torch.ones(5)}, None, r"must have shape \(6,\) .*got \(5,\)"),
        ({"weight": torch.ones(6, dtype=torch.float16)}, None, "must be float32, got torch.float16"),
        ({"weight": torch.ones(6, dtype=torch.int32)}, None, "must be float32, got torch.int32"),
        ({"weight": torch.tensor([1, 1, float("nan"), 1, 1, 1])}, None, r"1 non-finite values \(first at index 2\)"),
        ({"weight": torch.tensor([1, 1, 1, float("inf"), 1, 1])}, None, "non-finite"),
        ({"weight": torch.tensor([1, -0.5, 1, 1, 1, 1])}, None, r"must lie in \[0, 3\].*weight\[1\] = -0.5"),
        ({"weight": torch.tensor([1, 1, 1, 1, 1, 3.5])}, None, r"weight\[5\] = 3.5"),
        ({"weight": W, "bias": W.clone()}, None, r"exactly one tensor named 'weight', found \['bias', 'weight'\]"),
        ({"w": W}, None, r"found \['w'\]"),
        ({"weight": W}, {}, "has no 'asymvlm' metadata"),
        ({"weight": W}, {"asymvlm": "{not json"}, "invalid metadata"),
        ({"weight": W}, {"asymvlm": json.dumps({"architecture": "X", "hidden_size": 0})}, "invalid metadata:\n  hidden_size: Input should be greater than or equal to 1 \\(got 0\\)"),
        ({"weight": W}, {"asymvlm": json.dumps({"architecture": "X", "hidden_size": 6, "format_version": 2})}, "invalid metadata:\n  format_version: Input should be 1"),
    ],
)
def test_bad_scorer_files_are_refused_with_a_reason(tmp_path, tensors, metadata, match):
    path = _raw(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(ScorerFileError, match=match) as info:
        load_scorer(path)
    assert str(path) in str(info.value)


def test_expected_model_mismatch(tmp_path):
    path = save_scorer(tmp_path / "s.safetensors", W, META)
    with pytest.raises(ScorerFileError, match="trained for hidden size 6, but the model's is 3072"):
        load_scorer(path, expected_hidden_size=3072)
    with pytest.raises(ScorerFileError, match="trained for LlavaForConditionalGeneration, but the model is Phi3VForCausalLM"):
        load_scorer(path, expected_architecture="Phi3VForCausalLM")


class _Trap:
    """Unpickling this creates a file: proof that a loader executed pickle code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickles_are_refused_without_being_unpickled(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "scorer.pt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": _Trap(str(marker))}))
        match = "it is a Python pickle"
    else:
        torch.save({"weight": torch.ones(6), "trap": _Trap(str(marker))}, path)
        match = "it is a zip archive"
    with pytest.raises(ScorerFileError, match=f"not a safetensors file: {match}.*pickled files are refused"):
        load_scorer(path)
    assert not marker.exists()


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ScorerFileError, match="does not exist"):
        load_scorer(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ScorerFileError, match="not a safetensors file"):
        load_scorer(tmp_path / "empty.safetensors")


@pytest.mark.parametrize(
    "weight, match",
    [(torch.full((6,), float("nan")), "non-finite"), (torch.full((6,), 4.0), r"\[0, 3\]"), (torch.ones(7), "shape"), (torch.ones(6).double(), "float32")],
)
def test_save_refuses_what_load_would_refuse_and_writes_nothing(tmp_path, weight, match):
    with pytest.raises(ScorerFileError, match=match):
        save_scorer(tmp_path / "s.safetensors", weight, META)
    assert list(tmp_path.iterdir()) == []
