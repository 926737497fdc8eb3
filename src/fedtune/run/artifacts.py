"""Rebuild a run's task with the global model of its last checkpoint (for generate and export)."""

from __future__ import annotations

from pathlib import Path

from fedtune.client.weights import TrainableView
from fedtune.core.state import ServerState, load_state
from fedtune.data.cache import default_cache_dir
from fedtune.errors import CheckpointError
from fedtune.run import rundir
from fedtune.tasks.base import Task
from fedtune.tasks.build import build_task


def load_trained_task(run_dir: Path) -> tuple[Task, ServerState]:
    run_dir = Path(run_dir)
    config = rundir.load_run_config(run_dir)
    state = load_state(run_dir / rundir.CHECKPOINT)
    num_labels = config.model.num_labels or state.extra.get("num_labels")
    task = build_task(
        config.model, num_labels=num_labels, cache_dir=default_cache_dir(config.data.cache_dir), seed=config.seed
    )
    view = TrainableView(task.module)
    if view.spec.digest != state.spec.digest:
        raise CheckpointError(
            f"checkpoint in {run_dir} does not match the model its config builds: "
            f"{view.spec.describe_mismatch(state.spec)}"
        )
    view.write(state.params)
    return task, state
