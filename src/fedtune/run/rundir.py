"""A run directory holds everything about one run, and enough to resume it.

config.yaml               the fully resolved config
metrics.jsonl             one JSON object per line: kind=round | client | eval_client | failure
metrics.png               per-round plot (redrawn at most every 30 s, and at the end)
checkpoint.safetensors    the ServerState after the last round (atomic, SHA-256 checked on resume)
checkpoint.prev.safetensors  the one before it, resumed (with a warning) when the latest is corrupt
server.json               `fedtune server`: the port it bound (reused by --resume when deployment.port is 0)
summary.json              written when the run finishes
status.json               what the coordinator and each client are doing now (read by the dashboard)
report.html               a self-contained report, written when the run ends (however it ends)
trackers.json             the MLflow and W&B run ids (a resumed run continues them)
tensorboard/ mlruns/ wandb/   what run.trackers asked for
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from fedtune.config.load import dump_config, load_config
from fedtune.config.schema import Config
from fedtune.errors import CheckpointError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
PLOT = "metrics.png"
SUMMARY = "summary.json"


# deployment keys that bound one client's influence (how much an update weighs): they change results, so each
# is in the digest when it differs from its default (a run that leaves them alone keeps its earlier digest)
INFLUENCE_KEYS = ("declared_examples", "over_declared", "require_declared_examples")


def config_digest(config: Config) -> str:
    """Identity of what a run computes. Left out: the round count (a finished run can be extended), and
    settings that change where or how it runs but not its results (outputs, evaluation, the simulation
    backend, which matches in-process exactly, and the deployment's addresses, credentials, limits and
    timeouts). The deployment's update codec does change the results: it is kept when one is set; so do its
    influence bounds (INFLUENCE_KEYS), kept when not at their defaults."""
    data = config.model_dump(mode="json")
    data["federation"].pop("rounds", None)
    dep = data["deployment"]
    kept = {k: dep[k] for k in ("codec", "codec_block", "topk_fraction")} if dep.get("codec", "none") != "none" else {}
    fields = type(config.deployment).model_fields
    kept |= {k: dep[k] for k in INFLUENCE_KEYS if dep[k] != fields[k].get_default()}
    speeds = data["simulation"].get("client_speed")  # async mode's simulated clock decides who arrives when
    for section in ("run", "eval", "simulation", "deployment"):
        data[section] = {}
    if kept:
        data["deployment"] = kept
    if data["server"].get("mode") == "sync":  # keys added with FedBuff: a sync run's digest is as before them
        data["server"].pop("mode")
        data["server"].pop("fedbuff", None)
    elif speeds is not None:
        data["simulation"] = {"client_speed": speeds}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def new_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.run.out_dir) / f"{config.run.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    (path / CONFIG).write_text(dump_config(config))
    return path


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    if not (Path(run_dir) / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a fedtune run directory (no {CONFIG})")
    return load_config(Path(run_dir) / CONFIG, overrides)


def clean_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON, which browsers and other tools parse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSONL, flushed per round; ``truncate_after(r)`` drops records of rounds > r on resume."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS

    def append(self, records: list[dict]) -> None:
        text = "".join(json.dumps(clean_json(rec)) + "\n" for rec in records)  # one write for the round
        with open(self.path, "a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: everything after it is dropped
        return out

    def truncate_after(self, round_idx: int) -> None:
        keep = [r for r in self.read() if r.get("round", 0) <= round_idx]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def rounds(self) -> list[dict]:
        return [r for r in self.read() if r.get("kind") == "round"]
