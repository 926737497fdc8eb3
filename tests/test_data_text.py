"""Plain-text loading: one client per file, paragraphs as records, temporal split."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.data.text import load_text, paragraphs
from fedtune.errors import DataError


def test_paragraphs_split_on_blank_lines() -> None:
    text = "First line\nsecond line\n\n  \t\nSecond para\r\n\r\nThird\n\n\n"
    assert paragraphs(text) == ["First line\nsecond line", "Second para", "Third"]
    assert paragraphs("\n \n") == []


def test_folder_gives_one_client_per_file(tmp_path: Path) -> None:
    (tmp_path / "bob.txt").write_text("\n\n".join(f"bob {i}" for i in range(10)))
    (tmp_path / "alice.txt").write_text("a0\n\na1")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "notes.md").write_text("not a client")
    data = load_text(tmp_path, 0.2)
    assert list(data.clients) == ["alice", "bob"]
    assert data.clients["bob"].train == [f"bob {i}" for i in range(8)]
    assert data.clients["bob"].test == ["bob 8", "bob 9"]
    assert data.clients["alice"].train == ["a0"] and data.clients["alice"].test == ["a1"]


def test_single_file_is_one_pool(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"p{i}" for i in range(5)))
    data = load_text(path, 0.4)
    assert list(data.clients) == ["corpus"]
    assert data.clients["corpus"].train == ["p0", "p1", "p2"]
    assert data.clients["corpus"].test == ["p3", "p4"]


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        load_text(tmp_path / "missing", 0.2)
    with pytest.raises(DataError, match=r"holds no data files"):
        load_text(tmp_path, 0.2)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt"):
        load_text(tmp_path, 0.2)
    (tmp_path / "latin.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no non-empty paragraphs"):
        load_text(tmp_path, 0.2)
