"""``data.columns``: the task's fields looked up in a table by your column names or indices, with errors
that list the columns the file has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.config.schema import DataConfig
from fedtune.errors import DataError


def has_header(cfg: DataConfig) -> bool:
    """Column indices (not names) in ``data.columns`` mean a CSV without a header row."""
    return not any(isinstance(v, int) for v in cfg.columns.values())


def column(ds: Any, field: str, cfg: DataConfig, path: Path, *, default: str | None = None) -> str:
    """The name of the column holding ``field``; DataError naming the available columns if there is none."""
    found = find_column(ds, field, cfg, path, default=default)
    if found is None:
        spec = cfg.columns.get(field, default or field)
        raise DataError(
            f"{path}: no column {spec!r} for the field {field!r}; the file has columns {list(ds.column_names)}: "
            f"name yours with data.columns.{field}"
        )
    return found


def find_column(ds: Any, field: str, cfg: DataConfig, path: Path, *, default: str | None = None) -> str | None:
    """Like ``column`` but None when an unmapped field's default column is absent (optional fields)."""
    names = list(ds.column_names)
    spec = cfg.columns.get(field, default or field)
    if isinstance(spec, int):
        if spec >= len(names):
            raise DataError(f"{path}: data.columns.{field} is column {spec}, but the file has {len(names)} columns")
        return names[spec]
    if spec in names:
        return spec
    if field in cfg.columns:  # the user named it: a typo must not pass as "absent"
        raise DataError(f"{path}: no column {spec!r} (data.columns.{field}); the file has columns {names}")
    return None


def strings(values: list[Any], name: str, path: Path, *, required: bool = True) -> list[str]:
    """A column's values as strings: missing/empty ones are errors when ``required``, else ""."""
    out = []
    for row, value in enumerate(values, start=1):
        if value is None or value == "":
            if required:
                raise DataError(f"{path}: row {row}: missing or empty field {name!r}")
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{path}: row {row}: field {name!r} must be a string, got {type(value).__name__}")
        out.append(value)
    return out
