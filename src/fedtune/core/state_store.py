"""Per-client state that must outlive a round, kept off-worker: a small versioned key/value store.

Workers are shared by every simulated client and hold no client's state between requests. Whatever a
client must remember from one round to the next (SCAFFOLD's client control c_i, a personal adapter, a
DP-SGD accountant's ledger) is loaded from a store at the start of its fit and saved at the end.

The API (every backend; keys are (client id, namespace); one namespace per mechanism, so SCAFFOLD and DP-SGD
never overwrite each other)::

    store = open_state_store("disk:/path/run/client_state")    # or "ray:<name>", "memory:<name>"
    prev = store.load(client_id, "scaffold", round=instr.round)  # ClientState | None (None: never saved)
    c_i = prev.arrays["c"] if prev else np.zeros(numel, np.float32)
    ...
    store.save(client_id, "scaffold", ClientState({"c": new_c_i}, {"steps": 12}), round=instr.round)

* ``ClientState.arrays`` holds NumPy arrays (any dtype/shape; saved as safetensors, never pickled);
  ``ClientState.meta`` holds JSON-able values (accountant steps, a DP-SGD ledger's entries, ...).
* ``load(..., round=r)`` returns the newest state saved in a round *before* r, so a round that crashes and is
  replayed after a resume reads exactly what it read the first time, even if it had already saved: results
  after resume stay identical. ``save(..., round=r)`` records the state produced in round r; older versions
  than the one round r read are dropped, so at most two versions per key are kept.
* One writer per key at a time: the server samples a client at most once per round, and rounds run in order.
* ``open_state_store(address)`` opens the same store from any process (a Ray actor, a data-parallel rank),
  so pass the *address string* to workers, not the store object.

Backends:

* ``disk:<dir>``: files under the run directory; needs a filesystem every worker sees;
* ``ray:<name>``: values in Ray's object store, owned by a named detached actor, so they survive a worker's
  death; for clusters without a shared filesystem; ``close()`` it at the end of the run;
* ``memory:<name>``: this process only (tests, the in-process simulation).

Who chooses the address: the simulation takes ``simulation.client_state`` (default ``disk:<run dir>/client_state``,
see ``fedtune.config.simulation``); a deployed participant keeps its own state on its own disk
(``participant_address``), whatever the server's configuration says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtune.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class ClientState:
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. {"c": control variate}, flat or shaped
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able values, e.g. {"steps": 12}


class ClientStateStore(Protocol):
    def load(self, client_id: str, namespace: str, *, round: int) -> ClientState | None:
        """The newest state saved for (client, namespace) in a round before ``round``; None if none."""
        ...

    def save(self, client_id: str, namespace: str, state: ClientState, *, round: int) -> None:
        """Record the state produced in ``round`` (replacing one already saved for that round)."""
        ...


def _check_key(namespace: str, round: int) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", namespace):
        raise ValueError(f"state namespace must be letters, digits, '_', '.', '-': got {namespace!r}")
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")


class _Versions:
    """In-memory versions of each key: {(client, namespace): {round: state}} (the memory and Ray backends)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict[int, Any]] = {}

    def load(self, key: tuple[str, str], round: int) -> Any:
        older = [r for r in self.data.get(key, {}) if r < round]
        return self.data[key][max(older)] if older else None

    def save(self, key: tuple[str, str], value: Any, round: int) -> None:
        versions = self.data.setdefault(key, {})
        read = [r for r in versions if r < round]  # the version round `round` read must survive a replay
        keep_from = max(read) if read else round
        for r in [r for r in versions if r < keep_from]:
            del versions[r]
        versions[round] = value


class MemoryStateStore:
    """This process only. Copies on save and load, so callers can never alias stored arrays."""

    def __init__(self) -> None:
        self._versions = _Versions()
        self._lock = threading.Lock()

    def load(self, client_id: str, namespace: str, *, round: int) -> ClientState | None:
        _check_key(namespace, round)
        with self._lock:
            state = self._versions.load((client_id, namespace), round)
        return None if state is None else _copy(state)

    def save(self, client_id: str, namespace: str, state: ClientState, *, round: int) -> None:
        _check_key(namespace, round)
        with self._lock:
            self._versions.save((client_id, namespace), _copy(state), round)


def _copy(state: ClientState) -> ClientState:
    return ClientState({k: np.array(v, copy=True) for k, v in state.arrays.items()}, json.loads(json.dumps(state.meta)))


class DiskStateStore:
    """``<root>/<namespace>/<client>/r<round>.safetensors``, written atomically (temp file, rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _dir(self, client_id: str, namespace: str) -> Path:
        # client ids may hold any characters ("(hamlet, HAMLET)"): a readable slug plus a hash keeps them apart
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", client_id)[:48]
        digest = hashlib.blake2b(client_id.encode(), digest_size=6).hexdigest()
        return self.root / namespace / f"{slug}-{digest}"

    @staticmethod
    def _rounds(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(p.stem[1:]) for p in folder.glob("r*.safetensors") if p.stem[1:].isdigit())

    def load(self, client_id: str, namespace: str, *, round: int) -> ClientState | None:
        _check_key(namespace, round)
        folder = self._dir(client_id, namespace)
        older = [r for r in self._rounds(folder) if r < round]
        if not older:
            return None
        path = folder / f"r{max(older):08d}.safetensors"
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as fh:
                meta = json.loads((fh.metadata() or {})["fedtune_client_state"])
            arrays = load_file(str(path))
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"client state {path} is unreadable: {err}") from None
        if meta.get("client_id") != client_id:
            raise CheckpointError(f"client state {path} belongs to {meta.get('client_id')!r}, not {client_id!r}")
        return ClientState(arrays, meta["meta"])

    def save(self, client_id: str, namespace: str, state: ClientState, *, round: int) -> None:
        _check_key(namespace, round)
        folder = self._dir(client_id, namespace)
        folder.mkdir(parents=True, exist_ok=True)
        read = [r for r in self._rounds(folder) if r < round]
        meta = json.dumps({"client_id": client_id, "round": round, "meta": state.meta})
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            tensors = {k: np.ascontiguousarray(v) for k, v in state.arrays.items()}
            save_file(tensors, tmp, metadata={"fedtune_client_state": meta})
            os.replace(tmp, folder / f"r{round:08d}.safetensors")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for r in read[:-1]:  # keep the version this round read, in case the round is replayed
            (folder / f"r{r:08d}.safetensors").unlink(missing_ok=True)


class _RayStoreActor:
    """Holds, per key and round, a reference to a value in Ray's object store (and owns that value)."""

    def __init__(self) -> None:
        self.versions = _Versions()

    def load(self, client_id: str, namespace: str, round: int) -> list[Any]:
        ref = self.versions.load((client_id, namespace), round)
        return [] if ref is None else [ref]  # wrapped in a list so Ray passes the reference, not the value

    def save(self, client_id: str, namespace: str, refs: list[Any], round: int) -> None:
        self.versions.save((client_id, namespace), refs[0], round)


class RayStateStore:
    """Values in Ray's object store, owned by the named actor ``fedtune-state-<name>``, so they live as long
    as that actor (not as long as the worker that saved them)."""

    def __init__(self, name: str) -> None:
        import ray

        self._ray = ray
        actor_cls = ray.remote(num_cpus=0)(_RayStoreActor)
        # detached: the store must not die with whichever worker happened to open it first
        options = {"name": f"fedtune-state-{name}", "namespace": "fedtune", "lifetime": "detached"}
        self._actor = actor_cls.options(get_if_exists=True, **options).remote()
        ray.get(self._actor.__ray_ready__.remote())  # an owner must be alive before ray.put(_owner=...)

    def load(self, client_id: str, namespace: str, *, round: int) -> ClientState | None:
        _check_key(namespace, round)
        refs = self._ray.get(self._actor.load.remote(client_id, namespace, round))
        return _copy(self._ray.get(refs[0])) if refs else None

    def save(self, client_id: str, namespace: str, state: ClientState, *, round: int) -> None:
        _check_key(namespace, round)
        ref = self._ray.put(_copy(state), _owner=self._actor)
        self._ray.get(self._actor.save.remote(client_id, namespace, [ref], round))

    def close(self) -> None:
        """Drop every stored value (kill the owning actor)."""
        self._ray.kill(self._actor)


_MEMORY: dict[str, MemoryStateStore] = {}


def open_state_store(address: str) -> ClientStateStore:
    """``disk:<dir>``, ``ray:<name>`` or ``memory:<name>``; the same address opens the same store anywhere."""
    kind, sep, where = address.partition(":")
    if not sep or not where:
        raise ConfigError(
            f"client state address must look like 'disk:<dir>', 'ray:<name>' or 'memory:<name>': {address!r} "
            "('disk' or 'ray' alone is resolved against the run directory when a simulation starts)"
        )
    if kind == "disk":
        return DiskStateStore(where)
    if kind == "ray":
        return RayStateStore(where)
    if kind == "memory":
        return _MEMORY.setdefault(where, MemoryStateStore())
    raise ConfigError(f"unknown client state backend {kind!r} in {address!r} (disk, ray or memory)")


def participant_address(cache_dir: str | Path, federation: str) -> str:
    """A deployed participant's own store, on its own disk: ``disk:<cache_dir>/client_state/<federation>``.

    The participant's state (its DP-SGD privacy ledger) belongs to the participant, so the address never comes
    from the server. ``federation`` names what the server runs (its config digest): a resumed or extended
    federation continues the participant's ledgers, a different one starts its own.

    >>> participant_address("/home/me/.cache/fedtune", "3f2a")
    'disk:/home/me/.cache/fedtune/client_state/3f2a'
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", federation):
        raise ValueError(f"federation id must be letters, digits, '_', '.', '-': got {federation!r}")
    return f"disk:{Path(cache_dir).expanduser().resolve() / 'client_state' / federation}"
