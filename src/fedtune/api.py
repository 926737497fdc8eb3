"""The public Python API (re-exported by ``fedtune``): run a simulated federation from Python.

``simulate`` takes what ``fedtune run`` takes (a config file, a dict or a ``Config``) and, optionally, the
user's own objects: a model (any ``nn.Module``, or a Hugging Face model with its tokenizer), datasets (one
per client, or one to partition), and a loss and evaluation function for a plain ``nn.Module``. It returns
the run directory, the final global model as a ready torch module, and the per-round metrics.
``participate`` federates the user's own training loop instead of fedtune's, in simulation or as a gRPC
participant of ``fedtune server``. See docs/PYTHON_API.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import torch
from rich.console import Console

from fedtune.client.build import build_client_extensions
from fedtune.client.external import ExternalEval, ExternalWorker, check_external
from fedtune.client.hooks import LoraResidual
from fedtune.config.load import parse_config
from fedtune.config.schema import Config
from fedtune.core.state import ServerState
from fedtune.core.state_store import participant_address
from fedtune.data.cache import default_cache_dir
from fedtune.data.sources import client_ids
from fedtune.errors import FedtuneError
from fedtune.run import rundir
from fedtune.run.artifacts import global_extras
from fedtune.run.federate_hf import ServerConnection
from fedtune.run.objects import Objects, check_objects, object_config, object_task, prepare_objects, raw_config
from fedtune.run.participation import Participation
from fedtune.run.session import Prepared, RunResult
from fedtune.run.session import simulate as run_simulation
from fedtune.tasks.python import EvalFn, LossFn, PythonTask


@dataclass
class SimulationResult:
    """What a simulated federation produced."""

    run_dir: Path  # config.yaml, metrics.jsonl, checkpoint.safetensors, summary.json
    model: torch.nn.Module  # the final global model (a copy: the model object you passed is not changed)
    metrics: list[dict]  # one record per round (round 0: the baseline evaluation)
    config: Config  # the config the run used, as written to run_dir/config.yaml
    state: ServerState  # the server state after the last round

    @property
    def final(self) -> dict:
        """The last completed round's record (train_loss, eval_loss, eval_accuracy or eval_perplexity, ...)."""
        return next((r for r in reversed(self.metrics) if r["round"] > 0), {})


def simulate(
    config: str | Path | Mapping | Config | None = None,
    *,
    model: torch.nn.Module | None = None,
    datasets: Any = None,
    tokenizer: Any = None,
    loss: LossFn | None = None,
    evaluate: EvalFn | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
) -> SimulationResult:
    """Run a simulated federation in this process and return its result.

    ``config``: a YAML path, a dict, or a ``Config`` (None with ``resume``: the run's own config.yaml).
    ``model``: your ``nn.Module`` (all its parameters are trained and exchanged), or a Hugging Face causal LM
    or sequence classifier (with ``tokenizer``; LoRA from ``model.lora`` applies). ``datasets``: a dict of one
    dataset per client (a ``{"train", "test"}`` dict as a value is that client's own held-out split), or one
    dataset that ``data.partition`` splits among clients. ``loss(model, batch) -> Tensor`` and
    ``evaluate(model, batch) -> {"loss", "accuracy"?}`` replace the default cross-entropy of a plain module.
    ``resume``: a run directory to continue; pass the same objects and config again.
    """
    if config is None and resume is None:
        raise TypeError("simulate() needs a config (a path, a dict or a Config), or resume=RUN_DIR")
    raw = raw_config(config if config is not None else Path(resume) / rundir.CONFIG)  # type: ignore[operator]
    objects = Objects(model=model, datasets=datasets, tokenizer=tokenizer, loss=loss, evaluate=evaluate)
    uses_objects = model is not None or datasets is not None
    cfg = object_config(raw, objects) if uses_objects else parse_config(raw, source="the config")
    console = Console(quiet=True) if quiet else Console()
    if uses_objects:
        check_objects(cfg, objects)

        def prepare_fn(workers: Config, shown: Console) -> Any:
            return prepare_objects(workers, objects, shown)

        result = run_simulation(
            cfg, resume_dir=_path(resume), console=console, show_progress=False, prepare_fn=prepare_fn
        )
    else:
        result = run_simulation(cfg, resume_dir=_path(resume), console=console, show_progress=False)
    return _result(cfg, result)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _result(config: Config, result: RunResult) -> SimulationResult:
    """The global model of the last round loaded into the run's resident model, handed back."""
    assert result.prepared is not None  # simulate always sets it
    worker = result.prepared.worker
    worker.view.write(result.state.params)
    module = worker.task.module
    LoraResidual().load(module, global_extras(config, result.state))  # the exact LoRA modes' residual
    module.eval()
    return SimulationResult(
        run_dir=result.run_dir, model=module, metrics=result.rounds, config=config, state=result.state
    )


def participate(
    config: str | Path | Mapping | Config | None = None,
    *,
    model: torch.nn.Module | None = None,
    clients: int | Sequence[str] | None = None,
    evaluate: ExternalEval | None = None,
    resume: str | Path | None = None,
    server: str | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    server_name: str | None = None,
    reconnect_timeout_s: float = 300.0,
    quiet: bool = False,
    _as_is: bool = False,
) -> Participation:
    """Federate your own training loop: ``for job in fedtune.participate(...): train(job.model);
    job.send(num_examples)``. Each job holds the global model of its round (``job.model``, trained in place).

    In simulation (no ``server``): ``config`` is the federation's config, ``model`` your module (trained in
    place: your optimizer may keep pointing at its parameters; None: the config's model), ``clients`` a count
    or a list of client ids (each job says which client it is for: train on that client's data); afterwards
    ``participation.result`` is a ``SimulationResult``. ``resume`` continues such a run.

    Over gRPC (``server="host:port"`` with this participant's ``ca``, ``cert`` and ``key``): the server's
    config decides the model and the rounds; ``config`` is your own copy of it (a server that differs is
    refused), ``model`` your own object with the server model's trainable parameters (None: built from the
    server's config). ``evaluate(model, client_id) -> {"loss", "num_examples", "accuracy"?}`` reports held-out
    figures when the server asks (none are reported without it).
    """
    if server is None:
        return _simulated(config, model, clients, evaluate, resume, quiet, _as_is)
    if clients is not None or resume is not None:
        raise TypeError("clients= and resume= are for simulation; over gRPC the server decides both")
    return _networked(server, config, model, evaluate, ca, cert, key, server_name, reconnect_timeout_s, quiet, _as_is)


def _simulated(
    config: Any, model: Any, clients: Any, evaluate: Any, resume: Any, quiet: bool, as_is: bool
) -> Participation:
    if config is None and resume is None:
        raise TypeError("participate() in simulation needs a config (a path, a dict or a Config), or resume=RUN_DIR")
    if clients is None:
        raise TypeError("participate() in simulation needs clients= (a count, or a list of client ids)")
    ids = client_ids(clients) if isinstance(clients, int) else [str(c) for c in clients]
    raw = raw_config(config if config is not None else Path(resume) / rundir.CONFIG)
    objects = Objects(model=model)
    cfg = object_config(raw, objects, python_data=True, as_is=as_is)
    check_external(cfg)
    check_objects(cfg, Objects(model=model, datasets=ids))  # in-process only; the model matches a resumed run
    console = Console(quiet=True) if quiet else Console()

    def prepare_fn(workers: Config, shown: Console) -> Prepared:
        cache_dir = default_cache_dir(workers.data.cache_dir)
        task = object_task(workers, objects, workers.model.num_labels, cache_dir, in_place=True, as_is=as_is)
        worker = ExternalWorker(
            task,
            ids,
            update_transforms=build_client_extensions(workers).update_transforms,
            evaluate=evaluate,
            jobs=participation.jobs,
            closed=participation.closed,
        )
        if evaluate is not None and isinstance(task, PythonTask):  # accuracy only if your evaluate reports it
            with torch.no_grad():
                task.reports_accuracy = "accuracy" in evaluate(task.module, ids[0])
        return Prepared(workers, task, worker, cache_dir, workers.model.num_labels)  # type: ignore[arg-type]

    def target() -> SimulationResult:
        result = run_simulation(
            cfg, resume_dir=_path(resume), console=console, show_progress=False, prepare_fn=prepare_fn
        )
        return _result(cfg, result)

    participation: Participation = Participation(target)
    return participation


def _networked(
    server: str,
    config: Any,
    model: Any,
    evaluate: Any,
    ca: Any,
    cert: Any,
    key: Any,
    server_name: str | None,
    reconnect_timeout_s: float,
    quiet: bool,
    as_is: bool,
) -> Participation:
    import yaml

    from fedtune.deploy.participant import check_pinned
    from fedtune.transport.grpc.client import ClientTLS, Joined, Participant

    if ca is None or cert is None or key is None:
        raise TypeError("participate(server=...) needs this participant's ca=, cert= and key= (PEM files)")
    local = parse_config(raw_config(config), source="config=") if config is not None else None
    console = Console(quiet=True, stderr=True) if quiet else Console(stderr=True)
    failed: list[BaseException] = []

    def make_worker(joined: Joined) -> ExternalWorker:
        try:
            cfg = parse_config(yaml.safe_load(joined.config_yaml), source="received from the server")
            if local is not None:
                check_pinned(local, cfg)
            check_external(cfg)
            cache_dir = default_cache_dir(cfg.data.cache_dir)
            num_labels = cfg.model.num_labels or joined.extra.get("num_labels")
            task = object_task(cfg, Objects(model=model), num_labels, cache_dir, in_place=True, as_is=as_is)
            # the residual copy stays on this participant's own disk (never a folder the server names), so a
            # restarted process still holds the version the server sends increments from
            own_cache = default_cache_dir(local.data.cache_dir if local is not None else None)
            return ExternalWorker(
                task,
                [joined.client_id],
                update_transforms=build_client_extensions(cfg).update_transforms,
                evaluate=evaluate,
                jobs=participation.jobs,
                closed=participation.closed,
                residual_state=participant_address(own_cache, rundir.config_digest(cfg)),
            )
        except BaseException as err:
            failed.append(err)  # the participant prints it and stops; the user's loop re-raises it
            raise

    participant = Participant(
        server,
        ClientTLS.from_paths(Path(ca), Path(cert), Path(key), server_name),
        make_worker=make_worker,  # type: ignore[arg-type]  # same interface as ClientWorker
        reconnect_timeout_s=reconnect_timeout_s,
        console=console,
    )

    def target() -> int:
        code = participant.run()
        if failed:
            raise failed[0]
        if code != 0:
            raise FedtuneError(f"the participant stopped with exit code {code} (its messages are above)")
        return code

    participation: Participation = Participation(target, stop=participant.channel.close)
    return participation


def federate(
    trainer: Any,
    config: str | Path | Mapping | Config | None = None,
    *,
    datasets: Mapping[str, Any] | None = None,
    quiet: bool = False,
    **connection: Unpack[ServerConnection],
) -> Any:
    """Federate a ``transformers.Trainer`` / TRL ``SFTTrainer`` (``fedtune.run.federate_hf``): in simulation
    (``config`` and one trainer per client, or ``datasets=``) it returns the ``SimulationResult``; with
    ``server=`` (and ``ca``, ``cert``, ``key``, optionally ``server_name`` and ``reconnect_timeout_s``:
    ``participate``'s connection arguments) it joins that ``fedtune server`` as a participant training on
    ``trainer.train_dataset`` (held-out: ``trainer.eval_dataset``) and returns 0 when the federation finished."""
    from fedtune.run import federate_hf as hf

    hf.check_connection(connection)
    if connection.get("server") is not None:
        run = participate(
            config, model=trainer.model, evaluate=hf.own_evaluator(trainer), quiet=quiet, _as_is=True, **connection
        )
        return hf.drive(run, lambda client_id: trainer)
    if config is None:
        raise TypeError("federate() in simulation needs the federation's config (rounds, clients per round, ...)")
    trainers = hf.per_client(trainer, datasets)
    model = next(iter(trainers.values())).model
    hf.check_naive_lora(config)
    run = participate(
        config, model=model, clients=list(trainers), evaluate=hf.evaluator(trainers), quiet=quiet, _as_is=True
    )
    return hf.drive(run, trainers.__getitem__)
