"""The shapes task: a seeded, spatially localized visual question a tiny VLM can learn here.

A 64 × 64 image on an 8 × 8 grid of 8-px cells (one cell = one CLIP patch = one vision token
of the tiny LLaVA): grey noise everywhere, and :data:`NUM_OBJECTS` shapes of distinct kinds in
distinct random cells, each in one of :data:`COLOURS`. Three kinds of question:

==========  ================================  ==========  ====================================
kind        question                          answer      cells that decide it
==========  ================================  ==========  ====================================
``colour``  ``what colour is the circle?``    ``red``     the circle's cell (*localized*)
``exists``  ``is there a ring?``              ``yes/no``  the ring's cell, or every shape's
``count``   ``how many red shapes?``          ``0``…``4`` every shape's cell (*global*)
==========  ================================  ==========  ====================================

Item ``i`` of split ``s`` is a pure function of ``(SPLIT_SEEDS[s], i)``, so the train,
calibration and test splits never share an item and any item can be regenerated alone.
Plain numpy; PIL only to write PNG files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AnswerCellRanker",
    "CELL",
    "COLOURS",
    "GRID",
    "IMAGE_SIZE",
    "KINDS",
    "NUM_OBJECTS",
    "SHAPES",
    "SPLIT_SEEDS",
    "ShapesItem",
    "answer_vocabulary",
    "is_correct",
    "make_item",
    "make_items",
    "question_vocabulary",
    "write_split",
]

GRID = 8
CELL = 8
IMAGE_SIZE = GRID * CELL
NUM_OBJECTS = 4
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 30),
    "purple": (145, 55, 195),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
KINDS = ("colour", "exists", "count")
KIND_WEIGHTS = (0.5, 0.25, 0.25)
SPLIT_SEEDS = {"train": 0, "calibration": 1, "test": 2}


def _shape_masks() -> dict[str, np.ndarray]:
    # Any two masks differ in at least 16 of a cell's 64 pixels.
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    dx, dy = x - CELL / 2, y - CELL / 2
    r = np.hypot(dx, dy)
    return {
        "circle": r <= 3.7,
        "square": (np.abs(dx) <= 2) & (np.abs(dy) <= 2),
        "triangle": np.abs(dx) <= (y + 0.5) / 2,
        "cross": (np.abs(dx) <= 1) | (np.abs(dy) <= 1),
        "ring": (r >= 2.3) & (r <= 3.9),
        "bar": np.abs(dy) <= 1.5,
    }


MASKS = _shape_masks()


@dataclass(frozen=True)
class ShapesItem:
    """One image, question and answer of the shapes task.

    Attributes
    ----------
    image : np.ndarray, shape (64, 64, 3), uint8
    question, answer : str
    kind : one of :data:`KINDS`
    objects : tuple of (shape, colour, cell)
        Every shape in the image; ``cell`` is its row-major index in the 8 × 8 grid.
    relevant : tuple of int
        The cells that decide the answer, most decisive first (see the module table).
    """

    image: np.ndarray
    question: str
    answer: str
    kind: str
    objects: tuple[tuple[str, str, int], ...]
    relevant: tuple[int, ...]

    def pil_image(self):
        from PIL import Image

        return Image.fromarray(self.image, mode="RGB")


def _draw(rng: np.random.Generator, objects) -> np.ndarray:
    grey = rng.integers(70, 186, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    image = np.repeat(grey, 3, axis=2).astype(np.int16)
    for shape, colour, cell in objects:
        row, col = divmod(cell, GRID)
        tile = image[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
        rgb = np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3)
        tile[MASKS[shape]] = rgb
    return np.clip(image, 0, 255).astype(np.uint8)


def make_item(seed: int, index: int, kind: str | None = None, num_objects: int = NUM_OBJECTS) -> ShapesItem:
    """Item ``index`` of the stream ``seed``; ``kind`` forces the question kind; ``num_objects``
    (1 … 6) is fewer shapes for a training curriculum (the task itself has :data:`NUM_OBJECTS`)."""
    if not 1 <= num_objects <= len(SHAPES):
        raise ValueError(f"num_objects must be in 1..{len(SHAPES)}, got {num_objects}")
    rng = np.random.default_rng([seed, index])
    shapes = rng.choice(len(SHAPES), size=num_objects, replace=False)
    cells = rng.choice(GRID * GRID, size=num_objects, replace=False)
    names = list(COLOURS)
    colours = rng.integers(0, len(names), size=num_objects)
    objects = tuple((SHAPES[s], names[c], int(cell)) for s, c, cell in zip(shapes, colours, cells))
    image = _draw(rng, objects)
    drawn = rng.choice(len(KINDS), p=KIND_WEIGHTS)
    kind = kind if kind is not None else KINDS[drawn]
    every_cell = tuple(cell for _, _, cell in objects)
    if kind == "colour":
        shape, colour, cell = objects[int(rng.integers(num_objects))]
        question, answer, relevant = f"what colour is the {shape}?", colour, (cell,)
    elif kind == "exists":
        present = rng.random() < 0.5
        if present:
            shape, _, cell = objects[int(rng.integers(num_objects))]
            relevant = (cell,) + tuple(c for c in every_cell if c != cell)
        else:
            absent = [s for s in SHAPES if s not in {o[0] for o in objects}]
            shape, relevant = absent[int(rng.integers(len(absent)))], every_cell
        question, answer = f"is there a {shape}?", "yes" if present else "no"
    elif kind == "count":
        in_image = [o[1] for o in objects]
        if rng.random() < 0.5:
            colour = in_image[int(rng.integers(num_objects))]
        else:
            colour = names[int(rng.integers(len(names)))]
        same = tuple(cell for _, c, cell in objects if c == colour)
        question, answer = f"how many {colour} shapes?", str(len(same))
        relevant = same + tuple(c for c in every_cell if c not in same)
    else:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")
    return ShapesItem(image, question, answer, kind, objects, relevant)


def make_items(split: str, count: int, start: int = 0) -> list[ShapesItem]:
    """Items ``start … start + count − 1`` of a split (``train``, ``calibration`` or ``test``)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    return [make_item(SPLIT_SEEDS[split], i) for i in range(start, start + count)]


def question_vocabulary() -> list[str]:
    """Every question the task can ask."""
    return ([f"what colour is the {s}?" for s in SHAPES] + [f"is there a {s}?" for s in SHAPES]
            + [f"how many {c} shapes?" for c in COLOURS])


def answer_vocabulary() -> list[str]:
    """Every answer the task can have."""
    return list(COLOURS) + ["yes", "no"] + [str(n) for n in range(NUM_OBJECTS + 1)]


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after stripping whitespace and a final full stop, case-insensitive."""
    return prediction.strip().rstrip(".").strip().lower() == answer.lower()


def write_split(folder: str | os.PathLike, split: str, count: int) -> Path:
    """Write ``count`` items of ``split`` as PNG files and a JSONL manifest
    (``{image, question, answer, kind, relevant}`` per line, read by ``asymvlm train-scorer``,
    ``asymvlm calibrate`` and :func:`~asymvlm_vllm.hf.data.load_samples`).

    Returns
    -------
    Path of the manifest, ``folder / f"{split}.jsonl"``
    """
    folder = Path(folder)
    (folder / split).mkdir(parents=True, exist_ok=True)
    manifest = folder / f"{split}.jsonl"
    with manifest.open("w") as f:
        for i, item in enumerate(make_items(split, count)):
            name = f"{split}/{i:06d}.png"
            item.pil_image().save(folder / name)
            f.write(json.dumps({"image": name, "question": item.question, "answer": item.answer,
                                "kind": item.kind, "relevant": list(item.relevant)}) + "\n")
    return manifest


@dataclass(frozen=True)
class AnswerCellRanker:
    """The oracle of the benchmarks: ranks one item's deciding cells (:attr:`ShapesItem.relevant`)
    first, in that order, and every other vision token after them in a seeded random order.

    It knows the answer, so it is a ceiling for real rankers, never something to serve.
    """

    cells: tuple[int, ...]
    seed: int = 0

    def score(self, vision, text, grid_shape=None):
        import torch

        n = vision.shape[0]
        scores = torch.rand(n, generator=torch.Generator().manual_seed(self.seed))
        for rank, cell in enumerate(self.cells):
            scores[cell] = 2.0 + len(self.cells) - rank
        return scores.to(vision.device)
