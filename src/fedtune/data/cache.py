"""Where downloaded corpora, parsed data and converted models are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FEDTUNE_CACHE"


def default_cache_dir(cfg_cache_dir: str | None) -> Path:
    """``data.cache_dir`` if set, else ``$FEDTUNE_CACHE``, else ``~/.cache/fedtune`` (not created here)."""
    if cfg_cache_dir:
        return Path(cfg_cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "fedtune"
