"""A client's personalised model, rebuilt from a run directory: for ``fedtune export/generate --client ID``.

The global model of the run's last checkpoint (``load_trained_task``) with the client's own state from the
client state store put on it:

    fedsa / fedper   its local parameters (namespace personal-local)
    ditto            its personal model v_k (personal-ditto)
    --finetuned      what it fine-tuned after the last round (personal-finetuned; any method with
                     personalization.finetune_steps)

The store is the run's (``simulation.client_state`` resolved against the run directory); a deployed
participant passes its own (``--client-state disk:<cache>/client_state/<federation>``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedtune.client.personal import LOCAL_PREFIX, NS_DITTO, NS_FINETUNED, NS_LOCAL
from fedtune.client.weights import TrainableView
from fedtune.core.state_store import ClientState, open_state_store
from fedtune.errors import CheckpointError, ConfigError
from fedtune.models.personal import local_parameters
from fedtune.tasks.base import Task

LATEST = 1 << 62  # a round after every saved one: load() returns the newest state


def run_state_address(run_dir: Path) -> str:
    """Where the run's simulated clients kept their state."""
    from fedtune.run.rundir import load_run_config

    config = load_run_config(run_dir)
    address = config.simulation.client_state_address(Path(run_dir))
    if address.startswith("ray:"):
        raise ConfigError(
            f"{run_dir} kept its clients' state in Ray ({address}), which ended with the run: "
            "use simulation.client_state 'disk' to export personalised models"
        )
    return address


def personal_task(run_dir: Path, client_id: str, *, finetuned: bool = False, state: str | None = None) -> Task:
    """The run's model as ``client_id`` holds it (``state``: the store address, default the run's)."""
    from fedtune.run.artifacts import load_trained_task
    from fedtune.run.rundir import load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    method = config.personalization.method
    if finetuned and not config.personalization.finetune_steps:
        raise ConfigError(f"{run_dir} did no local fine-tuning (personalization.finetune_steps is 0)")
    if not finetuned and method == "none":
        raise ConfigError(f"{run_dir} has no personalised models (personalization.method is 'none')")
    store = open_state_store(state or run_state_address(run_dir))
    task, _ = load_trained_task(run_dir)
    namespace = NS_FINETUNED if finetuned else (NS_DITTO if method == "ditto" else NS_LOCAL)
    saved = store.load(client_id, namespace, round=LATEST)
    if saved is None:
        raise CheckpointError(
            f"client {client_id!r} has no saved {namespace} state in {state or run_state_address(run_dir)} "
            "(it never trained, or was never evaluated after the last round)"
        )
    _apply(task, saved, namespace)
    return task


def finetuned_rank(run_dir: Path, client_id: str, *, state: str | None = None) -> tuple[int, bool] | None:
    """(r_k, rsLoRA) when the client fine-tuned at a rank below the adapter's (client ranks), else None."""
    saved = open_state_store(state or run_state_address(run_dir)).load(client_id, NS_FINETUNED, round=LATEST)
    if saved is None or "lora_rank" not in saved.meta:
        return None
    return int(saved.meta["lora_rank"]), bool(saved.meta.get("lora_rslora", False))


def _apply(task: Task, saved: ClientState, namespace: str) -> None:
    view = TrainableView(task.module)
    if "params" in saved.arrays:  # ditto / finetuned: the whole exchanged vector
        view.write(np.ascontiguousarray(saved.arrays["params"], dtype=np.float32))
    prefix = LOCAL_PREFIX if namespace == NS_FINETUNED else ""
    local = local_parameters(task.module)
    values = {k.removeprefix(prefix): v for k, v in saved.arrays.items() if k != "params" and k.startswith(prefix)}
    if set(values) != set(local):
        raise CheckpointError(
            f"saved local parameters {sorted(values)[:3]} do not match the model's {sorted(local)[:3]}"
        )
    with torch.no_grad():
        for name, param in local.items():
            param.copy_(torch.from_numpy(np.array(values[name])).to(param.dtype))
