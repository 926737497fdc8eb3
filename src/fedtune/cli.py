"""The ``fedtune`` command line: run, generate, export."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedtune.errors import FedtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning of language models.")
console = Console()

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b.c=value.")]
DEFAULT_DASHBOARD_PORT = 8765
DashboardOpt = Annotated[bool, typer.Option(help="Serve a live dashboard of the run (URL printed at start).")]
DashboardPortOpt = Annotated[int, typer.Option(help="The dashboard's port (0: any free port).")]
DashboardHostOpt = Annotated[str, typer.Option(help="The dashboard's address (default: this machine only).")]


def dashboard_sinks(console: Console, enabled: bool, port: int, host: str = "127.0.0.1") -> list:
    """The round sinks ``--dashboard`` adds (none without it)."""
    if not enabled:
        return []
    from fedtune.dashboard.server import DashboardSink

    return [DashboardSink(console, host=host, port=port)]


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/bold red] {err}")
    raise typer.Exit(code=2)


def _summary(result) -> None:
    from fedtune.run.generate import generate_text
    from fedtune.run.session import initial_params

    task = result.prepared.task
    key = "eval_accuracy" if task.reports_accuracy else "eval_perplexity"
    final = next((r for r in reversed(result.rounds) if r.get(key) is not None), {})
    base = result.baseline
    table = Table(title="held-out evaluation of the global model")
    table.add_column("model")
    table.add_column("loss", justify="right")
    table.add_column(key.removeprefix("eval_"), justify="right")
    if base.get(key) is not None:
        table.add_row("base (before federation)", f"{base['eval_loss']:.4f}", f"{base[key]:.4f}")
    if final:
        table.add_row(f"federated (round {final['round']})", f"{final['eval_loss']:.4f}", f"{final[key]:.4f}")
    console.print(table)
    cfg = result.prepared.config
    if task.kind == "causal_lm" and cfg.eval.sample_prompt:
        view = result.prepared.worker.view
        for label, params in (("base", initial_params(result.run_dir)), ("federated", result.state.params)):
            view.write(params)
            text = generate_text(
                task,
                cfg.eval.sample_prompt,
                max_new_tokens=cfg.eval.sample_tokens,
                seed=cfg.seed,
                chat=cfg.data.source == "instruct",  # plain-text fine-tuning: continue the text as is
            )
            console.print(f"[bold]{label} sample[/bold] {cfg.eval.sample_prompt!r} ->\n{text.strip()}\n")
    console.print(f"run directory: {result.run_dir}  (metrics.jsonl, metrics.png, checkpoint)")


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML config file.")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run directory.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    dashboard: DashboardOpt = False,
    dashboard_port: DashboardPortOpt = DEFAULT_DASHBOARD_PORT,
) -> None:
    """Run a simulated federation from CONFIG (or continue one with --resume RUN_DIR)."""
    from fedtune.config import load_config
    from fedtune.run.rundir import load_run_config
    from fedtune.run.session import simulate

    try:
        if resume is not None:
            if config is not None:
                raise FedtuneError("give either CONFIG or --resume RUN_DIR, not both")
            cfg = load_run_config(resume, set_ or [])
        elif config is None:
            raise FedtuneError("missing CONFIG (or --resume RUN_DIR)")
        else:
            cfg = load_config(config, set_ or [])
        result = simulate(
            cfg,
            resume_dir=resume,
            console=console,
            show_progress=not quiet and sys.stderr.isatty(),
            sinks=dashboard_sinks(console, dashboard, dashboard_port),
        )
        _summary(result)
    except FedtuneError as err:
        _fail(err)


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 60,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="Wrap the prompt as a chat turn (default: if the run was instruction-tuned)."
        ),
    ] = None,
) -> None:
    """Generate text with the federated model of RUN_DIR."""
    from fedtune.run.artifacts import load_trained_task
    from fedtune.run.generate import generate_text
    from fedtune.run.rundir import load_run_config

    try:
        task, _ = load_trained_task(run_dir)
        if task.kind != "causal_lm":
            raise FedtuneError(f"generate needs a causal language model; this run trained a {task.kind}")
        if chat is None:
            chat = load_run_config(run_dir).data.source == "instruct"
        console.print(generate_text(task, prompt, max_new_tokens=max_new_tokens, seed=seed, chat=chat))
    except FedtuneError as err:
        _fail(err)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write model/ and adapter/.")],
) -> None:
    """Export the federated model: a merged folder plain transformers loads, and the peft adapter."""
    from fedtune.run.export import export_run

    try:
        export_run(run_dir, out_dir)
        console.print(f"exported to {out_dir}")
    except FedtuneError as err:
        _fail(err)


@app.command()
def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, finished or running.")],
    port: DashboardPortOpt = DEFAULT_DASHBOARD_PORT,
    host: DashboardHostOpt = "127.0.0.1",
) -> None:
    """Serve the live dashboard of RUN_DIR (read-only; the URL carries its access token) until Ctrl-C."""
    from fedtune.dashboard.server import serve_run_dir

    try:
        serve_run_dir(run_dir, console, host=host, port=port)
    except FedtuneError as err:
        _fail(err)


from fedtune.deploy.commands import certs_cmd, client_cmd, server_cmd  # noqa: E402 - after the local commands

app.command("server")(server_cmd)
app.command("client")(client_cmd)
app.command("certs")(certs_cmd)


def _quiet_libraries() -> None:
    """Keep the terminal for fedtune's own progress: no per-load progress bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@app.callback()
def _setup() -> None:
    _quiet_libraries()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
