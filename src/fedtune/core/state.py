"""Server state is a value, and a checkpoint is that value written atomically.

Everything a resumed run needs lives here: the global trainable vector, the completed round, the
server optimiser's state (moments, control variates, ...) and JSON-able extras (privacy ledger, ...).
Random streams are derived from (seed, round), so the round number is the RNG position.

A checkpoint carries the SHA-256 of its tensors (names, dtypes, shapes and bytes) in its metadata, checked
on load: flipped bytes are refused instead of resumed. Each save first keeps the file it replaces as
``<name>.prev.safetensors`` (a hard link, so the latest name always exists), and the folder is fsynced after
the rename, so a power cut cannot lose the rename itself. ``load_latest`` falls back to the previous file,
with a warning, when the latest is corrupt or missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtune.core.params import ParamSpec
from fedtune.errors import CheckpointError

FORMAT_VERSION = 1
log = logging.getLogger("fedtune")


class CorruptCheckpoint(CheckpointError):
    """The file is unreadable, truncated, or its tensors do not match their recorded checksum."""


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def previous_path(path: Path) -> Path:
    """Where ``save_state`` keeps the checkpoint it replaces: ``checkpoint.prev.safetensors``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors (Windows): the rename is all we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_previous(path: Path) -> None:
    """Make ``previous_path(path)`` the current ``path`` (a hard link, else a copy), atomically."""
    if not path.exists():
        return
    prev = previous_path(path)
    tmp = prev.with_name(prev.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


@dataclass(frozen=True)
class ServerState:
    round: int  # number of completed rounds
    params: np.ndarray  # global trainable parameters, flat float32
    spec: ParamSpec
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # optimiser moments, control variates, ...
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able: ledgers, counters

    def evolve(self, **changes: Any) -> ServerState:
        return replace(self, **changes)


def save_state(state: ServerState, path: Path, *, config_digest: str) -> None:
    """Write the state to ``path`` atomically (temp file, fsync, rename): a crash leaves the old file."""
    state_writer(state, path, config_digest=config_digest)()


def state_writer(state: ServerState, path: Path, *, config_digest: str) -> Callable[[], None]:
    """``save_state`` in two parts: what reads the state's mutable part (its JSON ``extra``) is done now; the
    returned function does the rest (checksum, file, fsyncs, rename) and may run in another thread, since the
    state's arrays are values, never modified once in a state."""
    path = Path(path)
    tensors = {"params": np.ascontiguousarray(state.params)}
    tensors.update({f"arrays/{k}": np.ascontiguousarray(v) for k, v in state.arrays.items()})
    meta = {
        "format": FORMAT_VERSION,
        "round": state.round,
        "spec": state.spec.to_json(),
        "extra": json.loads(json.dumps(state.extra)),  # a copy, and a non-JSON value fails here, not later
        "config_digest": config_digest,
    }

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta["sha256"] = tensors_sha256(tensors)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"fedtune": json.dumps(meta)})
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            _keep_previous(path)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    return write


def load_state(path: Path, *, config_digest: str | None = None) -> ServerState:
    """Read a checkpoint, checking its format and (optionally) that it belongs to the same config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {})["fedtune"])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a fedtune checkpoint: {err}") from None
    recorded = meta.get("sha256")
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its tensors do not match their SHA-256 checksum")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT_VERSION}")
    if config_digest is not None and meta.get("config_digest") != config_digest:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with a different configuration; "
            "resume with the run's own config.yaml"
        )
    spec = ParamSpec.from_json(meta["spec"])
    params = tensors.pop("params")
    if params.size != spec.numel:
        raise CheckpointError(f"checkpoint {path}: params has {params.size} values, spec says {spec.numel}")
    arrays = {k.removeprefix("arrays/"): v for k, v in tensors.items()}
    return ServerState(round=int(meta["round"]), params=params, spec=spec, arrays=arrays, extra=meta["extra"])


def load_latest(path: Path, *, config_digest: str | None = None) -> tuple[ServerState, str | None]:
    """(``load_state(path)``, None), or, when that file is corrupt or missing, the previous checkpoint with a warning
    as the second item (the run then repeats the round after it). A configuration mismatch is never papered over."""
    path = Path(path)
    try:
        return load_state(path, config_digest=config_digest), None
    except CheckpointError as err:
        prev = previous_path(path)
        corrupt = isinstance(err, CorruptCheckpoint) or not path.exists()
        if not corrupt or not prev.is_file():
            raise
        state = load_state(prev, config_digest=config_digest)
        warning = f"{err}; resuming from the previous checkpoint {prev.name} (round {state.round})"
        log.warning(warning)
        return state, warning
