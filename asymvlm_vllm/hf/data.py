"""Training and held-out samples from local files: a JSONL manifest or the public VQA parquet files.

Never a hub: the files must already be on disk. Two layouts are read.

* **JSONL**: one JSON object per line, ``{"image": path, "question": str, "answer": str}``
  (or ``"answers": [str, ...]``); image paths are relative to the JSONL file's folder. Blank
  lines are skipped.
* **Parquet**: a file, a glob pattern (``DocVQA/validation-*.parquet``) or a folder searched
  recursively for ``*.parquet`` (a folder holding several splits is refused), in the layout of
  the public Hugging Face VQA datasets (DocVQA, ChartQA, TextVQA and their lmms-lab copies):
  an image column :data:`IMAGE_COLUMNS` (a struct with ``bytes`` and maybe ``path``, or raw
  binary), a question column :data:`QUESTION_COLUMNS` (``query`` is ChartQA's name) and an
  answer column :data:`ANSWER_COLUMNS` (a string or a list of strings; ``label`` is
  ChartQA's). Rows without an answer (e.g. DocVQA's test split) are an error.

Images are decoded only when a sample is used (:meth:`Sample.load_image`), so loading 1,500
samples costs little memory; JSONL image files are checked to exist up front.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import AsymVLMError

__all__ = ["ANSWER_COLUMNS", "IMAGE_COLUMNS", "QUESTION_COLUMNS", "Sample", "load_samples", "samples_fingerprint"]

IMAGE_COLUMNS = ("image",)
QUESTION_COLUMNS = ("question", "query")
ANSWER_COLUMNS = ("answers", "answer", "label")


@dataclass(frozen=True)
class Sample:
    """One (image, question, answers) triple.

    Attributes
    ----------
    image : Path or bytes
        An image file, or the encoded image (PNG/JPEG bytes) from a parquet row.
    question : str
        Non-empty.
    answers : tuple of str
        At least one non-empty answer.
    source : str
        Where it came from, for error messages (``file:line`` or ``file#row``).
    """

    image: Path | bytes
    question: str
    answers: tuple[str, ...]
    source: str = ""

    @property
    def answer(self) -> str:
        """The answer to teacher-force: the most frequent one (ties: the first listed).

        TextVQA lists ten annotators' answers with repeats, DocVQA a few variants of one answer.
        """
        counts = Counter(self.answers)
        return max(self.answers, key=lambda a: counts[a])  # max keeps the first of equal counts

    def load_image(self):
        """The image as a PIL RGB image; :class:`AsymVLMError` if it cannot be read."""
        if isinstance(self.image, Path):
            from .model import load_image

            return load_image(self.image)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(self.image)) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise AsymVLMError(f"{self.source}: cannot decode the image bytes: {exc}") from None


def _answers(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise AsymVLMError(f"{where}: the answer must be a string or a list of strings, got {value!r}")
    answers = tuple(a.strip() for a in value if a.strip())
    if not answers:
        raise AsymVLMError(f"{where}: no non-empty answer (training teacher-forces the answer)")
    return answers


def _question(value, where: str) -> str:
    if not isinstance(value, str):
        raise AsymVLMError(f"{where}: the question must be a string, got {value!r}")
    if not value.strip():
        raise AsymVLMError(f"{where}: the question is empty (image tokens are scored against the question)")
    return value.strip()


def _read_jsonl(path: Path) -> list[Sample]:
    samples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AsymVLMError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise AsymVLMError(f"{where}: expected a JSON object, got {type(record).__name__}")
            answer_key = "answers" if "answers" in record else "answer"
            missing = [k for k in ("image", "question", answer_key) if k not in record]
            if missing:
                raise AsymVLMError(
                    f"{where}: missing key(s) {', '.join(map(repr, missing))}; each line needs "
                    "'image', 'question' and 'answer' (or 'answers')"
                )
            if not isinstance(record["image"], str) or not record["image"]:
                raise AsymVLMError(f"{where}: 'image' must be a non-empty path string, got {record['image']!r}")
            image = path.parent / record["image"]
            if not image.is_file():
                raise AsymVLMError(f"{where}: image file not found: {image}")
            samples.append(Sample(image, _question(record["question"], where), _answers(record[answer_key], where), where))
    if not samples:
        raise AsymVLMError(f"{path} holds no samples")
    return samples


def _parquet_columns(schema, path: Path) -> tuple[str, str, str]:
    names = schema.names
    picked = []
    for kind, options in (("image", IMAGE_COLUMNS), ("question", QUESTION_COLUMNS), ("answer", ANSWER_COLUMNS)):
        found = next((c for c in options if c in names), None)
        if found is None:
            raise AsymVLMError(
                f"{path} has no {kind} column (looked for {', '.join(options)}); its columns are: {', '.join(names)}"
            )
        picked.append(found)
    return tuple(picked)


def _image_bytes(value, where: str) -> bytes:
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            hint = f" (only a path, {value.get('path')!r}, which is not read)" if value.get("path") else ""
            raise AsymVLMError(f"{where}: the image struct has no bytes{hint}")
        value = data
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise AsymVLMError(f"{where}: the image is not encoded bytes (got {type(value).__name__})")
    return bytes(value)


_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")


def _parquet_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise AsymVLMError(f"{path} is a folder without *.parquet files")
    # A dataset's root holds every split (and lmms-lab's every config): never mix them silently.
    groups = set()
    for file in files:
        shard = _SHARD.match(file.name)
        groups.add(str(file.parent.relative_to(path) / (shard["split"] if shard else file.stem)))
    if len(groups) > 1 and any(_SHARD.match(f.name) for f in files):
        names = sorted(groups)
        raise AsymVLMError(
            f"{path} holds several splits or subsets ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); "
            f"pass one of them, e.g. '{path / names[0]}-*.parquet'"
        )
    return files


def _read_parquet(files: list[Path], limit: int | None, rng: np.random.Generator) -> list[Sample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    opened = []
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as exc:
            raise AsymVLMError(f"cannot read {file} as parquet: {exc}") from None
        opened.append((file, pf, _parquet_columns(pf.schema_arrow, file)))
    counts = [pf.metadata.num_rows for _, pf, _ in opened]
    total = sum(counts)
    if total == 0:
        raise AsymVLMError(f"{files[0] if len(files) == 1 else files[0].parent} holds no rows")
    chosen = _choose(total, limit, rng)
    # Read only the row groups that hold chosen rows: a DocVQA split is gigabytes of images.
    samples, start = [], 0
    for (file, pf, columns), count in zip(opened, counts):
        wanted = chosen[(chosen >= start) & (chosen < start + count)] - start
        start += count
        group_start = 0
        for group in range(pf.num_row_groups):
            group_rows = pf.metadata.row_group(group).num_rows
            rows = wanted[(wanted >= group_start) & (wanted < group_start + group_rows)]
            if rows.size:
                table = pf.read_row_group(group, columns=list(columns)).take(pa.array(rows - group_start))
                image_col, question_col, answer_col = (table.column(c).to_pylist() for c in columns)
                for row, image, question, answer in zip(rows, image_col, question_col, answer_col):
                    where = f"{file}#{row}"
                    if answer is None:
                        raise AsymVLMError(f"{where}: no answer (a test split without labels cannot train a scorer)")
                    samples.append(Sample(_image_bytes(image, where), _question(question, where),
                                          _answers(answer, where), where))
            group_start += group_rows
    return samples


def _choose(total: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``limit`` of ``total`` rows drawn without replacement (all if fewer)."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, size=limit, replace=False))


def load_samples(path: str | os.PathLike, limit: int | None = None, seed: int = 0) -> list[Sample]:
    """Read samples from a JSONL file, a parquet file or a folder of parquet files.

    Parameters
    ----------
    path : a ``.jsonl``/``.json`` file, a ``.parquet`` file, a folder searched recursively for
        ``*.parquet`` (one split of one subset), or a glob pattern of parquet files
        (``data/validation-*.parquet``).
    limit : int, optional
        Use at most this many samples, drawn uniformly without replacement with ``seed``
        (kept in file order); all of them when the data has fewer.
    seed : int
        Seed of that draw.

    Returns
    -------
    list of Sample

    Raises
    ------
    AsymVLMError
        Missing path, unknown file type, a JSONL line that is not a JSON object or lacks a
        key, a missing image file, an empty question or answer, a parquet file without the
        expected columns (its columns are listed).
    """
    if limit is not None and limit < 1:
        raise AsymVLMError(f"limit must be at least 1, got {limit}")
    rng = np.random.default_rng(seed)
    if glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files or any(f.suffix != ".parquet" for f in files):
            found = f"matches {len(files)} files, not all .parquet" if files else "matches no file"
            raise AsymVLMError(f"data pattern {path} {found}; a pattern must select parquet files")
        return _read_parquet(files, limit, rng)
    path = Path(path)
    if not path.exists():
        raise AsymVLMError(f"data not found: {path}")
    if path.is_dir() or path.suffix == ".parquet":
        return _read_parquet(_parquet_files(path), limit, rng)
    if path.suffix in (".jsonl", ".json"):
        samples = _read_jsonl(path)
        return [samples[i] for i in _choose(len(samples), limit, rng)]
    raise AsymVLMError(f"{path}: expected a .jsonl file, a .parquet file or a folder of parquet files")


def samples_fingerprint(samples: list[Sample]) -> str:
    """SHA-256 over the samples' images, questions and answers (checks a resumed run's data)."""
    digest = hashlib.sha256()
    for s in samples:
        image = s.image if isinstance(s.image, bytes) else str(s.image).encode()
        for part in (image, s.question.encode(), "\x1f".join(s.answers).encode()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()
