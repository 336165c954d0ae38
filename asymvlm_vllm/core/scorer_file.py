"""Scorer files: the learned weight ``w`` as safetensors, with JSON metadata in its header.

One file holds both: the tensor ``weight`` (D,) float32 and, under the header metadata key
``asymvlm``, a JSON document (:class:`ScorerMetadata`). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .budget import BudgetRuleConfig
from .errors import ScorerFileError, format_validation_error

__all__ = [
    "SCORER_WEIGHT_RANGE",
    "Scorer",
    "ScorerMetadata",
    "ScorerTraining",
    "load_scorer",
    "save_scorer",
]

METADATA_KEY = "asymvlm"
WEIGHT_KEY = "weight"
SCORER_WEIGHT_RANGE = (0.0, 3.0)
"""Training clamps ``w`` to this range after every step; files outside it are refused."""


class ScorerTraining(BaseModel):
    """How the weight was trained (Appendix D's knobs); informational."""

    model_config = ConfigDict(extra="forbid")

    samples: int | None = Field(default=None, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    keep_ratio: float | None = Field(default=None, gt=0, le=1)
    mask_strength: float | None = Field(default=None, ge=0)
    mask_temperature: float | None = Field(default=None, gt=0)
    weight_regularization: float | None = Field(default=None, ge=0)
    seed: int | None = None
    dataset: str | None = None
    final_loss: float | None = None
    compared: Literal["text", "answer"] | None = None
    objective: Literal["soft-mask hidden states", "answer cells"] | None = None


class ScorerMetadata(BaseModel):
    """What a scorer file says about its weight."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["asymvlm-scorer"] = "asymvlm-scorer"
    format_version: Literal[1] = 1
    architecture: str = Field(min_length=1, description="HF architecture, e.g. Gemma3ForConditionalGeneration")
    hidden_size: int = Field(ge=1, description="D: the language model's input-embedding size")
    embedding_space: Literal["lm_input"] = Field(
        default="lm_input",
        description="vision rows are the projector's outputs, text rows the LM's input embeddings",
    )
    training: ScorerTraining | None = None
    calibrated_budget: BudgetRuleConfig | None = None


@dataclass(frozen=True)
class Scorer:
    """A loaded scorer: ``weight`` (D,) float32 within :data:`SCORER_WEIGHT_RANGE`."""

    weight: Tensor
    metadata: ScorerMetadata


def _check_weight(weight: Tensor, hidden_size: int, where: str) -> None:
    if not isinstance(weight, Tensor):
        raise ScorerFileError(f"{where}: weight must be a tensor, got {type(weight).__name__}")
    if weight.dtype != torch.float32:
        raise ScorerFileError(f"{where}: weight must be float32, got {weight.dtype}")
    if weight.shape != (hidden_size,):
        raise ScorerFileError(
            f"{where}: weight must have shape ({hidden_size},) (the metadata's hidden_size), got {tuple(weight.shape)}"
        )
    bad = (~torch.isfinite(weight)).nonzero().flatten()
    if bad.numel():
        raise ScorerFileError(f"{where}: weight has {bad.numel()} non-finite values (first at index {int(bad[0])})")
    lo, hi = SCORER_WEIGHT_RANGE
    outside = ((weight < lo) | (weight > hi)).nonzero().flatten()
    if outside.numel():
        i = int(outside[0])
        raise ScorerFileError(
            f"{where}: weight must lie in [{lo:g}, {hi:g}] (training clamps it there); "
            f"{outside.numel()} values do not, e.g. weight[{i}] = {float(weight[i]):g}"
        )


def save_scorer(path: str | os.PathLike, weight: Tensor, metadata: ScorerMetadata) -> Path:
    """Validate and write a scorer file atomically (a crash never leaves a half-written file).

    Parameters
    ----------
    path : path of the ``.safetensors`` file to write.
    weight : Tensor, shape (metadata.hidden_size,), float32, values in [0, 3].
    metadata : ScorerMetadata
    """
    path = Path(path)
    weight = weight.detach().cpu().contiguous()
    _check_weight(weight, metadata.hidden_size, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({WEIGHT_KEY: weight}, tmp, metadata={METADATA_KEY: metadata.model_dump_json()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _describe_non_safetensors(path: Path) -> str:
    head = path.read_bytes()[:4]
    if head[:2] == b"PK":
        return "it is a zip archive (a torch.save checkpoint?)"
    if head[:1] == b"\x80":
        return "it is a Python pickle"
    return "its header is not safetensors"


def load_scorer(
    path: str | os.PathLike, *, expected_hidden_size: int | None = None, expected_architecture: str | None = None
) -> Scorer:
    """Read and check a scorer file.

    Refuses, with :class:`ScorerFileError` naming the file and the problem: a missing file,
    anything but safetensors (pickles are never loaded), extra or missing tensors, metadata
    that is absent or invalid, a weight that is not float32 of shape (hidden_size,), that has
    NaN/inf, or that leaves [0, 3]; and a hidden size or architecture other than expected.
    """
    path = Path(path)
    where = f"scorer file {path}"
    if not path.is_file():
        raise ScorerFileError(f"{where} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            header = f.metadata() or {}
            if keys != {WEIGHT_KEY}:
                raise ScorerFileError(f"{where} must hold exactly one tensor named '{WEIGHT_KEY}', found {sorted(keys)}")
            weight = f.get_tensor(WEIGHT_KEY)
    except SafetensorError as e:
        raise ScorerFileError(
            f"{where} is not a safetensors file: {_describe_non_safetensors(path)} ({e}); "
            "scorers are stored as safetensors only, pickled files are refused"
        ) from None
    if METADATA_KEY not in header:
        raise ScorerFileError(f"{where} has no '{METADATA_KEY}' metadata; write it with asymvlm_vllm.core.save_scorer")
    try:
        metadata = ScorerMetadata.model_validate(json.loads(header[METADATA_KEY]))
    except json.JSONDecodeError as e:
        raise ScorerFileError(f"{where} has invalid metadata: not JSON ({e})") from None
    except ValidationError as e:
        raise ScorerFileError(format_validation_error(e, f"{where} has invalid metadata")) from None
    _check_weight(weight, metadata.hidden_size, where)
    if expected_hidden_size is not None and metadata.hidden_size != expected_hidden_size:
        raise ScorerFileError(
            f"{where} was trained for hidden size {metadata.hidden_size}, but the model's is {expected_hidden_size}"
        )
    if expected_architecture is not None and metadata.architecture != expected_architecture:
        raise ScorerFileError(
            f"{where} was trained for {metadata.architecture}, but the model is {expected_architecture}"
        )
    return Scorer(weight=weight, metadata=metadata)
