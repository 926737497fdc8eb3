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


def load_text(path: str | Path, test_fraction: float, cfg: DataConfig | None = None) -> FederatedData[str]:
    """One client per file of a folder (id = file stem, sorted), or one client for a single file; each
    client's records split temporally (``cfg``: how to read the files, e.g. data.columns, data.encoding).
    Files without any record are skipped with a DataWarning; a DataError is raised when nothing is left."""
    from fedtune.data.cache import default_cache_dir
    from fedtune.data.sources import load_federated

    base = cfg or DataConfig(source="text", path=str(path))
    # natural: the file (or each file of a folder) is one client; columns and encoding come from cfg
    cfg = base.model_copy(update={"path": str(path), "test_path": None, "test_fraction": test_fraction})
    cfg = cfg.model_copy(update={"partition": cfg.partition.model_copy(update={"kind": "natural"})})
    return load_federated(cfg, seed=0, cache_dir=default_cache_dir(cfg.cache_dir))
