"""Plain-text corpora: a folder of .txt files (one client per file) or one .txt file (a single pool).

Records are paragraphs (runs of lines separated by blank lines). Each client's paragraphs are split
temporally: the first ones train, the last ones are held out.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtune.data.partition import temporal_split
from fedtune.data.types import ClientSplit, FederatedData
from fedtune.errors import DataError

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs, each stripped of surrounding whitespace, line breaks inside kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _BLANK_LINE.split(text) if p.strip()]


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"data.path {folder}: the folder holds no .txt files")
    return files


def load_text(path: str | Path, test_fraction: float) -> FederatedData[str]:
    """One client per .txt file of a folder (id = file stem, sorted), or one client for a single file.

    Files without any paragraph are skipped; a DataError is raised when nothing is left.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {path} does not exist")
    files = _text_files(path) if path.is_dir() else [path]
    clients: dict[str, ClientSplit[str]] = {}
    for file in files:
        records = paragraphs(read_text_file(file))
        if records:
            clients[file.stem] = ClientSplit(*temporal_split(records, test_fraction))
    if not clients:
        raise DataError(f"data.path {path}: no non-empty paragraphs found")
    return FederatedData(clients={cid: clients[cid] for cid in sorted(clients)})
