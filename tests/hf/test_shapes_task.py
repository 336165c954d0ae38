"""The shapes task's generator, checked against the pixels it draws (not against its own labels)."""

import json
from collections import Counter

import numpy as np
import pytest

from asymvlm_vllm.hf import shapes
from asymvlm_vllm.hf.data import load_samples
from tests.hf.conftest import cell_tile, colourful, nearest_colour


def test_items_are_pure_functions_of_split_and_index():
    a, b = shapes.make_item(0, 17), shapes.make_item(0, 17)
    assert np.array_equal(a.image, b.image) and (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
    assert shapes.make_items("train", 3, start=5)[0].question == shapes.make_item(0, 5).question
    splits = {s: [it.image.tobytes() for it in shapes.make_items(s, 50)] for s in shapes.SPLIT_SEEDS}
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["calibration"]) & set(splits["test"])


@pytest.mark.parametrize("index", range(60))
def test_the_answer_follows_from_the_pixels(index):
    item = shapes.make_item(2, index)
    image = item.image
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    # Exactly the object cells hold colour; every other cell is grey noise.
    object_cells = {cell for _, _, cell in item.objects}
    for cell in range(64):
        n = int(colourful(cell_tile(image, cell)).sum())
        assert (n >= 8) if cell in object_cells else (n == 0), (cell, n)
    seen = {cell: nearest_colour(cell_tile(image, cell)) for cell in object_cells}
    shape_of = {cell: shape for shape, _, cell in item.objects}
    assert len(set(shape_of.values())) == shapes.NUM_OBJECTS  # the shape named in a question is unique
    words = item.question.rstrip("?").split()
    if item.kind == "colour":
        cell = next(c for c, s in shape_of.items() if s == words[-1])
        assert item.answer == seen[cell] and item.relevant == (cell,)
    elif item.kind == "exists":
        assert item.answer == ("yes" if words[-1] in shape_of.values() else "no")
        assert set(item.relevant) == object_cells
    else:
        colour = words[2]
        assert item.answer == str(sum(c == colour for c in seen.values()))
        assert set(item.relevant) == object_cells
        assert all(seen[c] == colour for c in item.relevant[:int(item.answer)])


def test_the_drawn_shapes_differ_from_each_other():
    masks = shapes.MASKS
    for a in masks:
        for b in masks:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 16, (a, b)


def test_question_kinds_and_answers_are_mixed():
    items = shapes.make_items("train", 2000)
    kinds = Counter(it.kind for it in items)
    assert 0.45 < kinds["colour"] / 2000 < 0.55 and 0.2 < kinds["exists"] / 2000 < 0.3
    exists = Counter(it.answer for it in items if it.kind == "exists")
    assert 0.4 < exists["yes"] / sum(exists.values()) < 0.6
    counts = Counter(it.answer for it in items if it.kind == "count")
    assert {"0", "1", "2"} <= set(counts)
    assert {it.question for it in items} == set(shapes.question_vocabulary())
    assert {it.answer for it in items} <= set(shapes.answer_vocabulary())


@pytest.mark.parametrize("prediction,ok", [(" red", True), ("Red.", True), ("red\n", True), ("reddish", False),
                                           ("", False), ("red green", False)])
def test_is_correct(prediction, ok):
    assert shapes.is_correct(prediction, "red") is ok


def test_a_written_split_loads_as_training_data(tmp_path):
    manifest = shapes.write_split(tmp_path, "calibration", 12)
    samples = load_samples(manifest)
    items = shapes.make_items("calibration", 12)
    assert [s.question for s in samples] == [it.question for it in items]
    assert [s.answer for s in samples] == [it.answer for it in items]
    assert np.array_equal(np.asarray(samples[3].load_image()), items[3].image)
    assert json.loads(manifest.read_text().splitlines()[0])["relevant"] == list(items[0].relevant)


def test_the_answer_cell_oracle_ranks_the_deciding_cells_first():
    import torch

    item = shapes.make_item(2, 3, kind="count")
    scores = shapes.AnswerCellRanker(item.relevant).score(torch.zeros(64, 8), torch.zeros(2, 8))
    top = torch.argsort(scores, descending=True)[:len(item.relevant)].tolist()
    assert top == list(item.relevant)
