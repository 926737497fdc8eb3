"""The ``fedtune`` command line: run, validate, init, generate, predict, export (and the networked commands)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtune.dashboard.options import (
    DEFAULT_PORT,
    DashboardOpt,
    DashboardPortOpt,
    OptionalValueCommand,
    dashboard_port,
)
from fedtune.errors import FedtuneError, exit_status

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning of language models.")
console = Console()

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b.c=value.")]
DashboardHostOpt = Annotated[str, typer.Option(help="The dashboard's address (default: this machine only).")]


def dashboard_sinks(console: Console, port: int | None, host: str = "127.0.0.1") -> list:
    """The round sinks ``--dashboard [PORT]`` adds (none without it: ``port`` None)."""
    if port is None:
        return []
    from fedtune.dashboard.server import DashboardSink

    return [DashboardSink(console, host=host, port=port)]


def _fail(err: FedtuneError) -> None:
    console.print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
    raise typer.Exit(code=exit_status(err))


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
            prompt = escape(repr(cfg.eval.sample_prompt))
            console.print(f"[bold]{label} sample[/bold] {prompt} ->", soft_wrap=True)
            console.print(text.strip() + "\n", markup=False, highlight=False, soft_wrap=True)  # model text as is
    console.print(f"run directory: {result.run_dir}  (metrics.jsonl, metrics.png, checkpoint)", soft_wrap=True)


@app.command(cls=OptionalValueCommand)
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML config file.")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run directory.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    dashboard: DashboardOpt = None,
    dashboard_port_: DashboardPortOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Load the config, data and model and stop (as `fedtune validate`).")
    ] = False,
) -> None:
    """Run a simulated federation from CONFIG (or continue one with --resume RUN_DIR)."""
    from fedtune.config import load_config
    from fedtune.run.interrupt import RunInterrupted
    from fedtune.run.rundir import load_run_config
    from fedtune.run.session import simulate

    result = None
    try:
        if resume is not None:
            if config is not None:
                raise FedtuneError("give either CONFIG or --resume RUN_DIR, not both")
            cfg = load_run_config(resume, set_ or [])
        elif config is None:
            raise FedtuneError("missing CONFIG (or --resume RUN_DIR)")
        else:
            cfg = load_config(config, set_ or [])
        if dry_run:
            from fedtune.run.commands import check_config

            return check_config(resume / "config.yaml" if resume else config, set_ or [], console)
        result = simulate(
            cfg,
            resume_dir=resume,
            console=console,
            show_progress=not quiet and sys.stderr.isatty(),
            sinks=dashboard_sinks(console, dashboard_port(dashboard, dashboard_port_)),
        )
        _summary(result)
    except FedtuneError as err:
        _fail(err)
    except KeyboardInterrupt as stop:  # Ctrl-C: say how to continue, exit like an interrupted shell command
        if isinstance(stop, RunInterrupted):
            hint = stop.hint()
        elif result is not None:  # during the summary: the run itself is complete
            hint = f"interrupted after the run finished; everything is in {result.run_dir}"
        else:
            hint = "interrupted before the first round started"
        console.print(f"[yellow]{hint}[/yellow]", soft_wrap=True)
        raise typer.Exit(code=130) from None


# personalisation (fedtune.run.personal_export): whose model generate / export use
ClientOpt = Annotated[
    str | None, typer.Option("--client", help="Use this client's personalised model (personalization runs).")
]
FinetunedOpt = Annotated[
    bool, typer.Option("--finetuned", help="With --client: its model fine-tuned after the last round.")
]
ClientStateOpt = Annotated[
    str | None,
    typer.Option("--client-state", help="With --client: the client state store (default: the run's; disk:<dir>)."),
]


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens to generate (default: the model's generation_config.json, else 60).")
    ] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always pick the most likely token.")] = False,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (turns sampling on).")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass (turns sampling on).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (same seed, same text).")] = 0,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="Wrap the prompt as a chat turn (default: if the run was instruction-tuned)."
        ),
    ] = None,
    client: ClientOpt = None,
    finetuned: FinetunedOpt = False,
    client_state: ClientStateOpt = None,
) -> None:
    """Generate text with the federated model of RUN_DIR.

    Sampling settings: the flags, else the model's generation_config.json, else temperature 0.8, top_p 0.95."""
    from fedtune.data.cache import default_cache_dir
    from fedtune.models.hub import resolve_model
    from fedtune.run.artifacts import load_trained_task
    from fedtune.run.generate import generate_text, model_generation_defaults, sampling_settings
    from fedtune.run.rundir import load_run_config

    try:
        cfg = load_run_config(run_dir)
        if cfg.model.kind != "causal_lm":
            raise FedtuneError(f"generate needs a causal language model; this run trained a {cfg.model.kind}")
        defaults = model_generation_defaults(resolve_model(cfg.model.name, default_cache_dir(cfg.data.cache_dir)))
        sampling, tokens = sampling_settings(
            defaults, greedy=greedy, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
        )
        if client is not None:  # that client's personalised model
            from fedtune.run.personal_export import personal_task

            task = personal_task(run_dir, client, finetuned=finetuned, state=client_state)
        else:
            task, _ = load_trained_task(run_dir)
        if chat is None:
            chat = cfg.data.source == "instruct"
        text = generate_text(task, prompt, max_new_tokens=tokens, seed=seed, chat=chat, sampling=sampling)
    except FedtuneError as err:
        _fail(err)
    print(text)  # plain: no wrapping or markup when piped


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write model/ and adapter/.")],
    dtype: Annotated[
        str | None, typer.Option(help="Cast the written weights: float32, bfloat16 or float16 (default: as trained).")
    ] = None,
    client: ClientOpt = None,
    finetuned: FinetunedOpt = False,
    client_state: ClientStateOpt = None,
) -> None:
    """Export the federated model: a merged folder plain transformers loads, and the peft adapter.

    With --client: that client's personalised model (its own LoRA B / local parameters / Ditto model)."""
    from fedtune.run.export import export_run

    try:
        export_run(run_dir, out_dir, dtype=dtype, client=client, finetuned=finetuned, client_state=client_state)
        console.print(f"exported to {out_dir}")
    except FedtuneError as err:
        _fail(err)


@app.command()
def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, finished or running.")],
    port: Annotated[int, typer.Option(help="The dashboard's port (0: any free port).")] = DEFAULT_PORT,
    host: DashboardHostOpt = "127.0.0.1",
) -> None:
    """Serve the live dashboard of RUN_DIR (read-only; the URL carries its access token) until Ctrl-C."""
    from fedtune.dashboard.server import serve_run_dir

    try:
        serve_run_dir(run_dir, console, host=host, port=port)
    except FedtuneError as err:
        _fail(err)


from fedtune.deploy.commands import certs_cmd, client_cmd, server_cmd  # noqa: E402 - after the local commands

app.command("server", cls=OptionalValueCommand)(server_cmd)
app.command("client")(client_cmd)
app.command("certs")(certs_cmd)

from fedtune.run.commands import init_cmd, predict_cmd, validate_cmd  # noqa: E402

app.command("validate")(validate_cmd)
app.command("init")(init_cmd)
app.command("predict")(predict_cmd)


def _quiet_libraries() -> None:
    """Keep the terminal for fedtune's own progress: no per-load progress bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return
    # not imported yet, and a run that trains no Hugging Face model never imports it (seconds of start-up):
    # the same settings through the variables transformers and huggingface_hub read when they are imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _version(value: bool) -> None:
    if value:
        from fedtune import __version__

        print(f"fedtune {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _quiet_libraries()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
