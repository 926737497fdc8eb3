"""Instruction formats: Alpaca, TRL conversational (``messages``) and TRL prompt-completion, told apart by
their columns (or named by ``data.format``), each table row becoming one record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.config.schema import DataConfig
from fedtune.data.columns import column, find_column, strings
from fedtune.data.types import Completion, Conversation, Instruction
from fedtune.errors import DataError

# the fields that identify a format (Alpaca's "input" is optional)
FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
ROLES = frozenset({"system", "user", "assistant", "tool"})
Record = Instruction | Completion | Conversation


def detect_format(ds: Any, cfg: DataConfig, path: Path) -> str:
    """``data.format``, or the one format whose fields are all columns of ``ds``."""
    if cfg.format != "auto":
        return cfg.format
    found = [
        fmt for fmt, fields in FORMAT_FIELDS.items() if all(find_column(ds, f, cfg, path) is not None for f in fields)
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"{path}: cannot tell the instruction format from the columns {list(ds.column_names)}: expected "
            "alpaca (instruction, output, optional input), messages (a list of role/content turns) or "
            "prompt_completion (prompt, completion); map yours with data.columns or set data.format"
        )
    raise DataError(f"{path}: the columns fit several formats {found}: set data.format to one of them")


def instruction_records(ds: Any, fmt: str, cfg: DataConfig, path: Path) -> list[Record]:
    if fmt == "alpaca":
        return _alpaca(ds, cfg, path)
    if fmt == "messages":
        col = column(ds, "messages", cfg, path)
        return [Conversation(_turns(v, f"{path}: row {i}: {col}")) for i, v in enumerate(ds[col], start=1)]
    if fmt == "prompt_completion":
        return _prompt_completion(ds, cfg, path)
    raise DataError(f"unknown data.format {fmt!r} (known: {sorted(FORMAT_FIELDS)})")


def _alpaca(ds: Any, cfg: DataConfig, path: Path) -> list[Record]:
    instruction = strings(ds[column(ds, "instruction", cfg, path)], "instruction", path)
    output = strings(ds[column(ds, "output", cfg, path)], "output", path)
    input_col = find_column(ds, "input", cfg, path)
    inputs = strings(ds[input_col], "input", path, required=False) if input_col else [""] * len(output)
    return [Instruction(i, x, o) for i, x, o in zip(instruction, inputs, output, strict=True)]


def _prompt_completion(ds: Any, cfg: DataConfig, path: Path) -> list[Record]:
    prompts, completions = ds[column(ds, "prompt", cfg, path)], ds[column(ds, "completion", cfg, path)]
    records: list[Record] = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True), start=1):
        where = f"{path}: row {row}"
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise DataError(f"{where}: empty completion")
            records.append(Completion(prompt, completion))
        elif isinstance(prompt, list) and isinstance(completion, list):
            turns = _turns(prompt, f"{where}: prompt", need_assistant=False)
            answer = _turns(completion, f"{where}: completion")
            records.append(Conversation(turns + answer, train_from=len(turns)))
        else:
            raise DataError(
                f"{where}: prompt and completion must both be strings or both be lists of role/content turns, "
                f"got {type(prompt).__name__} and {type(completion).__name__}"
            )
    return records


def _turns(value: Any, where: str, *, need_assistant: bool = True) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} turns, got {value!r:.80}")
    turns = []
    for n, turn in enumerate(value):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}: turn {n} must have a role in {sorted(ROLES)} and a string content, got {turn!r:.80}"
            )
        turns.append((role, content))
    if need_assistant and not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant turn, so nothing to learn")
    return tuple(turns)
