"""Alpaca JSON / JSONL instruction loading and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.data.instruct import load_instructions
from fedtune.data.types import Instruction
from fedtune.errors import DataError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi!"},
    {"instruction": "Say bye.", "input": None, "output": "Bye."},
]
EXPECTED = [
    Instruction("Add the numbers.", "2 and 3", "5"),
    Instruction("Say hi.", "", "Hi!"),
    Instruction("Say bye.", "", "Bye."),
]


def test_alpaca_json_list(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    assert load_instructions(path) == EXPECTED


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in ALPACA[:2]) + "\n\n" + json.dumps(ALPACA[2]) + "\n")
    assert load_instructions(path) == EXPECTED


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', r"a\.jsonl: row 2: .*'output'"),
        (
            "b.json",
            json.dumps([{"instruction": "x", "output": "y"}, {"output": "y"}]),
            r"b\.json: row 2: .*'instruction'",
        ),
        ("d.jsonl", '{"instruction": "x", "output": "y"}\n{oops\n', r"d\.jsonl: cannot read as json .*JSON parse"),
        ("e.jsonl", '["instruction", "output"]\n', r"e\.jsonl: cannot tell the instruction format"),
        (
            "f.json",
            json.dumps([{"instruction": "x", "output": 3}]),
            r"f\.json: row 1: field 'output' must be a string",
        ),
        ("g.json", "[]", r"g\.json: no examples"),
    ],
)
def test_errors_name_file_and_position(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_instructions(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.json"):
        load_instructions(tmp_path / "nope.json")
