"""Rebuild a run's task with the global model of its last checkpoint (for generate and export).

The global model is the checkpoint's trainable vector plus what the strategy's ``eval_payload`` adds: for
the exact LoRA modes (fedex, svd, flora), W0 + s R in every adapted layer's base weight, loaded the same way
a client loads it for evaluation (``LoraResidual``), so generate and export see the model evaluation saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtune.client.hooks import LoraResidual
from fedtune.client.weights import TrainableView
from fedtune.config.schema import PYTHON_MODEL_PREFIX, Config
from fedtune.core.state import ServerState, load_state
from fedtune.data.cache import default_cache_dir
from fedtune.data.local import configured_label_names
from fedtune.errors import CheckpointError
from fedtune.run import rundir
from fedtune.server.build import build_strategy
from fedtune.tasks.base import Task
from fedtune.tasks.build import build_run_task
from fedtune.tasks.classification import name_labels


def load_trained_task(run_dir: Path) -> tuple[Task, ServerState]:
    run_dir = Path(run_dir)
    config = rundir.load_run_config(run_dir)
    if config.model.name.startswith(PYTHON_MODEL_PREFIX):
        raise CheckpointError(
            f"{run_dir} trained a model given as a Python object ({config.model.name}), which its config cannot "
            "rebuild: use the model fedtune.simulate returned (result.model; save_pretrained or torch.save it)"
        )
    state = load_state(run_dir / rundir.CHECKPOINT)
    num_labels = config.model.num_labels or state.extra.get("num_labels")
    task = build_run_task(config, num_labels=num_labels, cache_dir=default_cache_dir(config.data.cache_dir))
    view = TrainableView(task.module)
    if view.spec.digest != state.spec.digest:
        raise CheckpointError(
            f"checkpoint in {run_dir} does not match the model its config builds: "
            f"{view.spec.describe_mismatch(state.spec)}"
        )
    view.write(state.params)
    LoraResidual().load(task.module, global_extras(config, state))
    # the class names the run's data had (or data.label_names, for a server that held no data)
    names = state.extra.get("label_names") or (configured_label_names(config.data) or [])
    name_labels(task, names)
    return task, state


def global_extras(config: Config, state: ServerState) -> dict[str, np.ndarray]:
    """What the run's strategy sends with evaluations besides the vector (the LoRA residuals, or nothing)."""
    return build_strategy(config).eval_payload(state)
