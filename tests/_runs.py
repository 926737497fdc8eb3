"""A run directory written by hand, round by round, as a running coordinator writes it (for dashboard tests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedtune.run.board import STATUS, write_json_atomic
from fedtune.run.rundir import METRICS

CLIENTS = ["alice", "bob", "carol"]


class FakeRun:
    def __init__(self, run_dir: Path, total: int = 3) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total = total
        self.round = 0
        self.status(
            "running", {c: {"state": "training", "round": 1, "since": time.time(), "reason": ""} for c in CLIENTS}
        )

    def status(self, state: str, clients: dict, **extra: object) -> None:
        write_json_atomic(
            self.dir / STATUS,
            {
                "name": "fake",
                "state": state,
                "reason": "",
                "round": self.round,
                "total_rounds": self.total,
                "accuracy": True,
                "eta_s": 12.0,
                "updated_at": time.time(),
                "clients": clients,
                "enrolled": CLIENTS,
                "connected": CLIENTS[:2],
                "refused": [
                    {"who": "mallory", "reason": "the certificate of client 'mallory' has been revoked", "at": 1}
                ],
                **extra,
            },
        )

    def add_round(self) -> None:
        """One more round: alice and bob reply, carol is a straggler."""
        self.round += 1
        r = self.round
        lines = (
            [
                {
                    "kind": "round",
                    "round": r,
                    "clients_sampled": 3,
                    "clients_ok": 2,
                    "clients_failed": 1,
                    "train_loss": 2.0 / r,
                    "eval_loss": 1.5 / r,
                    "eval_accuracy": 0.3 + 0.1 * r,
                    "bytes_down": 2000,
                    "bytes_up": 1000 * r,
                    "seconds": 1.5,
                },
            ]
            + [
                {
                    "kind": "client",
                    "round": r,
                    "client_id": c,
                    "num_examples": 10 * (i + 1),
                    "train_loss": 2.0 / r + i,
                    "bytes_down": 1000,
                    "bytes_up": 500 * r,
                    "fit_seconds": 0.5 + i,
                }
                for i, c in enumerate(CLIENTS[:2])
            ]
            + [
                {"kind": "eval_client", "round": r, "client_id": "alice", "count": 9, "loss": 1.0, "accuracy": 0.4},
                {
                    "kind": "failure",
                    "round": r,
                    "client_id": "carol",
                    "reason": f"straggler: no training reply within 5s; dropped from round {r}",
                },
            ]
        )
        with open(self.dir / METRICS, "a") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)
        idle = {"state": "idle", "round": r, "since": time.time(), "reason": ""}
        straggling = {"state": "straggling", "round": r, "since": time.time(), "reason": lines[-1]["reason"]}
        self.status(
            "running" if r < self.total else "finished",
            {"alice": idle, "bob": idle, "carol": straggling},
        )
