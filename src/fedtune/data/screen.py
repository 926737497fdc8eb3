"""After encoding: which clients can train and be evaluated, said out loud (DataWarning with counts, or a
DataError when nothing is left). Knows no task: the worker's encoded examples are only counted."""

from __future__ import annotations

import warnings
from collections.abc import Sequence, Sized
from typing import Any, Protocol

from fedtune.errors import DataError, DataWarning

SHOWN_IDS = 8  # client ids a message lists before "..."


class EncodedClients(Protocol):
    records: dict[str, tuple[Sequence[Any], Sequence[Any]]]

    def examples(self, client_id: str, *, train: bool) -> Sized: ...  # a client's encoded examples


def _shown(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN_IDS]) + (", ..." if len(ids) > SHOWN_IDS else "")


def screen_clients(
    worker: EncodedClients, min_train_examples: int, max_length: int
) -> dict[str, tuple[Sequence[Any], Sequence[Any]]]:
    """The records of the clients with at least ``min_train_examples`` encoded training examples. Dropped
    clients, and kept ones whose held-out records all encode to nothing, are DataWarnings; no client left to
    train, or none left to evaluate, is a DataError."""
    records = worker.records
    kept = {cid: recs for cid, recs in records.items() if len(worker.examples(cid, train=True)) >= min_train_examples}
    dropped = [cid for cid in records if cid not in kept]
    if not kept:
        raise DataError(
            f"no client has at least {min_train_examples} training examples after encoding "
            f"(max_length={max_length}); lower data.min_train_examples or model.max_length"
        )
    if dropped:
        warnings.warn(
            f"{len(dropped)} of {len(records)} clients dropped: fewer than data.min_train_examples="
            f"{min_train_examples} training examples after encoding (model.max_length={max_length}): {_shown(dropped)}",
            DataWarning,
            stacklevel=2,
        )
    unscored = [cid for cid, (_, test) in kept.items() if test and not worker.examples(cid, train=False)]
    if all(not worker.examples(cid, train=False) for cid in kept):
        raise DataError(
            f"none of the {len(kept)} clients has a held-out example after encoding (model.max_length="
            f"{max_length}), so nothing can be evaluated: give more held-out data (data.test_path) or shorter prompts"
        )
    if unscored:
        warnings.warn(
            f"{len(unscored)} of {len(kept)} clients have no held-out example left after encoding and are not "
            f"evaluated: {_shown(unscored)}",
            DataWarning,
            stacklevel=2,
        )
    return kept
