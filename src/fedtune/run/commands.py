"""The helper commands: ``fedtune validate``, ``fedtune init`` and ``fedtune predict``.

Registered in ``fedtune.cli``; heavy imports (torch, transformers) happen inside the commands so
``fedtune --help`` stays fast. Exit status 2 for bad input, as everywhere in the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedtune.errors import FedtuneError

console = Console()
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b.c=value.")]


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
    raise typer.Exit(code=2)


def check_config(config: Path, overrides: list[str], out: Console) -> None:
    """Validate CONFIG, load its data and model, print clients, sizes and trainable parameters; no training."""
    from fedtune.config import load_config
    from fedtune.run.validate import show, validate

    cfg = load_config(config, overrides)
    out.print(f"config {config}: valid", soft_wrap=True)
    show(cfg, validate(cfg), out)


def validate_cmd(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: SetOpt = None,
) -> None:
    """Check CONFIG without training: load the data and the model, show the clients and their sizes."""
    try:
        check_config(config, set_ or [], console)
    except FedtuneError as err:
        _fail(err)


def init_cmd(
    data: Annotated[Path, typer.Argument(help="A data file (.txt, .csv, .tsv, .json, .jsonl) or folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the config.")] = Path("fedtune.yaml"),
    model: Annotated[str | None, typer.Option(help="model.name (default: by the kind of data).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Write a starting config for DATA, guessing text / instruct / classification from its files or columns."""
    from fedtune.run.scaffold import guess_data, starting_config, write_config

    try:
        if out.exists() and not force:
            raise FedtuneError(f"{out} exists; pass --force to overwrite it or --out to write elsewhere")
        guess = guess_data(data)
        write_config(starting_config(guess, model=model), guess, out)
    except FedtuneError as err:
        _fail(err)
    console.print(f"wrote {out}: {guess.source} data ({guess.why})", soft_wrap=True)
    console.print(f"next: fedtune validate {out}   then   fedtune run {out}", soft_wrap=True)


def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory of a text classifier.")],
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="Text to classify (repeatable; default: stdin lines).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Classify text with the federated classifier of RUN_DIR: the label and every class's probability."""
    from fedtune.run.predict import predict

    try:
        if not text and sys.stdin.isatty():  # do not sit waiting for typed input the user did not mean to give
            raise FedtuneError("give --text TEXT (repeatable) or pipe lines on stdin")
        texts = list(text or []) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise FedtuneError("no text to classify: give --text TEXT or lines on stdin")
        predictions = predict(run_dir, texts)
    except FedtuneError as err:
        _fail(err)
    for p in predictions:
        if as_json:
            print(json.dumps({"text": p.text, "label": p.label, "probabilities": p.probabilities}))
        else:
            probs = "  ".join(f"{name}={prob:.3f}" for name, prob in p.probabilities.items())
            print(f"{p.label}\t{probs}\t{p.text}")
