"""Run a simulated federation from a config: build data, task, worker, strategy; loop; persist.

``simulate`` is what ``fedtune run`` calls. It writes the run directory as it goes, so a crash loses at
most the round in flight, and ``simulate(..., resume_dir=...)`` continues with identical results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fedtune.client.build import build_client_extensions
from fedtune.client.worker import ClientWorker
from fedtune.config.schema import Config
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState, load_state, save_state
from fedtune.data.cache import default_cache_dir
from fedtune.data.sources import load_federated
from fedtune.errors import DataError
from fedtune.run import rundir
from fedtune.run.plot import plot_rounds
from fedtune.run.progress import ProgressTransport, RoundTable
from fedtune.server.build import build_strategy
from fedtune.server.loop import RoundReport, eval_clients, evaluate_global, run_rounds
from fedtune.server.strategy import Strategy
from fedtune.tasks.base import EvalSums, Task
from fedtune.tasks.build import build_task
from fedtune.transport.base import Transport
from fedtune.transport.inprocess import InProcessTransport

INITIAL = "initial.safetensors"


@dataclass
class Prepared:
    """Everything a simulation needs, built once from the config."""

    config: Config
    task: Task
    worker: ClientWorker
    cache_dir: Path
    num_labels: int | None = None
    dropped_clients: list[str] = field(default_factory=list)


def prepare(config: Config, *, console: Console | None = None) -> Prepared:
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    cache_dir = default_cache_dir(config.data.cache_dir)
    fed = load_federated(config.data, seed=config.seed, cache_dir=cache_dir)
    num_labels = config.model.num_labels or (len(fed.label_names) or None)
    task = build_task(config.model, num_labels=num_labels, cache_dir=cache_dir, seed=config.seed)
    records = {cid: (split.train, split.test) for cid, split in fed.clients.items()}
    ext = build_client_extensions(config)
    worker = ClientWorker(task, records, hook_factories=ext.hook_factories, update_transforms=ext.update_transforms)
    # Encode every client once up front: clients whose text is too short for one training example are
    # dropped here, with their ids reported, instead of failing in the middle of a round.
    kept, dropped = {}, []
    for cid in records:
        if len(worker.examples(cid, train=True)) >= config.data.min_train_examples:
            kept[cid] = records[cid]
        else:
            dropped.append(cid)
    if not kept:
        raise DataError(
            f"no client has at least {config.data.min_train_examples} training examples after encoding "
            f"(max_length={config.model.max_length}); lower data.min_train_examples or model.max_length"
        )
    worker.records = kept
    if console is not None:
        n_train = sum(len(worker.examples(c, train=True)) for c in kept)
        console.print(
            f"[bold]{len(kept)}[/bold] clients, {n_train} training examples"
            + (f" ({len(dropped)} clients without enough data dropped)" if dropped else "")
            + f"; {worker.view.spec.numel:,} trainable parameters exchanged"
        )
    return Prepared(config, task, worker, cache_dir, num_labels, dropped)


def _eval_record(round_idx: int, pooled: EvalSums | None, task: Task) -> dict:
    if pooled is None or pooled.count == 0:
        return {}
    return {f"eval_{k}": v for k, v in pooled.metrics(accuracy=task.reports_accuracy).items()}


def round_records(report: RoundReport, task: Task) -> list[dict]:
    """The metrics.jsonl lines for one round."""
    acc = task.reports_accuracy
    summary = {
        "kind": "round",
        "round": report.round,
        "clients_sampled": len(report.sampled),
        "clients_ok": len(report.clients),
        "clients_failed": len(report.failures),
        "train_loss": report.train_loss,
        "bytes_down": report.bytes_down,
        "bytes_up": report.bytes_up,
        "seconds": report.seconds,
        **{f"agg_{k}": v for k, v in report.aggregate.items()},
        **_eval_record(report.round, report.eval_pooled, task),
    }
    lines = [summary]
    lines += [{"kind": "client", "round": report.round, **c} for c in report.clients]
    lines += [
        {"kind": "eval_client", "round": report.round, "client_id": cid, "count": s.count, **s.metrics(accuracy=acc)}
        for cid, s in report.eval_clients.items()
    ]
    lines += [
        {"kind": "failure", "round": f.round, "client_id": f.client_id, "reason": f.reason} for f in report.failures
    ]
    return lines


@dataclass
class RunResult:
    run_dir: Path
    state: ServerState
    rounds: list[dict]
    baseline: dict
    prepared: Prepared


def _initial_state(prepared: Prepared, strategy: Strategy, run_dir: Path) -> ServerState:
    init = prepared.worker.current_params()
    spec: ParamSpec = prepared.worker.view.spec
    save_state(ServerState(0, init, spec), run_dir / INITIAL, config_digest=rundir.config_digest(prepared.config))
    state = strategy.init_state(init, spec)
    if prepared.num_labels is not None:
        # export and generate rebuild the model from config + checkpoint, so keep the head size here
        state = state.evolve(extra={**state.extra, "num_labels": prepared.num_labels})
    return state


def simulate(
    config: Config,
    *,
    resume_dir: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    transport: Transport | None = None,
) -> RunResult:
    console = console or Console()
    prepared = prepare(config, console=console)
    task = prepared.task
    strategy = build_strategy(config)
    digest = rundir.config_digest(config)
    log: rundir.MetricsLog
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        state = load_state(run_dir / rundir.CHECKPOINT, config_digest=digest)
        if state.spec.digest != prepared.worker.view.spec.digest:
            raise DataError(f"checkpoint in {run_dir} was made for a different model layout")
        (run_dir / rundir.CONFIG).write_text(rundir.dump_config(config))
        log = rundir.MetricsLog(run_dir)
        log.truncate_after(state.round)
        console.print(f"resuming {run_dir} after round {state.round}")
    else:
        run_dir = rundir.new_run_dir(config)
        log = rundir.MetricsLog(run_dir)
        state = _initial_state(prepared, strategy, run_dir)
        console.print(f"run directory: {run_dir}")

    base = transport or InProcessTransport(prepared.worker)
    shown = ProgressTransport(base, console, enabled=show_progress)
    table = RoundTable(console, accuracy=task.reports_accuracy)
    for rec in log.rounds():
        table.add(rec)

    if state.round == 0 and config.eval.baseline and not log.rounds():
        started = time.perf_counter()
        _, pooled, _ = evaluate_global(config, shown, state, eval_clients(config, shown.client_ids()))
        rec = {
            "kind": "round",
            "round": 0,
            "clients_sampled": 0,
            "clients_ok": 0,
            "bytes_down": 0,
            "bytes_up": 0,
            "seconds": time.perf_counter() - started,
            **_eval_record(0, pooled, task),
        }
        log.append([rec])
        table.add(rec)

    def on_round(new_state: ServerState, report: RoundReport) -> None:
        records = round_records(report, task)
        log.append(records)  # metrics first: a crash before the checkpoint replays this round
        save_state(new_state, run_dir / rundir.CHECKPOINT, config_digest=digest)
        for f in report.failures:
            console.print(f"[yellow]round {f.round}: client {f.client_id} failed: {f.reason}[/yellow]")
        table.add(records[0])
        if config.run.plot:
            plot_rounds(log.rounds(), run_dir / rundir.PLOT, title=config.run.name)

    state = run_rounds(config, strategy, shown, state, on_round=on_round)
    base.close()
    rounds = log.rounds()
    baseline = next((r for r in rounds if r["round"] == 0), {})
    result = RunResult(run_dir=run_dir, state=state, rounds=rounds, baseline=baseline, prepared=prepared)
    if config.run.plot:
        plot_rounds(rounds, run_dir / rundir.PLOT, title=config.run.name)
    return result


def initial_params(run_dir: Path) -> np.ndarray:
    """The trainable vector before round 1 (for LoRA: B = 0, i.e. the base model)."""
    return load_state(Path(run_dir) / INITIAL).params
