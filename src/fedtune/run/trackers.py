"""Experiment trackers as round sinks: TensorBoard, MLflow and Weights & Biases (``run.trackers``).

Each logs, at step = round: the round's metrics (losses, accuracy or perplexity, bytes, seconds, clients,
the strategy's ``agg_*`` figures including DP's epsilon), every client's training metrics (loss, examples,
bytes, fit seconds) and held-out metrics, and the resolved config as parameters. Everything is written into
the run directory: ``tensorboard/`` event files, an MLflow file store ``mlruns/`` (unless
``MLFLOW_TRACKING_URI`` names another), and an offline W&B run under ``wandb/`` (``wandb sync`` uploads it).

The libraries are optional (``pip install fedtune[track]``) and imported only when asked for; asking for one
that is not installed fails before the run starts. A resumed run continues the same MLflow and W&B runs
(their ids are kept in ``trackers.json``) and TensorBoard drops the steps after the checkpoint.

A tracker is a convenience, never a reason to lose a run: one that raises (an MLflow server that is down, a
TensorBoard folder that cannot be written, a W&B error) is reported once, naming it and the error, and
switched off; the run, its metrics.jsonl and checkpoints go on (``Guarded``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedtune.config.load import dump_config
from fedtune.config.schema import Config
from fedtune.core.events import Event
from fedtune.core.state import ServerState
from fedtune.errors import ConfigError
from fedtune.run.sinks import BaseSink, RoundSink, RunEnd, RunInfo

log = logging.getLogger("fedtune")
IDS = "trackers.json"
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def require_trackers(names: Sequence[str]) -> None:
    """A clear error naming the missing package, before anything runs."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        raise ConfigError(
            f"run.trackers asks for {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)}  (or pip install 'fedtune[track]')"
        )


def build_trackers(names: Sequence[str]) -> list[RoundSink]:
    require_trackers(names)
    kinds = {"tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink}
    return [Guarded(n, kinds[n]()) for n in names]


class Guarded:
    """A tracker whose failure does not end the run: the first error is logged as a warning naming the
    tracker, and the tracker gets no further events (its ``close`` is still tried, so it may release what
    it holds; an error there is swallowed as well)."""

    def __init__(self, name: str, inner: RoundSink) -> None:
        self.name, self.inner = name, inner
        self.failed: BaseException | None = None

    def _call(self, event: str, method: Callable[..., None], *args: object) -> None:
        if self.failed is not None and event != "close":
            return
        try:
            method(*args)
        except Exception as err:  # any library error: the tracker is optional, the run is not
            if self.failed is None:
                log.warning(
                    "tracker %s failed in %s and is switched off for the rest of the run (metrics.jsonl and "
                    "checkpoints carry on): %s: %s",
                    self.name,
                    event,
                    type(err).__name__,
                    err,
                )
                self.failed = err

    def on_start(self, run: RunInfo) -> None:
        self._call("on_start", self.inner.on_start, run)

    def on_event(self, event: Event) -> None:
        self._call("on_event", self.inner.on_event, event)

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        self._call("on_round", self.inner.on_round, state, records)

    def on_stop(self, state: ServerState, reason: str) -> None:
        self._call("on_stop", self.inner.on_stop, state, reason)

    def close(self, end: RunEnd) -> None:
        self._call("close", self.inner.close, end)


def flat_config(config: Config) -> dict[str, str]:
    """The resolved config as ``section.key: value`` strings (lists and dicts as JSON)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", config.model_dump(mode="json"))
    return out


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def scalars(records: list[dict]) -> dict[str, float]:
    """One round's records as tracker keys: ``round/<metric>``, ``client/<id>/<metric>``,
    ``client_eval/<id>/<metric>``. Only finite numbers."""
    out: dict[str, float] = {}
    for rec in records:
        kind = rec.get("kind")
        if kind == "round":
            prefix = "round/"
        elif kind in ("client", "eval_client"):
            prefix = f"{'client' if kind == 'client' else 'client_eval'}/{rec['client_id']}/"
        else:
            continue
        for key, value in rec.items():
            num = _number(value)
            if num is not None and key != "round":
                out[prefix + key] = num
    return out


def _ids(run_dir: Path) -> dict:
    path = run_dir / IDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_id(run_dir: Path, key: str, value: str) -> None:
    ids = {**_ids(run_dir), key: value}
    (run_dir / IDS).write_text(json.dumps(ids, indent=1))


class TensorBoardSink(BaseSink):
    def __init__(self) -> None:
        self.writer = None

    def on_start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run drops what a crash had logged after its checkpoint
        self.writer = SummaryWriter(
            str(run.run_dir / "tensorboard"), purge_step=run.start_round + 1 if run.start_round else None
        )
        if run.start_round == 0:
            self.writer.add_text("config", "```\n" + dump_config(run.config) + "\n```", 0)
            for summary in hparams(flat_config(run.config), {}):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        for key, value in scalars(records).items():
            self.writer.add_scalar(key, value, state.round)
        self.writer.flush()

    def on_stop(self, state: ServerState, reason: str) -> None:
        self.writer.add_text("stopped", reason, state.round)

    def close(self, end: RunEnd) -> None:
        if self.writer is not None:
            self.writer.close()


_MLFLOW_KEY = re.compile(r"[^\w\-. :/]")


class MlflowSink(BaseSink):
    """One MLflow run per fedtune run, in experiment ``run.name``."""

    def __init__(self) -> None:
        self.client = None
        self.run_id = ""

    def on_start(self, run: RunInfo) -> None:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store only behind this switch; a local store needs no server or database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = _ids(run.run_dir).get("mlflow", "")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = run.config.run.name
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run.run_dir.name).info.run_id
        _save_id(run.run_dir, "mlflow", self.run_id)
        params = [Param(_MLFLOW_KEY.sub("_", k), v[:6000]) for k, v in flat_config(run.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.set_tag(self.run_id, "fedtune.run_dir", str(run.run_dir))

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), v, now, state.round) for k, v in scalars(records).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def on_stop(self, state: ServerState, reason: str) -> None:
        self.client.set_tag(self.run_id, "fedtune.stopped", reason)

    def close(self, end: RunEnd) -> None:
        if self.client is not None and self.run_id:
            status = {"finished": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED"}.get(end.outcome, "FAILED")
            self.client.set_terminated(self.run_id, status=status)


class WandbSink(BaseSink):
    """An offline W&B run in the run directory (upload later with ``wandb sync RUN_DIR/wandb/offline-run-*``)."""

    def __init__(self) -> None:
        self.run = None

    def on_start(self, run: RunInfo) -> None:
        import wandb

        ids = _ids(run.run_dir)
        run_id = ids.get("wandb") or secrets.token_hex(4)  # W&B ids are short lowercase alphanumerics
        if "wandb" not in ids:
            _save_id(run.run_dir, "wandb", run_id)
        self.run = wandb.init(
            mode="offline",
            dir=str(run.run_dir),
            project=run.config.run.name,
            name=run.run_dir.name,
            id=run_id,
            resume="allow",
            config=run.config.model_dump(mode="json"),
            settings=wandb.Settings(silent=True, x_disable_stats=True, console="off"),
            reinit="create_new",
        )
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        self.run.log({"round": state.round, **scalars(records)})

    def on_stop(self, state: ServerState, reason: str) -> None:
        self.run.summary["stopped"] = reason

    def close(self, end: RunEnd) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if end.outcome in ("finished", "stopped") else 1)
