"""``fedtune init DATA``: a starting config for a data file or folder, guessing what kind of data it holds.

* a folder of ``.txt`` files: plain text, one client per file (``data.source: text``, natural partition);
* one ``.txt`` file: plain text in one pool, split into 4 IID clients;
* JSON / JSONL whose objects have ``instruction`` and ``output``: Alpaca-style instruction tuning;
* CSV / TSV / JSONL with a text column and a label column: classification (label-skewed Dirichlet clients).

The written YAML is the minimal set of keys with a comment per section; ``fedtune validate`` checks it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedtune.errors import DataError

TEXT_COLUMNS = ("text", "sentence", "content", "document", "review", "body", "question", "input")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "sentiment", "intent", "topic")
TABLE_SUFFIXES = {".csv", ".tsv"}
JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}
CAUSAL_MODEL, ENCODER_MODEL = "smollm2-135m-instruct", "all-minilm-l6-v2"


@dataclass(frozen=True)
class Guess:
    source: str  # text | instruct | classification
    path: Path
    why: str  # shown to the user: what the guess rests on
    data: dict[str, Any] = field(default_factory=dict)  # extra data.* keys (columns, partition)
    num_clients: int = 4


def _columns_and_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The column names and up to 50 rows of a table or JSON/JSONL file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [row for _, row in zip(range(50), reader, strict=False)]
        return list(reader.fieldnames or []), rows
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON ({err.msg})") from None
        rows = [r for r in items[:50] if isinstance(r, dict)] if isinstance(items, list) else []
    else:
        rows = []
        for line in text.splitlines():
            if line.strip() and len(rows) < 50:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {len(rows) + 1} is not JSON ({err.msg})") from None
                if isinstance(item, dict):
                    rows.append(item)
    if not rows:
        raise DataError(f"{path}: no JSON objects found (expected a list of objects, or one object per line)")
    return list(dict.fromkeys(k for r in rows for k in r)), rows


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _guess_table(path: Path) -> Guess:
    columns, rows = _columns_and_rows(path)
    if {"instruction", "output"} <= set(columns):
        return Guess("instruct", path, "objects with 'instruction' and 'output' fields (Alpaca style)")
    text_col, label_col = _pick(columns, TEXT_COLUMNS), _pick(columns, LABEL_COLUMNS)
    if text_col is None or label_col is None:
        # two columns: the one with the longer values is the text, the other the label
        if len(columns) == 2 and rows:
            lengths = {c: sum(len(str(r.get(c, ""))) for r in rows) for c in columns}
            text_col = max(columns, key=lengths.__getitem__)
            label_col = next(c for c in columns if c != text_col)
        else:
            raise DataError(
                f"{path}: cannot tell the kind of data from the columns {columns}: expected 'instruction' and "
                f"'output' (instruction tuning) or a text column ({', '.join(TEXT_COLUMNS)}) and a label column "
                f"({', '.join(LABEL_COLUMNS)}) for classification"
            )
    labels = {str(r.get(label_col)) for r in rows}
    data = {
        "text_field": text_col,
        "label_field": label_col,
        "partition": {"kind": "dirichlet_labels", "num_clients": 4, "alpha": 1.0},
    }
    return Guess(
        "classification",
        path,
        f"text column {text_col!r}, label column {label_col!r} "
        f"({len(labels)} distinct labels in the first {len(rows)} rows)",
        data,
    )


def guess_data(path: Path) -> Guess:
    path = Path(path).expanduser()
    if path.is_dir():
        texts = sorted(path.glob("*.txt"))
        if texts:
            why = f"a folder of {len(texts)} .txt files: one client per file"
            return Guess("text", path, why, {"partition": {"kind": "natural"}}, num_clients=len(texts))
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TABLE_SUFFIXES | JSON_SUFFIXES)
        if len(files) != 1:
            raise DataError(
                f"{path}: expected .txt files (one client each) or one data file (.csv, .tsv, .json, .jsonl); "
                f"found {len(files)} data files: give the file itself"
            )
        return _guess_table(files[0])
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return Guess(
            "text",
            path,
            "one .txt file: paragraphs pooled and split into 4 IID clients",
            {"partition": {"kind": "iid", "num_clients": 4}},
        )
    if suffix in TABLE_SUFFIXES | JSON_SUFFIXES:
        return _guess_table(path)
    raise DataError(f"{path}: unknown data file type {suffix!r} (expected .txt, .csv, .tsv, .json or .jsonl)")


def starting_config(guess: Guess, *, model: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The config for ``guess`` as a nested mapping (minimal keys; everything else keeps its default)."""
    classify = guess.source == "classification"
    model_name = model or (ENCODER_MODEL if classify else CAUSAL_MODEL)
    targets = ["query", "value"] if model_name == ENCODER_MODEL else ["q_proj", "v_proj"]
    cfg: dict[str, Any] = {
        "seed": 0,
        "model": {
            "kind": "classification" if classify else "causal_lm",
            "name": model_name,
            "max_length": 128,
            "lora": {"r": 8, "alpha": 16, "target_modules": targets},
        },
        "data": {"source": guess.source, "path": str(guess.path), **guess.data},
        "federation": {"rounds": 5, "clients_per_round": min(4, guess.num_clients)},
        "client": {"local_steps": 10, "batch_size": 8, "lr": 0.001},
        "eval": {"max_examples_per_client": 32},
        "run": {"name": name or guess.path.stem or "run"},
    }
    if guess.source == "instruct":
        cfg["data"]["partition"] = {"kind": "iid", "num_clients": 4}
    return cfg


HEADER = """\
# Written by `fedtune init` from {path}
# Guessed: {source} data ({why}).
# Check it with `fedtune validate {out}`, then start with `fedtune run {out}`.
# Every key, its default and what it does: src/fedtune/config/schema.py (one comment per field).
"""


def write_config(cfg: dict[str, Any], guess: Guess, out: Path) -> None:
    header = HEADER.format(path=guess.path, source=guess.source, why=guess.why, out=out)
    out.write_text(header + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
