"""Instruction data from your files: Alpaca, TRL ``messages`` or prompt-completion (see ``formats``)."""

from __future__ import annotations

from pathlib import Path

from fedtune.config.schema import DataConfig
from fedtune.data.cache import default_cache_dir
from fedtune.data.formats import Record
from fedtune.data.local import load_local


def load_instructions(path: str | Path, cfg: DataConfig | None = None) -> list[Record]:
    """Every record of ``path`` (a file, or a folder's files in name order), read as ``cfg`` says
    (format, columns, encoding); the records' order is the file's."""
    cfg = (cfg or DataConfig(source="instruct", path=str(path))).model_copy(update={"path": str(path)})
    data = load_local(cfg.model_copy(update={"test_path": None}), default_cache_dir(cfg.cache_dir))
    return [r for records in data.train.values() for r in records]
