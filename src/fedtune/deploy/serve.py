"""``fedtune server``: build the model once for its initial trainable vector, then coordinate over gRPC.

The server holds no data. It builds the model from the config (same seed, so the same initial adapter
every participant builds) only to learn the initial vector and its spec, then hands a
GrpcServerTransport to the transport-agnostic coordinator ``fedtune.run.session.coordinate``, which owns the
run directory, checkpoints and resume.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from fedtune.client.weights import TrainableView
from fedtune.config.load import dump_config
from fedtune.config.schema import Config
from fedtune.core.params import ParamSpec
from fedtune.data.cache import default_cache_dir
from fedtune.errors import ConfigError, FedtuneError
from fedtune.run import rundir
from fedtune.run.board import Refusal
from fedtune.run.session import RunResult, coordinate
from fedtune.run.sinks import RoundSink
from fedtune.run.trackers import require_trackers
from fedtune.tasks.build import build_run_task
from fedtune.transport.grpc.server import GrpcServerTransport, ServerTLS

SERVER_RECORD = "server.json"  # in the run directory: the port this run's server bound
ASYNC_DP_REFUSED = (
    "privacy.dp with server.mode 'async' runs in simulation only: its accounting relies on an arrival schedule "
    "that is a function of the seed alone (each staleness weight public), but over the network who arrives when "
    "depends on the clients' real training times, which may depend on their data, so one client could change "
    "other clients' weights outside the 2C sensitivity bound (docs/ASYNC.md)"
)


def initial_model(config: Config) -> tuple[np.ndarray, ParamSpec, bool]:
    """(initial trainable vector, its spec, whether evaluation reports accuracy), without any data."""
    if config.model.kind == "classification" and config.model.num_labels is None:
        raise ConfigError(
            "model.num_labels is required for a networked classification run: the server holds no data "
            "to count the labels from"
        )
    cache_dir = default_cache_dir(config.data.cache_dir)
    task = build_run_task(config, num_labels=config.model.num_labels, cache_dir=cache_dir)
    view = TrainableView(task.module)
    return view.read(), view.spec, task.reports_accuracy


def deployment_defaults(config: Config) -> Config:
    """The config a deployment runs: ``auto`` in ``server.update_norm_bound`` and ``server.max_examples_per_client``
    becomes ``adaptive`` (a deployment bounds every client's influence by default; a simulation, whose clients
    are ours, does not).

    Under ``privacy.dp`` both become ``off`` instead: DP's clip already bounds every update's norm and DP
    weights clients uniformly, and the adaptive bounds are medians of the clients' un-noised updates and
    counts, statistics of their data that the privacy accounting does not cover."""
    keys = ("update_norm_bound", "max_examples_per_client")
    value = "off" if config.privacy.dp is not None else "adaptive"
    resolved = {k: value for k in keys if getattr(config.server, k) == "auto"}
    if not resolved:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=resolved)})


def listen_port(config: Config, resume_dir: Path | None) -> int:
    """The port to listen on. With ``deployment.port: 0`` a resumed server listens where the run's first server
    did (server.json), so the clients that keep reconnecting find it. Only the listener changes: the config the
    clients were sent (and compare on rejoining) stays as it was."""
    dep = config.deployment
    record = Path(resume_dir) / SERVER_RECORD if resume_dir is not None else None
    if dep.port != 0 or record is None or not record.is_file():
        return dep.port
    try:
        return int(json.loads(record.read_text())["port"])
    except (ValueError, KeyError, TypeError) as err:
        raise FedtuneError(f"{record} is unreadable ({err}); set deployment.port to the port clients dial") from None


class GrpcDirectory:
    """Who is enrolled (deployment.allowed_clients; None: any certificate of the CA), connected and refused,
    from the server's registry (fedtune.run.board.ClientDirectory)."""

    def __init__(self, transport: GrpcServerTransport, allowed: list[str] | None) -> None:
        self.registry, self.allowed = transport.registry, allowed

    def enrolled(self) -> list[str] | None:
        return sorted(self.allowed) if self.allowed is not None else None

    def connected(self) -> list[str]:
        return self.registry.live()

    def refused(self) -> list[Refusal]:
        return [Refusal(who, reason, at) for who, reason, at in self.registry.refusals()]


def run_server(
    config: Config,
    *,
    resume_dir: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    sinks: Sequence[RoundSink] = (),
) -> RunResult:
    """Listen, wait for the quorum, run the federation, and tell the clients how it ended; ``sinks`` get every
    round after the default ones (e.g. the dashboard)."""
    console = console or Console()
    config = deployment_defaults(config)
    require_trackers(config.run.trackers)  # before the model is built or the port opened
    if config.server.mode == "async" and config.privacy.dp is not None:
        raise ConfigError(ASYNC_DP_REFUSED)
    params, spec, accuracy = initial_model(config)
    extra = {"num_labels": config.model.num_labels} if config.model.num_labels is not None else {}
    transport = GrpcServerTransport(
        config.deployment.model_copy(update={"port": listen_port(config, resume_dir)}),
        tls=ServerTLS.from_config(config.deployment),
        config_yaml=dump_config(config),
        extra=extra,
        secure_aggregation=config.privacy.secure_aggregation is not None,  # updates stay on the clients
    )
    port = transport.start()
    dep = config.deployment
    fresh_dir = rundir.new_run_dir(config) if resume_dir is None else None
    (Path(resume_dir or fresh_dir) / SERVER_RECORD).write_text(json.dumps({"port": port, "address": dep.address}))
    console.print(
        f"listening on {dep.address}:{port} (mutual TLS); {spec.numel:,} trainable parameters; "
        f"waiting for {dep.min_clients} clients"
    )
    try:
        result = coordinate(
            config,
            transport,
            init=(params, spec),
            accuracy=accuracy,
            resume_dir=resume_dir,
            console=console,
            show_progress=show_progress,
            extra_state=extra or None,
            fresh_dir=fresh_dir,
            # SCAFFOLD's N: the clients allowed to enrol, when listed; else the clients that have taken part
            num_clients=len(dep.allowed_clients) if dep.allowed_clients else None,
            sinks=sinks,
            directory=GrpcDirectory(transport, dep.allowed_clients),
        )
    except FedtuneError as err:
        transport.close(ok=False, reason=f"the server stopped the federation: {err}")
        raise
    except BaseException:
        transport.stop()  # interrupted: clients keep reconnecting, so a restarted server (--resume) finds them
        raise
    transport.close(ok=True, reason=f"the federation finished after round {result.state.round}")
    return result
