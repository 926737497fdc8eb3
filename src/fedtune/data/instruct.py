"""Alpaca-style instruction data: a JSON list or JSONL of {instruction, input?, output} objects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedtune.data.types import Instruction
from fedtune.errors import DataError

_JSONL_SUFFIXES = {".jsonl", ".ndjson"}


def _string_field(item: dict[str, Any], key: str, where: str, *, required: bool) -> str:
    if key not in item or item[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    value = item[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def to_instruction(item: Any, where: str) -> Instruction:
    """One JSON object as an Instruction; ``where`` names the file and line/index in errors."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'output', got {type(item).__name__}")
    return Instruction(
        instruction=_string_field(item, "instruction", where, required=True),
        input=_string_field(item, "input", where, required=False),
        output=_string_field(item, "output", where, required=True),
    )


def _jsonl_items(path: Path, text: str) -> Iterator[tuple[Any, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg})") from None


def _json_items(path: Path, text: str) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples (Alpaca format), got {type(data).__name__}")
    for index, item in enumerate(data):
        yield item, f"{path}: item {index}"


def load_instructions(path: str | Path) -> list[Instruction]:
    """Examples in file order. ``.jsonl``/``.ndjson`` are read line by line, anything else as one JSON list."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"data.path {path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"data.path {path}: not UTF-8 text") from None
    items = _jsonl_items(path, text) if path.suffix.lower() in _JSONL_SUFFIXES else _json_items(path, text)
    examples = [to_instruction(item, where) for item, where in items]
    if not examples:
        raise DataError(f"data.path {path}: no examples")
    return examples
