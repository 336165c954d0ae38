"""Local dataset readers for scorer training: JSONL manifests and the public VQA parquet layouts."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asymvlm_vllm.core.errors import AsymVLMError
from asymvlm_vllm.hf.data import Sample, load_samples, samples_fingerprint
from tests.hf.conftest import random_image


def _png(seed: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, size, size + 8).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(tmp_path, records, name="data.jsonl", images=3):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i in range(images):
        random_image(i, 16, 16).save(tmp_path / "imgs" / f"{i}.png")
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _docvqa_table(n: int, offset: int = 0) -> pa.Table:
    """lmms-lab/DocVQA's layout: image struct<bytes, path>, question, answers list<string>, ..."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({
        "questionId": pa.array([str(offset + i) for i in range(n)]),
        "question": pa.array([f"What is the number {offset + i}?" for i in range(n)]),
        "question_types": pa.array([["free_text"]] * n, pa.list_(pa.string())),
        "image": pa.array([{"bytes": _png(offset + i), "path": f"doc{offset + i}.png"} for i in range(n)], image_type),
        "docId": pa.array(list(range(offset, offset + n)), pa.int64()),
        "answers": pa.array([[f"{offset + i}", f"number {offset + i}"] for i in range(n)], pa.list_(pa.string())),
        "data_split": pa.array(["validation"] * n),
    })


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_reads_relative_images_answers_and_skips_blank_lines(tmp_path):
    path = _jsonl(tmp_path, [
        {"image": "imgs/0.png", "question": " What colour? ", "answer": "red"},
        "",
        {"image": "imgs/1.png", "question": "How many?", "answers": ["two", "2", "two"]},
    ])
    samples = load_samples(path)
    assert [s.question for s in samples] == ["What colour?", "How many?"]
    assert samples[0].answers == ("red",) and samples[1].answers == ("two", "2", "two")
    assert samples[1].answer == "two"  # the majority answer is the one teacher-forced
    assert samples[0].image == tmp_path / "imgs" / "0.png"
    assert samples[0].source.endswith("data.jsonl:1") and samples[1].source.endswith("data.jsonl:3")
    image = samples[1].load_image()
    assert image.mode == "RGB" and image.size == (16, 16)


def test_majority_answer_ties_go_to_the_first_listed():
    assert Sample(b"x", "q", ("b", "a", "a", "b")).answer == "b"
    assert Sample(b"x", "q", ("c", "a", "a")).answer == "a"


def test_limit_draws_a_seeded_subset_in_file_order(tmp_path):
    records = [{"image": "imgs/0.png", "question": f"q{i}", "answer": "a"} for i in range(20)]
    path = _jsonl(tmp_path, records)
    a, b, c = load_samples(path, limit=5, seed=1), load_samples(path, limit=5, seed=1), load_samples(path, limit=5, seed=2)
    order = [int(s.question[1:]) for s in a]
    assert len(a) == 5 and order == sorted(order)
    assert [s.question for s in a] == [s.question for s in b]
    assert [s.question for s in a] != [s.question for s in c]
    assert len(load_samples(path, limit=100)) == 20
    assert samples_fingerprint(a) == samples_fingerprint(b) != samples_fingerprint(c)


@pytest.mark.parametrize("record, message", [
    ('{"image": "imgs/0.png", "question": "q", "answer": "a"', r"data\.jsonl:2: not valid JSON"),
    ('["imgs/0.png", "q", "a"]', r"data\.jsonl:2: expected a JSON object, got list"),
    ({"image": "imgs/0.png", "answer": "a"}, r"data\.jsonl:2: missing key\(s\) 'question'"),
    ({"question": "q"}, r"missing key\(s\) 'image', 'answer'"),
    ({"image": "imgs/nope.png", "question": "q", "answer": "a"}, r"data\.jsonl:2: image file not found: .*nope\.png"),
    ({"image": "imgs/0.png", "question": "   ", "answer": "a"}, r"data\.jsonl:2: the question is empty"),
    ({"image": "imgs/0.png", "question": "q", "answers": []}, r"data\.jsonl:2: no non-empty answer"),
    ({"image": "imgs/0.png", "question": "q", "answer": 3}, r"answer must be a string or a list of strings"),
    ({"image": 7, "question": "q", "answer": "a"}, r"'image' must be a non-empty path string"),
])
def test_jsonl_errors_name_the_line_and_the_problem(tmp_path, record, message):
    good = {"image": "imgs/0.png", "question": "q", "answer": "a"}
    path = _jsonl(tmp_path, [good, record])
    with pytest.raises(AsymVLMError, match=message):
        load_samples(path)


def test_missing_or_unknown_data_paths(tmp_path):
    with pytest.raises(AsymVLMError, match="data not found"):
        load_samples(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(AsymVLMError, match="expected a .jsonl file, a .parquet file or a folder"):
        load_samples(tmp_path / "data.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(AsymVLMError, match="holds no samples"):
        load_samples(tmp_path / "empty.jsonl")
    with pytest.raises(AsymVLMError, match="a folder without"):
        load_samples(tmp_path)
    with pytest.raises(AsymVLMError, match="matches no file"):
        load_samples(tmp_path / "validation-*.parquet")


# ----------------------------------------------------------------------------- parquet


def test_parquet_docvqa_layout(tmp_path):
    path = tmp_path / "validation-00000-of-00001.parquet"
    pq.write_table(_docvqa_table(4), path)
    samples = load_samples(path)
    assert [s.question for s in samples] == [f"What is the number {i}?" for i in range(4)]
    assert samples[2].answers == ("2", "number 2") and samples[2].answer == "2"
    assert samples[2].source == f"{path}#2"
    image = samples[3].load_image()
    assert image.size == (40, 32) and image.mode == "RGB"
    assert image.tobytes() == random_image(3, 32, 40).convert("RGB").tobytes()


def test_parquet_limit_reads_the_same_rows_across_files_and_row_groups(tmp_path):
    folder = tmp_path / "DocVQA"
    folder.mkdir()
    for shard in range(3):
        pq.write_table(_docvqa_table(5, offset=5 * shard), folder / f"validation-0000{shard}-of-00003.parquet",
                       row_group_size=2)
    everything = load_samples(folder)
    assert len(everything) == 15 and [s.answers[0] for s in everything] == [str(i) for i in range(15)]
    subset = load_samples(folder, limit=6, seed=3)
    picked = [int(s.answers[0]) for s in subset]
    assert len(picked) == 6 and picked == sorted(picked)
    assert [s.image for s in subset] == [everything[i].image for i in picked]
    assert [s.question for s in load_samples(folder / "validation-*.parquet", limit=6, seed=3)] == \
        [s.question for s in subset]


def test_parquet_chartqa_and_textvqa_layouts(tmp_path):
    n = 3
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": _png(i), "path": None} for i in range(n)], image_type)
    # HuggingFaceM4/ChartQA: query + label (list of strings).
    pq.write_table(pa.table({"image": images, "query": ["Which bar is tallest?"] * n, "label": [["2019"]] * n,
                             "human_or_machine": [0] * n}), tmp_path / "chartqa.parquet")
    assert load_samples(tmp_path / "chartqa.parquet")[0].answers == ("2019",)
    # lmms-lab/ChartQA: question + answer (a string).
    pq.write_table(pa.table({"type": ["human_test"] * n, "question": ["What is the peak?"] * n,
                             "answer": ["42"] * n, "image": images}), tmp_path / "lmms_chartqa.parquet")
    assert load_samples(tmp_path / "lmms_chartqa.parquet")[1].answer == "42"
    # TextVQA: ten annotators' answers with repeats; the majority is teacher-forced.
    pq.write_table(pa.table({"question": ["What brand?"] * n, "image": images,
                             "answers": [["nokia", "nokia phone", "nokia"] + ["unanswerable"] * 2] * n}),
                   tmp_path / "textvqa.parquet")
    assert load_samples(tmp_path / "textvqa.parquet")[0].answer == "nokia"


def test_parquet_errors(tmp_path):
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"img": [b"x"], "prompt": ["q"], "answers": [["a"]]}), wrong)
    with pytest.raises(AsymVLMError, match=r"wrong\.parquet has no image column \(looked for image\); "
                                           r"its columns are: img, prompt, answers"):
        load_samples(wrong)
    no_answer = tmp_path / "test-00000-of-00001.parquet"
    table = _docvqa_table(2).set_column(5, "answers", pa.array([None, None], pa.list_(pa.string())))
    pq.write_table(table, no_answer)
    with pytest.raises(AsymVLMError, match=r"#0: no answer \(a test split without labels"):
        load_samples(no_answer)
    path_only = tmp_path / "path_only.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "a.png"}], image_type),
                             "question": ["q"], "answer": ["a"]}), path_only)
    with pytest.raises(AsymVLMError, match=r"image struct has no bytes \(only a path, 'a.png'"):
        load_samples(path_only)
    empty_q = tmp_path / "empty_q.parquet"
    pq.write_table(pa.table({"image": [_png(0)], "question": [""], "answer": ["a"]}), empty_q)
    with pytest.raises(AsymVLMError, match=r"empty_q\.parquet#0: the question is empty"):
        load_samples(empty_q)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(AsymVLMError, match="cannot read .*garbage.parquet as parquet"):
        load_samples(garbage)
    bad_bytes = tmp_path / "bad_bytes.parquet"
    pq.write_table(pa.table({"image": [b"\x89PNG broken"], "question": ["q"], "answer": ["a"]}), bad_bytes)
    with pytest.raises(AsymVLMError, match=r"bad_bytes\.parquet#0: cannot decode the image bytes"):
        load_samples(bad_bytes)[0].load_image()


def test_a_folder_with_several_splits_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(_docvqa_table(2), data / "validation-00000-of-00001.parquet")
    pq.write_table(_docvqa_table(2), data / "test-00000-of-00001.parquet")
    with pytest.raises(AsymVLMError, match=r"holds several splits or subsets \(data/test, data/validation\)"):
        load_samples(tmp_path)
    assert len(load_samples(data / "validation-*.parquet")) == 2
