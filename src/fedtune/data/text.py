"""Plain-text corpora: a folder of files (one client per file) or one file (a single pool).

Records of a .txt file are paragraphs (runs of lines separated by blank lines); a table file (JSON, CSV,
parquet, ...) gives one record per row of its text column. Each client's records are split temporally:
the first ones train, the last ones are held out.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtune.config.schema import DataConfig
from fedtune.data.types import FederatedData
from fedtune.errors import DataError

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs, each stripped of surrounding whitespace, line breaks inside kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _BLANK_LINE.split(text) if p.strip()]


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not {encoding} text ({err.reason} at byte {err.start}): set data.encoding") from None
    except LookupError:
        raise DataError(f"data.encoding {encoding!r} is not a known encoding") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def load_text(path: str | Path, test_fraction: float) -> FederatedData[str]:
    """One client per file of a folder (id = file stem, sorted), or one client for a single file; each
    client's paragraphs split temporally. Files without any paragraph are skipped with a DataWarning; a
    DataError is raised when nothing is left."""
    from fedtune.data.cache import default_cache_dir
    from fedtune.data.sources import load_federated

    cfg = DataConfig(source="text", path=str(path), test_fraction=test_fraction)
    return load_federated(cfg, seed=0, cache_dir=default_cache_dir(None))
