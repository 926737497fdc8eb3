"""How the exact LoRA modes' residual reaches a client: the dense matrices once, then per-round increments.

Each round adds a low-rank increment to every residual R (fedex: rank (K-1) r, svd: the SVD tail, flora: the
stacked rank sum r_k; fedtune.aggregation.lora). A client that holds R as of version v (the server's round
count when it got it) needs only the increments of versions v+1 .. t, sent as their float32 factors, to hold
R as of t; whoever sends a dense (out, in) matrix instead sends ~30x the adapter (SmolLM2, rank 8).

The server keeps, in ``ServerState.arrays`` (so a checkpoint resumes it):

    lora/history/<slot>/<module>/B, /A   the float32 factors of version v's increment, slot = v % HISTORY
    lora/history/<slot>/versions          int64 (modules,): the version each module's slot holds, -1: none
    lora/held/<client id>                 int64 (1,): the version the client last received (its reply says
                                          it did: recorded when its update is folded)

and advances R by exactly those float32 factors (``add_increment``), the rule the client applies too, so the
two copies agree to float rounding. Per client and module, ``residual_payload`` sends the increments since
the client's version when all are in the history and together smaller than the dense matrix
(``factored_is_smaller``), else the dense residual (a client never seen, a client away longer than HISTORY
rounds, a round whose increment was cheaper dense or had no replies). The client half is
fedtune.client.residual_copy.

A client whose copy was lost (a wiped participant cache, another run's store) while the server believes it
holds version v fails with ``ClientStateLost`` (a failure of cause STATE_LOST on every transport); the loop
then calls the strategy's ``client_state_lost``, whose residual part is ``forget_client``: the record of what
the client holds is dropped from the state (a value: a checkpoint keeps the drop), so the loop's second ask,
in the same round, and every later one carry the dense residual until the client's next fit is folded. A
client that claims the loss falsely gains nothing but that one dense residual per claim (at most one retry
a round: its download as before increments existed), and its update is folded as any other.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedtune.aggregation.lora import LoraPair, factored_is_smaller
from fedtune.core.keys import INCREMENT_PREFIX, RESIDUAL_BASE, RESIDUAL_PREFIX, RESIDUAL_VERSION
from fedtune.core.state import ServerState

HISTORY = 8  # rounds of increments kept: a client away longer gets the dense residual
HISTORY_PREFIX = "lora/history/"
HELD_PREFIX = "lora/held/"


def residual_key(module: str) -> str:
    return RESIDUAL_PREFIX + module


def increment_key(version: int, module: str, factor: str) -> str:
    """The wire name of version ``version``'s increment factor ``factor`` ("B" or "A") of ``module``."""
    return f"{INCREMENT_PREFIX}{version}/{module}/{factor}"


def _slot_key(slot: int, module: str, factor: str) -> str:
    return f"{HISTORY_PREFIX}{slot}/{module}/{factor}"


def _versions_key(slot: int) -> str:
    return f"{HISTORY_PREFIX}{slot}/versions"


@functools.lru_cache(maxsize=64)
def _version(value: int) -> np.ndarray:
    """One read-only array per value: payloads with the same arrays share them (the Ray transport puts a set
    of equal arrays in its object store once, not once per client)."""
    out = np.array([value], dtype=np.int64)
    out.flags.writeable = False
    return out


def record_round(
    state: ServerState,
    pairs: Sequence[LoraPair],
    increments: Mapping[str, tuple[np.ndarray, np.ndarray]],
    clients: Iterable[str],
) -> dict[str, np.ndarray]:
    """State arrays to set after the round that turns ``state`` into version ``state.round + 1``.

    ``increments``: module -> the float32 (B, A) the new residual was advanced by (modules advanced densely
    are absent); ``clients``: whose updates were folded (they hold version ``state.round``).
    """
    version = state.round + 1
    slot = version % HISTORY
    versions = np.full(len(pairs), -1, dtype=np.int64)
    arrays: dict[str, np.ndarray] = {}
    for j, pair in enumerate(pairs):
        if pair.module in increments:  # (else the slot's old factors stay, ``versions`` -1 marks them stale)
            b, a = increments[pair.module]
            if a.shape[0] == 0:  # one client: a zero increment, kept as rank 1 (checkpoints hold no empty tensor)
                b, a = np.zeros((pair.out_features, 1), np.float32), np.zeros((1, pair.in_features), np.float32)
            arrays[_slot_key(slot, pair.module, "B")] = b
            arrays[_slot_key(slot, pair.module, "A")] = a
            versions[j] = version
    arrays[_versions_key(slot)] = versions
    arrays.update({HELD_PREFIX + cid: _version(state.round) for cid in clients})
    return arrays


def _increments(state: ServerState, j: int, pair: LoraPair, base: int) -> list[tuple[int, str]] | None:
    """(version, slot key stem) of every increment base+1 .. state.round of module ``j``, or None when one is
    missing from the history or they are together not smaller than the dense matrix."""
    if not 0 <= state.round - base <= HISTORY:
        return None
    found, rank = [], 0
    for version in range(base + 1, state.round + 1):
        slot = version % HISTORY
        versions = state.arrays.get(_versions_key(slot))
        if versions is None or j >= versions.size or int(versions[j]) != version:
            return None
        found.append((version, slot))
        rank += state.arrays[_slot_key(slot, pair.module, "A")].shape[0]
    if not factored_is_smaller(rank, pair.out_features, pair.in_features):
        return None
    return [(version, _slot_key(slot, pair.module, "")) for version, slot in found]


def residual_payload(state: ServerState, client_id: str, pairs: Sequence[LoraPair]) -> dict[str, np.ndarray]:
    """The arrays that give ``client_id`` the residual of version ``state.round``: per module the increments
    since the version it holds, where that is smaller, else the dense matrix."""
    held = state.arrays.get(HELD_PREFIX + client_id)
    out = {RESIDUAL_VERSION: _version(state.round)}
    factored = False
    for j, pair in enumerate(pairs):
        found = None if held is None else _increments(state, j, pair, int(held[0]))
        if found is None:
            out[residual_key(pair.module)] = state.arrays[residual_key(pair.module)]
            continue
        factored = True
        for version, stem in found:
            out[increment_key(version, pair.module, "B")] = state.arrays[stem + "B"]
            out[increment_key(version, pair.module, "A")] = state.arrays[stem + "A"]
    if factored:
        out[RESIDUAL_BASE] = _version(int(held[0]))  # type: ignore[index]  # factored implies held
    return out


def forget_client(state: ServerState, client_id: str) -> ServerState:
    """``state`` without the record of the residual version ``client_id`` holds: it lost its copy, so what it
    is sent next is the dense residual (an unchanged state when there was no record)."""
    key = HELD_PREFIX + client_id
    if key not in state.arrays:
        return state
    return state.evolve(arrays={k: v for k, v in state.arrays.items() if k != key})
