"""Your data files through Hugging Face ``datasets``: which files a ``data.path`` names, and reading one.

A path is one file, a ``save_to_disk`` folder, or a folder of such files and folders (one client each, named
by the file stem). Tables are read with ``datasets.load_dataset`` (json, csv, parquet, arrow) or
``datasets.load_from_disk``; the Arrow cache goes under fedtune's cache directory.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtune.errors import DataError, DataWarning

# file suffix -> datasets builder ("text" files are read by fedtune: paragraphs, not lines)
BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
SAVED = "save_to_disk"  # the "builder" of a folder written by Dataset(Dict).save_to_disk


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def builder_of(path: Path) -> str | None:
    if is_saved_dataset(path):
        return SAVED
    return BUILDERS.get(path.suffix.lower()) if path.is_file() else None


def data_files(path: str | Path, key: str = "data.path") -> tuple[dict[str, Path], bool]:
    """({client id: file}, whether ``path`` is a folder of clients). One file or saved dataset is one entry
    named by its stem. A folder's files must share one format; files of unknown type are errors, hidden
    files are skipped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{key} {path} does not exist")
    if path.is_file() or is_saved_dataset(path):
        if builder_of(path) is None:
            raise DataError(f"{key} {path}: unknown file type {path.suffix!r} (known: {sorted(BUILDERS)})")
        return {path.stem: path}, False
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    unknown = [p.name for p in entries if builder_of(p) is None]
    entries = [p for p in entries if builder_of(p) is not None]
    if not entries:
        raise DataError(
            f"{key} {path}: the folder holds no data files (one per client: {', '.join(sorted(BUILDERS))} "
            f"files or save_to_disk folders){f'; not data: {unknown[:5]}' if unknown else ''}"
        )
    if unknown:
        warnings.warn(
            f"{key} {path}: skipped {len(unknown)} entries that are not data files: {unknown[:5]}",
            DataWarning,
            stacklevel=2,
        )
    formats = {p.name: builder_of(p) for p in entries}
    if len(set(formats.values())) > 1:
        raise DataError(f"{key} {path}: mixed formats {formats}: use one file format for every client")
    files: dict[str, Path] = {}
    for p in entries:
        cid = p.stem if p.is_file() else p.name
        if cid in files:
            raise DataError(f"{key} {path}: two files for client {cid!r}: {files[cid].name} and {p.name}")
        files[cid] = p
    return files, True


@contextmanager
def _quiet_datasets() -> Any:
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def read_table(path: Path, *, encoding: str, header: bool, cache_dir: Path | None) -> Any:
    """One file (or saved dataset) as a ``datasets.Dataset``. ``header=False``: a CSV's first row is data and
    its columns are named "0", "1", ... A saved DatasetDict gives its ``train`` split (or its only split)."""
    builder = builder_of(path)
    if builder != SAVED and path.stat().st_size == 0:
        raise DataError(f"{path}: no examples (the file is empty)")
    with _quiet_datasets() as datasets:
        try:
            if builder == SAVED:
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = _one_split(ds, path)
                return ds
            kwargs: dict[str, Any] = {}
            if builder in ("json", "csv"):
                kwargs["encoding"] = encoding
            if builder == "csv":
                kwargs["sep"] = "\t" if path.suffix.lower() == ".tsv" else ","
                if not header:
                    kwargs["header"] = None
                kwargs["keep_default_na"] = False  # an empty cell is "", not NaN (checked as empty later)
            return datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                cache_dir=str(cache_dir / "datasets") if cache_dir is not None else None,
                **kwargs,
            )
        except DataError:
            raise
        except (LookupError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot decode with data.encoding {encoding!r} ({err})") from None
        except Exception as err:  # datasets/pyarrow/pandas raise many types for a malformed file
            if "corresponds to no data" in str(err) or "No columns to parse" in str(err):
                raise DataError(f"{path}: no examples") from None
            raise DataError(f"{path}: cannot read as {builder} ({_first_line(err)})") from None


def _one_split(ds: Mapping[str, Any], path: Path) -> Any:
    if "train" in ds:
        return ds["train"]
    if len(ds) == 1:
        return next(iter(ds.values()))
    raise DataError(f"{path}: a saved DatasetDict with splits {list(ds)} and no 'train' split: save one split")


def _first_line(err: BaseException) -> str:
    cause = err
    while cause.__cause__ is not None:  # datasets wraps the parser's error; the innermost one says what broke
        cause = cause.__cause__
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0][:300]
