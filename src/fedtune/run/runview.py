"""A run directory as one JSON-able snapshot: what the dashboard serves and report.html shows.

Built from ``metrics.jsonl`` (read incrementally: only the bytes appended since the last call; a file that
shrank, as on resume, is read again) and ``status.json`` (what the coordinator is doing now). Works for a run
that is going, finished, or crashed, and for run directories older than status.json.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path

from fedtune.run import rundir
from fedtune.run.board import STATUS

MAX_FAILURES = 200  # the most recent failures kept in a snapshot
CLIENT_KEYS = ("num_examples", "train_loss", "bytes_down", "bytes_up", "fit_seconds", "examples_per_s")


class RunView:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._offset = 0
        self._partial = b""
        self.rounds: list[dict] = []
        self.clients: dict[str, dict] = {}
        self.failures: deque[dict] = deque(maxlen=MAX_FAILURES)
        self.stops: list[dict] = []

    def _add(self, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "round":
            self.rounds = [r for r in self.rounds if r.get("round") != rec.get("round")] + [rec]
        elif kind == "client":
            row = self.clients.setdefault(rec["client_id"], {"client_id": rec["client_id"], "rounds": 0})
            row.update({k: rec[k] for k in CLIENT_KEYS if k in rec}, last_round=rec["round"])
            row.update({k: v for k, v in rec.items() if "epsilon" in k})
            row["rounds"] += 1
        elif kind == "eval_client":
            row = self.clients.setdefault(rec["client_id"], {"client_id": rec["client_id"], "rounds": 0})
            metrics = {k: v for k, v in rec.items() if k not in ("kind", "round", "client_id", "count")}
            row.update({f"eval_{k}": v for k, v in metrics.items()}, eval_round=rec["round"])
        elif kind == "failure":
            self.failures.append(rec)
            row = self.clients.setdefault(rec["client_id"], {"client_id": rec["client_id"], "rounds": 0})
            row["failures"] = row.get("failures", 0) + 1
        elif kind == "stop":
            self.stops.append(rec)

    def _tail(self) -> None:
        path = self.run_dir / rundir.METRICS
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            self._reset()
            return
        if size < self._offset:  # truncated (a resume dropped rounds after its checkpoint): read it again
            self._reset()
        if size == self._offset:
            return
        with open(path, "rb") as fh:
            fh.seek(self._offset)
            data = self._partial + fh.read(size - self._offset)
        self._offset = size
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the rest
        for line in lines:
            if line.strip():
                try:
                    self._add(json.loads(line))
                except json.JSONDecodeError:
                    continue

    def status(self) -> dict:
        try:
            return json.loads((self.run_dir / STATUS).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def snapshot(self) -> dict:
        with self._lock:
            self._tail()
            status = self.status()
            rounds = sorted(self.rounds, key=lambda r: r["round"])
            return {
                "run_dir": str(self.run_dir),
                "name": status.get("name") or self.run_dir.name,
                "status": _with_defaults(status, rounds),
                "rounds": rounds,
                "clients": _client_rows(self.clients, status),
                "failures": list(self.failures),
                "stops": list(self.stops),
                "privacy": _privacy(rounds, self.clients, status),
            }


def _with_defaults(status: dict, rounds: list[dict]) -> dict:
    """A run without status.json (older, or not started): what metrics.jsonl alone says."""
    done = max((r["round"] for r in rounds), default=0)
    out = {"state": "unknown", "round": done, "total_rounds": None, "eta_s": None, **status}
    if "accuracy" not in out:
        out["accuracy"] = any(r.get("eval_accuracy") is not None for r in rounds)
    return out


def _client_rows(clients: dict[str, dict], status: dict) -> list[dict]:
    """One row per client known from the records, the board, the enrolled list or the connections."""
    board = status.get("clients", {})
    connected = set(status.get("connected") or [])
    enrolled = status.get("enrolled") or []
    refused = {r["who"]: r for r in status.get("refused", [])}
    ids = sorted(set(clients) | set(board) | connected | set(enrolled))
    rows = []
    for cid in ids:
        row = dict(clients.get(cid, {"client_id": cid, "rounds": 0}))
        act = board.get(cid)
        state, reason = (act["state"], act.get("reason", "")) if act else ("idle", "")
        if "connected" in status and cid not in connected and state not in ("dead", "refused", "failed"):
            state, reason = "offline", reason or "not connected"
        if cid in refused:
            state, reason = "refused", refused[cid]["reason"]
        row.update(state=state, reason=reason, connected=cid in connected if "connected" in status else None)
        rows.append(row)
    return rows


def _privacy(rounds: list[dict], clients: dict[str, dict], status: dict) -> dict:
    eps = [r["agg_epsilon"] for r in rounds if r.get("agg_epsilon") is not None]
    client_eps = [v for row in clients.values() for k, v in row.items() if "epsilon" in k and v is not None]
    return {
        "dp": bool(status.get("dp")) or bool(eps),
        "epsilon": eps[-1] if eps else None,
        "delta": status.get("delta"),
        "epsilon_budget": status.get("epsilon_budget"),
        "client_epsilon_max": max(client_eps) if client_eps else None,
    }
