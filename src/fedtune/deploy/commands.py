"""The networked commands: ``fedtune server``, ``fedtune client`` and ``fedtune certs``.

Registered in ``fedtune.cli``; heavy imports (torch, grpc) happen inside the commands so ``fedtune --help``
stays fast. Exit status (fedtune.errors): 0 success, 1 the federation ended in error (client), 2 bad
configuration, data or certificates, 3 a client that cannot connect or is refused, 4 a server whose run
started but completed no round.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedtune.dashboard.options import DashboardOpt, DashboardPortOpt, dashboard_port
from fedtune.errors import FedtuneError, exit_status

console = Console()
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b.c=value.")]


def _fail(err: FedtuneError, code: int | None = None) -> None:
    console.print(f"[bold red]error:[/bold red] {err}")
    raise typer.Exit(code=exit_status(err) if code is None else code)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def server_cmd(
    config: Annotated[Path | None, typer.Argument(help="YAML config (optional with --resume).")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run directory after a crash or stop.")] = None,
    quiet: Annotated[bool, typer.Option(help="Only warnings in the log (no per-client lines).")] = False,
    dashboard: DashboardOpt = None,
    dashboard_port_: DashboardPortOpt = None,
    dashboard_host: Annotated[str, typer.Option(help="The dashboard's address (default: this machine only).")] = (
        "127.0.0.1"
    ),
) -> None:
    """Start the coordinator: listen (mutual TLS), wait for the quorum, run the rounds, checkpoint each."""
    from fedtune.config import load_config
    from fedtune.deploy.serve import run_server
    from fedtune.run.rundir import load_run_config

    _logging(verbose=not quiet)
    try:
        if config is not None:
            cfg = load_config(config, set_ or [])
        elif resume is not None:
            cfg = load_run_config(resume, set_ or [])
        else:
            raise FedtuneError("missing CONFIG (or --resume RUN_DIR)")
        sinks = []
        port = dashboard_port(dashboard, dashboard_port_)
        if port is not None:
            from fedtune.dashboard.server import DashboardSink

            sinks.append(DashboardSink(console, host=dashboard_host, port=port))
        result = run_server(cfg, resume_dir=resume, console=console, show_progress=sys.stderr.isatty(), sinks=sinks)
    except FedtuneError as err:
        _fail(err)
    console.print(f"finished round {result.state.round}; run directory: {result.run_dir}")


def client_cmd(
    server: Annotated[str, typer.Option(help="The server's HOST:PORT.")],
    data: Annotated[str, typer.Option(help="Local data file or folder (or partition:CLIENT_ID for demos).")],
    ca: Annotated[Path, typer.Option(help="The federation CA certificate (PEM).")],
    cert: Annotated[Path, typer.Option(help="This client's certificate (PEM); its CN is the client id.")],
    key: Annotated[Path, typer.Option(help="This client's private key (PEM).")],
    config: Annotated[
        Path | None,
        typer.Option(
            help="Your copy of the federation config: refuse a server that differs; needed for any model that is "
            "not built in (the participant never runs code the server names)."
        ),
    ] = None,
    server_name: Annotated[
        str | None, typer.Option(help="Name to check in the server certificate, if not the HOST dialled.")
    ] = None,
    reconnect_timeout: Annotated[float, typer.Option(help="Give up after this many seconds without a server.")] = 300.0,
    nproc: Annotated[
        int, typer.Option(min=1, help="Train data-parallel on N local processes (DDP, gloo on CPU); rank 0 talks.")
    ] = 1,
    verbose: Annotated[bool, typer.Option(help="Log connection events.")] = False,
) -> None:
    """Join a federation as a participant that trains on its local data only."""
    from fedtune.config import load_config
    from fedtune.deploy.participant import count_examples, worker_factory
    from fedtune.transport.grpc.client import ClientTLS, Participant

    _logging(verbose)
    try:
        local = load_config(config) if config is not None else None
        tls = ClientTLS.from_paths(ca, cert, key, server_name)
        participant = Participant(
            server,
            tls,
            make_worker=worker_factory(data, local_config=local, console=console, nproc=nproc),
            count_examples=count_examples,  # declared at Join: the server bounds later claims by it
            reconnect_timeout_s=reconnect_timeout,
            console=console,
        )
    except FedtuneError as err:
        _fail(err, getattr(err, "code", 2))
    code = participant.run()
    raise typer.Exit(code=code)


def certs_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder for ca.pem, server.pem/.key, clients/<name>.pem/.key.")],
    clients: Annotated[str, typer.Option(help="Comma-separated client names (the certificate CNs).")] = "",
    hosts: Annotated[str, typer.Option(help="Comma-separated extra server names/IPs for the server certificate.")] = "",
    revoke: Annotated[str | None, typer.Option(help="Add this client name to OUT_DIR/revoked.txt instead.")] = None,
) -> None:
    """Create a private CA, a server certificate and per-client certificates (or revoke a client)."""
    from fedtune.deploy.certs import create_pki
    from fedtune.deploy.certs import revoke as revoke_client

    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    try:
        if revoke is not None:
            path = revoke_client(out_dir, revoke)
            console.print(f"revoked {revoke!r} in {path}; a server with deployment.revocation_list={path} refuses it")
            return
        if not split(clients):
            raise FedtuneError("give --clients a,b,c (one certificate per participant)")
        issued = create_pki(out_dir, split(clients), hosts=split(hosts))
    except FedtuneError as err:
        _fail(err)
    console.print(
        f"CA {issued.ca}\nserver {issued.server_cert} (SANs 127.0.0.1, localhost{', ' if hosts else ''}"
        f"{hosts})\n" + "\n".join(f"client {n}: {c}" for n, (c, _) in issued.clients.items())
    )
    console.print(f"revocation list {issued.revocation_list}; keep {out_dir / 'ca.key'} offline")
