"""The public Python API (re-exported by ``fedtune``): run a simulated federation from Python.

``simulate`` takes what ``fedtune run`` takes (a config file, a dict or a ``Config``) and, optionally, the
user's own objects: a model (any ``nn.Module``, or a Hugging Face model with its tokenizer), datasets (one
per client, or one to partition), and a loss and evaluation function for a plain ``nn.Module``. It returns
the run directory, the final global model as a ready torch module, and the per-round metrics. See
docs/PYTHON_API.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune.client.hooks import LoraResidual
from fedtune.config.load import parse_config
from fedtune.config.schema import Config
from fedtune.core.state import ServerState
from fedtune.run import rundir
from fedtune.run.artifacts import global_extras
from fedtune.run.objects import Objects, check_objects, object_config, prepare_objects, raw_config
from fedtune.run.session import RunResult
from fedtune.run.session import simulate as run_simulation
from fedtune.tasks.python import EvalFn, LossFn


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
