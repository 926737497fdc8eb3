"""Example counts participants declare when they join, and the bound they put on later replies.

A participant declares how many training examples it holds (``JoinRequest.declared_examples``, counted from
its own data). The server records the count per certificate CN for as long as it runs: a rejoin may lower
it, never raise it, so a client cannot enrol small and claim large later. A fit result claiming more than
the recorded count is weighted as declared, with the reason logged, or refused (``deployment.over_declared``);
with ``deployment.require_declared_examples`` a result from a client that declared nothing is refused.

This binds a client to its own statement; it does not make the statement true. What one client may
declare at all is bounded by the operator: ``deployment.declared_examples`` (counts set at enrolment,
beside the certificate) and ``server.max_examples_per_client``, applied after this in the coordinator's
loop (server/influence.py). Counts live in memory: a restarted server records them again at the rejoins.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import TypeVar

from fedtune.core.messages import ClientUpdate, HeldUpdate
from fedtune.errors import UpdateRejected

log = logging.getLogger("fedtune.server")

U = TypeVar("U", ClientUpdate, HeldUpdate)


class Declarations:
    def __init__(self, *, refuse_over: bool, required: bool) -> None:
        self.refuse_over, self.required = refuse_over, required
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, client_id: str, declared: int) -> int | None:
        """Record what ``client_id`` declared at Join (0: nothing); returns the count in force."""
        with self._lock:
            before = self._counts.get(client_id)
            if declared <= 0:
                return before
            if before is not None and declared > before:
                log.warning(
                    "client %s declares %d training examples at rejoin, more than the %d it declared before: "
                    "%d stays in force", client_id, declared, before, before,
                )  # fmt: skip
                return before
            self._counts[client_id] = declared
            return declared

    def count(self, client_id: str) -> int | None:
        with self._lock:
            return self._counts.get(client_id)

    def bound(self, update: U) -> U:
        """``update`` weighted at most by its client's declared count; UpdateRejected when the policy refuses."""
        most = self.count(update.client_id)
        if most is None:
            if self.required:
                raise UpdateRejected(
                    f"client {update.client_id!r} declared no example count when it joined "
                    "(deployment.require_declared_examples)"
                )
            return update
        if update.num_examples <= most:
            return update
        if self.refuse_over:
            raise UpdateRejected(
                f"claims {update.num_examples} training examples, more than the {most} it declared when it joined "
                "(deployment.over_declared: refuse)"
            )
        log.warning(
            "round %d: client %s claims %d training examples, more than the %d it declared when it joined: "
            "weighted as %d", update.round, update.client_id, update.num_examples, most, most,
        )  # fmt: skip
        return replace(update, num_examples=most)
