"""Server state is a value, and a checkpoint is that value written atomically.

Everything a resumed run needs lives here: the global trainable vector, the completed round, the
server optimiser's state (moments, control variates, ...) and JSON-able extras (privacy ledger, ...).
Random streams are derived from (seed, round), so the round number is the RNG position.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtune.core.params import ParamSpec
from fedtune.errors import CheckpointError

FORMAT_VERSION = 1


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"params": np.ascontiguousarray(state.params)}
    tensors.update({f"arrays/{k}": np.ascontiguousarray(v) for k, v in state.arrays.items()})
    meta = {
        "format": FORMAT_VERSION,
        "round": state.round,
        "spec": state.spec.to_json(),
        "extra": state.extra,
        "config_digest": config_digest,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fedtune": json.dumps(meta)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fedtune checkpoint: {err}") from None
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
