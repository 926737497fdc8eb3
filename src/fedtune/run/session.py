"""Run a simulated federation from a config: build data, task, worker, strategy; loop; persist.

``simulate`` is what ``fedtune run`` calls. It writes the run directory as it goes, so a crash loses at
most the round in flight, and ``simulate(..., resume_dir=...)`` continues with identical results.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from rich.console import Console

from fedtune.client.build import build_client_extensions
from fedtune.client.worker import ClientWorker
from fedtune.config.schema import PYTHON_MODEL_PREFIX, Config
from fedtune.config.simulation import with_client_state
from fedtune.core.events import EventRelay
from fedtune.core.messages import ClientFailure
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState, load_latest, load_state, save_state
from fedtune.core.strategy import Strategy
from fedtune.data.cache import default_cache_dir
from fedtune.data.screen import screen_clients
from fedtune.data.sources import load_federated
from fedtune.data.types import FederatedData
from fedtune.errors import CheckpointError, ConfigError, NoRoundCompleted
from fedtune.privacy.sums import Summer, plain_sum
from fedtune.run import rundir
from fedtune.run.board import ClientBoard, ClientDirectory, StaticDirectory, StatusSink
from fedtune.run.interrupt import RunInterrupted
from fedtune.run.personal_metrics import personal_client, personal_summary
from fedtune.run.predict import write_label_names
from fedtune.run.progress import ProgressSink
from fedtune.run.report import ReportSink
from fedtune.run.sinks import (
    CheckpointSink,
    ConsoleSink,
    MetricsSink,
    PlotSink,
    RoundSink,
    RunEnd,
    RunInfo,
    Sinks,
    SummarySink,
)
from fedtune.run.trackers import build_trackers, require_trackers
from fedtune.server.build import build_strategy
from fedtune.server.loop import RoundReport, eval_clients, evaluate_models, run_rounds
from fedtune.server.summing import summer_for
from fedtune.tasks.base import EvalSums, Task
from fedtune.tasks.build import build_run_task
from fedtune.tasks.classification import name_labels
from fedtune.transport.base import Dispatch, Transport
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
    label_names: list[str] = field(default_factory=list)  # classification: the data's class names


def prepare(config: Config, *, console: Console | None = None) -> Prepared:
    refuse_python_run(config)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    cache_dir = default_cache_dir(config.data.cache_dir)
    fed = load_federated(config.data, seed=config.seed, cache_dir=cache_dir)
    num_labels = config.model.num_labels or (len(fed.label_names) or None)
    task = build_run_task(config, num_labels=num_labels, cache_dir=cache_dir)
    return prepare_worker(config, task, fed, cache_dir=cache_dir, num_labels=num_labels, console=console)


def refuse_python_run(config: Config) -> None:
    """A run whose model or data were Python objects cannot be rebuilt from its config file alone."""
    objects = [f"data.source: {config.data.source}"] if config.data.source == "python" else []
    if config.model.name.startswith(PYTHON_MODEL_PREFIX):
        objects.append(f"model.name: {config.model.name}")
    if objects:
        raise ConfigError(
            f"this run was built in Python ({', '.join(objects)}): its model and data are Python objects that a "
            "config file cannot rebuild. Resume it from Python with the same objects: "
            "fedtune.simulate(config, model=..., datasets=..., resume=RUN_DIR) (see docs/PYTHON_API.md)"
        )


def prepare_worker(
    config: Config,
    task: Task,
    fed: FederatedData,
    *,
    cache_dir: Path,
    num_labels: int | None,
    console: Console | None = None,
) -> Prepared:
    """The resident worker over ``fed``'s clients, with clients too small to train dropped (and reported)."""
    name_labels(task, fed.label_names)  # the classifier's config carries them: the export's id2label
    records = {cid: (split.train, split.test) for cid, split in fed.clients.items()}
    ext = build_client_extensions(config)
    worker = ClientWorker(
        task,
        records,
        hook_factories=ext.hook_factories,
        update_transforms=ext.update_transforms,
        personal=ext.personal,
        residual_state=ext.residual_state,
    )
    # Encode every client once up front: clients whose text is too short for one training example are
    # dropped here (a DataWarning with their ids), instead of failing in the middle of a round.
    kept = screen_clients(worker, config.data.min_train_examples, config.model.max_length)
    dropped = [cid for cid in records if cid not in kept]
    worker.records = kept
    if console is not None:
        n_train = sum(len(worker.examples(c, train=True)) for c in kept)
        console.print(
            f"[bold]{len(kept)}[/bold] clients, {n_train} training examples"
            + (f" ({len(dropped)} clients without enough data dropped)" if dropped else "")
            + f"; {worker.view.spec.numel:,} trainable parameters exchanged"
        )
    return Prepared(config, task, worker, cache_dir, num_labels, dropped, list(fed.label_names))


def _eval_record(pooled: EvalSums | None, accuracy: bool) -> dict:
    if pooled is None or pooled.count == 0:
        return {}
    return {f"eval_{k}": v for k, v in pooled.metrics(accuracy=accuracy).items()}


def round_records(report: RoundReport, accuracy: bool) -> list[dict]:
    """The metrics.jsonl lines for one round."""
    acc = accuracy
    summary = {
        "kind": "round",
        "round": report.round,
        "clients_sampled": len(report.sampled),
        "clients_ok": len(report.clients),
        "clients_failed": len(report.failures),
        "train_loss": report.train_loss,
        "bytes_down": report.bytes_down,
        "bytes_up": report.bytes_up,
        "eval_bytes_down": report.eval_bytes_down,
        "seconds": report.seconds,
        **{f"agg_{k}": v for k, v in report.aggregate.items()},
        **_eval_record(report.eval_pooled, accuracy),
        **personal_summary(report.eval_clients, report.eval_personal, accuracy),
    }
    if report.rejected is not None:  # the model did not change: a failed round, not a completed one
        summary.update(status="failed", reason=report.rejected)
    lines = [summary]
    lines += [{"kind": "client", "round": report.round, **c} for c in report.clients]
    lines += [
        {
            "kind": "eval_client",
            "round": report.round,
            "client_id": cid,
            "count": s.count,
            **s.metrics(accuracy=acc),
            **personal_client(report.eval_personal, cid, accuracy),
        }
        for cid, s in report.eval_clients.items()
    ]
    lines += [_failure(f, "failure") for f in report.failures]
    lines += [_failure(f, "recovered") for f in report.recovered]  # asked again, the outcome is recorded above
    return lines


def _failure(f: ClientFailure, kind: str) -> dict:
    return {"kind": kind, "round": f.round, "client_id": f.client_id, "reason": f.reason, "cause": f.cause.value}


@dataclass
class RunResult:
    run_dir: Path
    state: ServerState
    rounds: list[dict]
    baseline: dict
    prepared: Prepared | None = None  # set by simulate (the in-process worker and task)


def _open_run(
    config: Config,
    strategy: Strategy,
    init: tuple[np.ndarray, ParamSpec],
    resume_dir: Path | None,
    console: Console,
    fresh_dir: Path | None = None,
) -> tuple[Path, ServerState, rundir.MetricsLog]:
    """A fresh run directory (``fresh_dir`` if the caller made it) with the initial state, or the state of the
    run being resumed."""
    digest = rundir.config_digest(config)
    params, spec = init
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        state, warning = load_latest(run_dir / rundir.CHECKPOINT, config_digest=digest)
        if warning:
            console.print(f"[yellow]warning: {warning}[/yellow]")
        if state.spec.digest != spec.digest:
            raise CheckpointError(
                f"checkpoint in {run_dir} does not match the model: {spec.describe_mismatch(state.spec)}"
            )
        (run_dir / rundir.CONFIG).write_text(rundir.dump_config(config))
        log = rundir.MetricsLog(run_dir)
        log.truncate_after(state.round)
        console.print(f"resuming {run_dir} after round {state.round}")
        return run_dir, state, log
    run_dir = fresh_dir or rundir.new_run_dir(config)
    save_state(ServerState(0, params, spec), run_dir / INITIAL, config_digest=digest)
    console.print(f"run directory: {run_dir}")
    return run_dir, strategy.init_state(params, spec), rundir.MetricsLog(run_dir)


def default_sinks(
    config: Config,
    run_dir: Path,
    metrics: rundir.MetricsLog,
    console: Console,
    board: ClientBoard,
    directory: ClientDirectory | None,
) -> list[RoundSink]:
    """What every run writes, in order: metrics first (a crash before the checkpoint replays the round), the
    checkpoint, the console table, metrics.png, status.json, the trackers, report.html and summary.json."""
    sinks: list[RoundSink] = [
        MetricsSink(metrics),
        CheckpointSink(run_dir / rundir.CHECKPOINT, rundir.config_digest(config)),
        ConsoleSink(console),
    ]
    if config.run.plot:
        sinks.append(PlotSink(metrics, run_dir / rundir.PLOT, title=config.run.name))
    sinks.append(StatusSink(board, directory))
    sinks += build_trackers(config.run.trackers)
    sinks += [ReportSink(metrics), SummarySink(metrics, run_dir / rundir.SUMMARY)]
    return sinks


def serve(
    strategy: Strategy,
    transport: Transport,
    state: ServerState,
    sinks: Sinks,
    *,
    config: Config,
    accuracy: bool,
    baseline: bool,
    summer: Summer = plain_sum,
    dispatch: Dispatch | None = None,
) -> tuple[ServerState, RunEnd]:
    """Serve ``strategy``'s rounds over ``transport`` from ``state``: the baseline evaluation (if ``baseline``)
    and the rounds, every event handed to ``sinks`` (progress, metrics, checkpoint, console, plot, status,
    trackers, report: whatever the caller composed), the clients' as the loop sees them (``on_event``) and the
    rounds' as they end. ``summer`` forms a sum strategy's sum (``summer_for``). Builds nothing: ``coordinate``
    composes the strategy, the summer, the run directory and the sinks from a config."""
    events = sinks.on_event
    if baseline:
        started = time.perf_counter()
        askees = eval_clients(config, transport.client_ids())
        evaluation = evaluate_models(config, strategy, transport, state, askees, events=events)
        rec = {
            "kind": "round",
            "round": 0,
            "clients_sampled": 0,
            "clients_ok": 0,
            "bytes_down": 0,
            "bytes_up": 0,
            "eval_bytes_down": evaluation.bytes_down,
            "seconds": time.perf_counter() - started,
            **_eval_record(evaluation.pooled, accuracy),
        }
        sinks.on_round(state, [rec])

    stopped: list[str] = []
    rejected: list[str | None] = []  # per round run here: why it did not change the model (None: it did)

    def on_round(new: ServerState, report: RoundReport) -> None:
        rejected.append(report.rejected)
        sinks.on_round(new, round_records(report, accuracy))

    def on_stop(at: ServerState, reason: str) -> None:  # e.g. the privacy budget is spent
        stopped.append(reason)
        sinks.on_stop(at, reason)

    first = state.round
    if config.server.mode == "async":  # FedBuff: buffered steps on a simulated clock instead of rounds
        from fedtune.server.async_loop import run_async

        # dispatch: real clients arriving when they finish (gRPC); None: the simulated clock
        state = run_async(
            config,
            strategy,
            transport,
            state,
            on_round=on_round,
            on_stop=on_stop,
            summer=summer,
            dispatch=dispatch,
            events=events,
        )
    else:
        state = run_rounds(
            config, strategy, transport, state, on_round=on_round, on_stop=on_stop, summer=summer, events=events
        )
    if rejected and all(why is not None for why in rejected):
        raise NoRoundCompleted(
            f"none of rounds {first + 1}-{state.round} could be completed (last reason: {rejected[-1]}); "
            "the global model is unchanged; see metrics.jsonl in the run directory"
        )
    return state, RunEnd("stopped", state, stopped[0]) if stopped else RunEnd("finished", state)


def coordinate(
    config: Config,
    transport: Transport,
    *,
    init: tuple[np.ndarray, ParamSpec],
    accuracy: bool,
    resume_dir: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    extra_state: dict | None = None,
    fresh_dir: Path | None = None,
    sinks: Sequence[RoundSink] = (),
    directory: ClientDirectory | None = None,
    steps: EventRelay | None = None,
    num_clients: int | Literal["transport"] | None = "transport",
) -> RunResult:
    """The coordinator, whatever the transport: open or resume the run, evaluate the baseline, run the
    rounds; the progress bars (``show_progress``) and the default sinks show and persist progress, metrics,
    checkpoint, plot, status, trackers and report, then ``sinks``.

    ``init`` is the initial trainable vector and its spec (the server builds the model once to get them);
    ``accuracy`` says whether evaluation reports accuracy (classifiers) or perplexity; ``fresh_dir`` is a new
    run directory the caller already made (``rundir.new_run_dir``), for a run that is not resumed;
    ``directory`` says who is enrolled, connected and refused (default: every client of the transport);
    ``steps`` relays local-step progress from the workers (in-process or Ray) to the sinks; ``num_clients`` is
    the population size SCAFFOLD divides by (None: the clients that have taken part). Raises NoRoundCompleted
    when rounds were run and none of them changed the model.
    """
    console = console or Console()
    require_trackers(config.run.trackers)  # a tracker that is not installed fails before anything starts
    summer = summer_for(config, transport)  # SecAgg over what the transport can carry; refused where it cannot
    dispatch = async_dispatch(config, transport)  # FedBuff over real clients, where the transport can
    if config.server.mode == "async":
        from fedtune.server.async_loop import build_fedbuff

        strategy = build_fedbuff(config)
    else:
        if num_clients == "transport":  # a simulation's population is fixed; a deployment's caller says (or None)
            num_clients = len(transport.client_ids())
        strategy = build_strategy(config, num_clients=num_clients)  # SCAFFOLD needs N
    run_dir, state, log = _open_run(config, strategy, init, resume_dir, console, fresh_dir)
    if extra_state and state.round == 0:
        state = state.evolve(extra={**state.extra, **extra_state})
    directory = directory or StaticDirectory(transport)
    progress: list[RoundSink] = [ProgressSink(console)] if show_progress else []
    fanout = Sinks([*progress, *default_sinks(config, run_dir, log, console, ClientBoard(), directory), *sinks])
    history = log.read()
    # a resumed run that crashed after its baseline does not evaluate it again
    baseline = state.round == 0 and config.eval.baseline and not any(r.get("kind") == "round" for r in history)
    end = RunEnd("failed", state)
    try:  # every sink is closed however the run ends, even if one fails to start (sinks close unstarted)
        fanout.on_start(RunInfo(run_dir, config, accuracy, state.round, history, init[1].numel))
        if steps is not None:
            steps.listener = fanout.on_event
        state, end = serve(
            strategy,
            transport,
            state,
            fanout,
            config=config,
            accuracy=accuracy,
            baseline=baseline,
            summer=summer,
            dispatch=dispatch,
        )
    except KeyboardInterrupt:
        end = RunEnd("interrupted", fanout.last_state or state, "interrupted (Ctrl-C)")
        raise
    except BaseException as err:
        end = RunEnd("failed", fanout.last_state or state, f"{type(err).__name__}: {err}")
        raise
    finally:
        if steps is not None:
            steps.listener = None
        fanout.close(end)
    rounds = log.rounds()
    baseline = next((r for r in rounds if r["round"] == 0), {})
    return RunResult(run_dir=run_dir, state=state, rounds=rounds, baseline=baseline)


def async_dispatch(config: Config, transport: Transport) -> Dispatch | None:
    """What FedBuff dispatches through: None in sync mode or in simulation (the simulated clock decides who
    arrives when); the transport itself where it declares ``asynchronous``; an error naming the transport
    where it can do neither."""
    if config.server.mode != "async" or transport.capabilities.simulated:
        return None
    if not transport.capabilities.asynchronous:
        raise ConfigError(
            f"server.mode 'async' (FedBuff) cannot run over this transport ({type(transport).__name__}): it does "
            "not dispatch fits one client at a time (Capabilities.asynchronous)"
        )
    return cast(Dispatch, transport)


def worker_from_config(config: Config) -> ClientWorker:
    """The resident worker ``prepare`` builds; Ray actors and data-parallel ranks each call it once
    (picklable as ``functools.partial(worker_from_config, config)``)."""
    return prepare(config).worker


def simulation_transport(config: Config, prepared: Prepared, steps: EventRelay | None = None) -> Transport:
    """The transport ``config.simulation`` asks for: this process's worker, or a pool of Ray actors (whose
    local steps go to ``steps``)."""
    import functools

    sim = config.simulation
    factory = functools.partial(worker_from_config, config)
    if sim.backend == "ray":
        from fedtune.client.distributed import distributed_worker
        from fedtune.transport.ray_backend import RayTransport

        if sim.client_nproc > 1:
            factory = functools.partial(distributed_worker, factory, sim.client_nproc)
        return RayTransport(factory, list(prepared.worker.records), sim, steps=steps)
    if sim.client_nproc > 1:
        from fedtune.client.distributed import DistributedClientWorker

        ddp = DistributedClientWorker(prepared.worker, factory, sim.client_nproc)
        return InProcessTransport(ddp)  # type: ignore[arg-type]  # same interface as ClientWorker
    return InProcessTransport(prepared.worker)


def simulate(
    config: Config,
    *,
    resume_dir: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    sinks: Sequence[RoundSink] = (),
    prepare_fn: Callable[[Config, Console], Prepared] | None = None,
) -> RunResult:
    """A whole simulated federation: one resident model in this process, or one per Ray actor
    (``config.simulation``); ``sinks`` get every round after the default ones (e.g. the dashboard).
    ``prepare_fn`` builds the worker from objects instead of from the config (the Python API: ``fedtune.api``);
    such a run is in-process only."""
    console = console or Console()
    require_trackers(config.run.trackers)  # before anything is made
    if prepare_fn is None:
        refuse_python_run(config)  # before a run directory is made
    # the run directory first: the simulated clients keep their state between rounds in it (or in the store
    # simulation.client_state names), and every worker is built knowing where
    fresh_dir = rundir.new_run_dir(config) if resume_dir is None else None
    steps = EventRelay()  # local steps, for the progress bars: from this process's worker or the Ray actors
    try:
        workers = with_client_state(config, config.simulation.client_state_address(fresh_dir or Path(resume_dir)))
        if prepare_fn is not None:
            prepared = prepare_fn(workers, console)
            transport: Transport = InProcessTransport(prepared.worker)
        else:
            prepared = prepare(workers, console=console)
            transport = simulation_transport(workers, prepared, steps if show_progress else None)
    except BaseException:
        if fresh_dir is not None:  # nothing ran yet: leave no empty run directory behind a failed start
            shutil.rmtree(fresh_dir, ignore_errors=True)
        raise
    extra = {"num_labels": prepared.num_labels} if prepared.num_labels is not None else {}
    if prepared.label_names and prepared.task.kind == "classification":
        extra["label_names"] = prepared.label_names  # for the export's id2label
    if fresh_dir is not None:
        write_label_names(fresh_dir, prepared.label_names)  # for `fedtune predict`
    if show_progress:  # in-process clients report every local step, for the bars (Ray actors: their own)
        prepared.worker.on_step = steps
    try:
        result = coordinate(
            config,
            transport,
            init=(prepared.worker.current_params(), prepared.worker.view.spec),
            accuracy=prepared.task.reports_accuracy,
            resume_dir=resume_dir,
            console=console,
            show_progress=show_progress,
            extra_state=extra,
            fresh_dir=fresh_dir,
            sinks=sinks,
            steps=steps,
        )
    except KeyboardInterrupt:  # Ctrl-C: every finished round is on disk; say where (the CLI prints the hint)
        raise RunInterrupted.of(fresh_dir or resume_dir) from None
    finally:
        transport.close()
    result.prepared = prepared
    return result


def initial_params(run_dir: Path) -> np.ndarray:
    """The trainable vector before round 1 (for LoRA: B = 0, i.e. the base model)."""
    return load_state(Path(run_dir) / INITIAL).params
