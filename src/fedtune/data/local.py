"""Your own files for ``data.source`` text, instruct and classification, read into records per file.

``data.path`` is one file (one pool, partitioned by ``data.partition``) or a folder of files (one client per
file: the natural partition). ``data.test_path`` has the same layout and gives the held-out records. Class
labels are numbered over all files together, so every client and the exported model agree on the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config.schema import DataConfig
from fedtune.data.columns import column, has_header, strings
from fedtune.data.files import builder_of, data_files, read_table
from fedtune.data.types import LabelledText
from fedtune.errors import DataError


@dataclass(frozen=True)
class LocalData:
    """Records per file stem (``train``), the held-out records in the same layout (``test``), whether the
    path was a folder of clients, and the class names (classification)."""

    train: dict[str, list[Any]]
    test: dict[str, list[Any]] | None
    folder: bool
    label_names: list[str]


def load_local(cfg: DataConfig, cache_dir: Path | None = None) -> LocalData:
    if not cfg.path:
        raise DataError(f"data.path is required for data.source {cfg.source!r}")
    files, folder = data_files(cfg.path)
    test_files = _test_files(cfg, files, folder)
    train = {cid: (path, _read(path, cfg, cache_dir)) for cid, path in files.items()}
    test = {cid: (path, _read(path, cfg, cache_dir)) for cid, path in test_files.items()} if test_files else None
    return tables_to_records(train, test, cfg, folder=folder)


def tables_to_records(
    train: dict[str, tuple[Path, Any]], test: dict[str, tuple[Path, Any]] | None, cfg: DataConfig, *, folder: bool
) -> LocalData:
    """Records of ``datasets.Dataset`` tables (or ``.txt`` paths, for text) per client, as ``cfg`` says
    (columns, format, label names); each table comes with the name its errors give (its file)."""
    if cfg.source == "classification":
        train_records, test_records, names = _labelled(train, test or {}, cfg)
        return LocalData(train_records, test_records if test is not None else None, folder, names)
    convert = _instructions if cfg.source == "instruct" else _texts
    formats: dict[str, str] = {}
    return LocalData(
        {cid: convert(t, path, cfg, formats) for cid, (path, t) in train.items()},
        {cid: convert(t, path, cfg, formats) for cid, (path, t) in test.items()} if test is not None else None,
        folder,
        [],
    )


def _test_files(cfg: DataConfig, files: dict[str, Path], folder: bool) -> dict[str, Path] | None:
    if cfg.test_path is None:
        return None
    test_files, test_folder = data_files(cfg.test_path, "data.test_path")
    if test_folder != folder:
        raise DataError(
            "data.test_path must have data.path's layout: both folders (one file per client) or both one file"
        )
    if folder and set(test_files) != set(files):
        missing, extra = sorted(set(files) - set(test_files)), sorted(set(test_files) - set(files))
        raise DataError(
            f"data.test_path {cfg.test_path} must hold one file per client of data.path: "
            f"missing {missing}, not in data.path {extra}"
        )
    if not folder:
        return {next(iter(files)): next(iter(test_files.values()))}
    return test_files


def _read(path: Path, cfg: DataConfig, cache_dir: Path | None) -> Any:
    if builder_of(path) == "text":
        if cfg.source != "text":
            raise DataError(f"{path}: .txt files are plain text: use data.source 'text', or a table format")
        return path  # paragraphs, read by _texts
    table = read_table(path, encoding=cfg.encoding, header=has_header(cfg), cache_dir=cache_dir)
    if len(table) == 0:
        raise DataError(f"{path}: no examples")
    return table


def _texts(table: Any, path: Path, cfg: DataConfig, formats: dict[str, str]) -> list[str]:
    if isinstance(table, Path):
        from fedtune.data.text import paragraphs, read_text_file

        return paragraphs(read_text_file(table, cfg.encoding))
    return [t for t in strings(table[column(table, "text", cfg, path)], "text", path, required=False) if t.strip()]


def _instructions(table: Any, path: Path, cfg: DataConfig, formats: dict[str, str]) -> list[Any]:
    from fedtune.data.formats import detect_format, instruction_records

    fmt = detect_format(table, cfg, path)
    formats[str(path)] = fmt
    if len(set(formats.values())) > 1:
        raise DataError(f"mixed instruction formats {formats}: use one format for every file (or set data.format)")
    return instruction_records(table, fmt, cfg, path)


# --------------------------------------------------------------------------------------------- labels


def _labelled(
    tables: dict[str, tuple[Path, Any]], test_tables: dict[str, tuple[Path, Any]], cfg: DataConfig
) -> tuple[dict[str, list[LabelledText]], dict[str, list[LabelledText]], list[str]]:
    """Records of every train and test table, with labels numbered over all of them together."""
    texts: dict[tuple[str, str], list[str]] = {}
    raw: dict[tuple[str, str], list[Any]] = {}
    declared: list[str] | None = None
    for side, group in (("train", tables), ("test", test_tables)):
        for cid, (path, table) in group.items():
            text_col = column(table, "text", cfg, path, default=cfg.text_field)
            label_col = column(table, "label", cfg, path, default=cfg.label_field)
            texts[side, cid] = strings(table[text_col], text_col, path)
            raw[side, cid] = _raw_labels(table[label_col], label_col, path)
            names = _class_label_names(table, label_col)
            if names is not None and declared is not None and names != declared:
                raise DataError(f"{path}: its ClassLabel names {names} differ from another file's {declared}")
            declared = names if names is not None else declared
    configured = configured_label_names(cfg)
    all_raw = [v for values in raw.values() for v in values]
    ids, names = label_ids(all_raw, configured or declared, "data.path")
    out: dict[str, dict[str, list[LabelledText]]] = {"train": {}, "test": {}}
    start = 0
    for (side, cid), values in raw.items():
        out[side][cid] = [
            LabelledText(t, y) for t, y in zip(texts[side, cid], ids[start : start + len(values)], strict=True)
        ]
        start += len(values)
    return out["train"], out["test"], names


def _raw_labels(values: list[Any], name: str, path: Path) -> list[Any]:
    for row, value in enumerate(values, start=1):
        if value is None or value == "":
            raise DataError(f"{path}: row {row}: missing or empty field {name!r}")
    return values


def _class_label_names(table: Any, label_col: str) -> list[str] | None:
    import datasets

    feature = table.features.get(label_col)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def configured_label_names(cfg: DataConfig) -> list[str] | None:
    """``data.label_names``: the list, or the names in its file (one per line, blank lines skipped)."""
    if cfg.label_names is None or isinstance(cfg.label_names, list):
        return cfg.label_names
    path = Path(cfg.label_names).expanduser()
    try:
        names = [line.strip() for line in path.read_text(encoding=cfg.encoding).splitlines() if line.strip()]
    except OSError as err:
        raise DataError(f"data.label_names {path}: cannot read ({err.strerror})") from None
    if not names:
        raise DataError(f"data.label_names {path}: no names in the file (one per line)")
    return names


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False  # JSON true/false are names, not class ids
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def label_ids(raw: Sequence[Any], names: list[str] | None, source: str) -> tuple[list[int], list[str]]:
    """Class ids and names. With ``names``: a label equal to a name is its position, an integer label is
    the id itself. Without: integer labels are kept (named "0".."max"), others numbered in sorted order."""
    if names is None:
        if all(_is_int_label(v) for v in raw):
            ids = [int(v) for v in raw]
            if min(ids) < 0:
                raise DataError(f"{source}: integer labels must be >= 0, found {min(ids)}")
            return ids, [str(i) for i in range(max(ids) + 1)]
        sorted_names = sorted({str(v) for v in raw})
        index = {name: i for i, name in enumerate(sorted_names)}
        return [index[str(v)] for v in raw], sorted_names
    if len(set(names)) != len(names):
        raise DataError(f"data.label_names has duplicates: {names}")
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for value in raw:
        if isinstance(value, str) and value in index:
            ids.append(index[value])
        elif _is_int_label(value) and 0 <= int(value) < len(names):
            ids.append(int(value))
        else:
            raise DataError(
                f"{source}: label {value!r} is neither one of data.label_names {names} nor a class id "
                f"below {len(names)}"
            )
    return ids, list(names)
