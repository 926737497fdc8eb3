"""A client's own copy of the exact LoRA modes' residual, advanced by the increments the server sends.

The server half (fedtune.server.strategies.lora_wire) sends, per module, either the dense residual or the
float32 factors of every round's increment since the version this client holds (``lora/base``), and says
which version the result is (``lora/version``). ``ResidualCopy.resolve`` turns such extras into dense
``lora/residual/<module>`` arrays (what ``LoraResidual`` loads), adding each increment with the server's own
rule (``add_increment``), and keeps the result in the client state store (namespace ``lora-residual``):
the simulation's store, the same store from Ray actors, a participant's own cache over gRPC.

Extras without ``lora/version`` (the dense global model, another strategy) pass through unchanged.

Increments from a version this client holds no copy of (a wiped cache, another run's store) raise
``fedtune.errors.ClientStateLost``: the transports report it as a failure of cause ``STATE_LOST``, and the
server's loop asks again at once with the dense residual (fedtune.server.loop).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping

import numpy as np

from fedtune.aggregation.lora import add_increment
from fedtune.core.keys import INCREMENT_PREFIX, RESIDUAL_BASE, RESIDUAL_PREFIX, RESIDUAL_VERSION
from fedtune.core.state_store import ClientState, ClientStateStore, open_state_store
from fedtune.errors import ClientStateLost, UpdateRejected

NS_RESIDUAL = "lora-residual"  # {module: residual (out, in) float32}, meta {"version": v}
_private = itertools.count()

Increments = dict[str, dict[int, dict[str, np.ndarray]]]  # module -> version -> {"B": ..., "A": ...}


def _scalar(extras: Mapping[str, np.ndarray], key: str) -> int:
    value = np.asarray(extras[key])
    if value.shape != (1,) or value.dtype.kind not in "iu":
        raise UpdateRejected(f"the server's {key!r} must be one integer, got {value.dtype} {list(value.shape)}")
    return int(value[0])


def _increments(extras: Mapping[str, np.ndarray]) -> Increments:
    out: Increments = {}
    for key, value in extras.items():
        if not key.startswith(INCREMENT_PREFIX):
            continue
        version, _, rest = key.removeprefix(INCREMENT_PREFIX).partition("/")
        module, _, factor = rest.rpartition("/")
        if not version.isdigit() or not module or factor not in ("A", "B"):
            raise UpdateRejected(f"the server sent a malformed increment name {key!r}")
        out.setdefault(module, {}).setdefault(int(version), {})[factor] = value
    return out


class ResidualCopy:
    """Built once per worker; ``state`` is the client state store's address (None: a store private to this
    worker, in memory, enough where one process serves every request)."""

    def __init__(self, state: str | None = None) -> None:
        self.state = state or f"memory:residual-copy-{next(_private)}"

    @functools.cached_property
    def store(self) -> ClientStateStore:
        return open_state_store(self.state)

    def resolve(
        self, client_id: str, extras: Mapping[str, np.ndarray], *, round: int, keep: bool = True
    ) -> dict[str, np.ndarray]:
        """``extras`` with the residual as dense ``lora/residual/<module>`` arrays (and no increments), from
        the copy saved before ``round``; ``keep``: save the result as the copy of ``round`` (a fit does; an
        evaluation does not: the server learns what a client holds from its fit replies only)."""
        if RESIDUAL_VERSION not in extras:
            return dict(extras)
        version = _scalar(extras, RESIDUAL_VERSION)
        rest = {k: v for k, v in extras.items() if k not in (RESIDUAL_VERSION, RESIDUAL_BASE)}
        dense = {k.removeprefix(RESIDUAL_PREFIX): v for k, v in rest.items() if k.startswith(RESIDUAL_PREFIX)}
        increments = _increments(rest)
        rest = {k: v for k, v in rest.items() if not k.startswith(INCREMENT_PREFIX)}
        saved = held = None  # all dense: nothing of the copy is needed (nor a module it has and R lost)
        if RESIDUAL_BASE not in extras and increments:
            raise UpdateRejected(f"the server sent LoRA residual increments without {RESIDUAL_BASE!r}")
        if RESIDUAL_BASE in extras:
            base = _scalar(extras, RESIDUAL_BASE)
            saved = self.store.load(client_id, NS_RESIDUAL, round=round)
            held = None if saved is None else int(saved.meta["version"])
            if held is None or not base <= held <= version:
                raise ClientStateLost(
                    f"client {client_id!r}: the server sent the LoRA residual as increments since version {base}, "
                    f"but this client holds {'none' if held is None else f'version {held}'} (its client state "
                    "was lost or is from another run); the server sends it the dense residual instead"
                )
        residual = self._advance(saved, held, dense, increments)
        if keep and (held != version or dense):
            self.store.save(client_id, NS_RESIDUAL, ClientState(residual, {"version": version}), round=round)
        return rest | {RESIDUAL_PREFIX + module: value for module, value in residual.items()}

    @staticmethod
    def _advance(
        saved: ClientState | None, held: int | None, dense: dict[str, np.ndarray], increments: Increments
    ) -> dict[str, np.ndarray]:
        residual = dict(saved.arrays) if saved is not None else {}
        residual.update(dense)
        for module, by_version in increments.items():
            if module not in residual:
                raise UpdateRejected(
                    f"the server sent increments for {module!r}, which this client holds no residual of"
                )
            for version in sorted(by_version):
                if held is not None and version <= held:
                    continue  # already in this copy (the server's record of it was older)
                factors = by_version[version]
                if set(factors) != {"A", "B"}:
                    raise UpdateRejected(f"increment {version} of {module!r} lacks a factor")
                b, a = factors["B"], factors["A"]
                if (
                    b.ndim != 2
                    or a.ndim != 2
                    or (b.shape[0], a.shape[1]) != residual[module].shape
                    or b.shape[1] != a.shape[0]
                ):
                    raise UpdateRejected(
                        f"increment {version} of {module!r}: B {list(b.shape)} @ A {list(a.shape)} does not fit "
                        f"its residual {list(residual[module].shape)}"
                    )
                residual[module] = add_increment(residual[module], b, a)
        return residual
