"""What ``fedtune.federate`` (in ``fedtune.api``) is made of: a ``transformers.Trainer`` (or TRL's
``SFTTrainer``) per client, one round of its training, and the loop that answers ``fedtune.participate``'s
jobs with it. ``fedtune.api`` composes them with ``participate``, so this module imports nothing above ``run``.

Each round the trainer's model receives the global weights of its trainable parameters (with a peft model:
the adapter), ``trainer.train()`` runs on the client's data with a fresh optimizer and schedule (as fedtune's
own loop starts each round), and the change of those parameters goes back with the size of the training set.
The model is exchanged as it is (no LoRA is added by fedtune), so the server's aggregation, DP clipping of the
update and secure aggregation (over gRPC) apply; what acts inside fedtune's own loop (FedProx, SCAFFOLD,
DP-SGD, stragglers, FLoRA ranks) is refused, as for any external loop.

In simulation there is one trainer per client, all holding the same model object (TRL's SFTTrainer prepares
each one's dataset when it is built), or one plain ``Trainer`` with ``datasets=`` of one dataset per client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict, TypeVar

from fedtune.errors import ConfigError
from fedtune.run.participation import Participation

T = TypeVar("T")


class ServerConnection(TypedDict, total=False):
    """How a participant reaches a ``fedtune server`` (see ``fedtune.participate``)."""

    server: str | None  # "host:port"; None: simulation
    ca: str | Path  # the federation's CA certificate (PEM)
    cert: str | Path  # this participant's certificate (PEM); its CN is the client id
    key: str | Path  # its private key (PEM)
    server_name: str | None  # the name the server's certificate is checked against (default: the host)
    reconnect_timeout_s: float  # how long to keep reconnecting to a server that is away (default 300)


def check_connection(connection: Mapping[str, Any]) -> None:
    unknown = set(connection) - set(ServerConnection.__annotations__)
    if unknown:
        raise TypeError(f"federate() got unexpected keyword arguments {sorted(unknown)}")


def _train_round(trainer: Any) -> tuple[int, float]:
    """One local round: a fresh optimizer and schedule, then ``trainer.train()``; (examples, mean loss)."""
    trainer.optimizer, trainer.lr_scheduler = None, None
    output = trainer.train()
    return len(trainer.train_dataset), float(output.training_loss)


def _evaluate(trainer: Any) -> dict:
    """The trainer's own evaluation on its eval_dataset, as fedtune's evaluate reply."""
    if trainer.eval_dataset is None:
        return {"loss": 0.0, "num_examples": 0}
    return {"loss": float(trainer.evaluate()["eval_loss"]), "num_examples": len(trainer.eval_dataset)}


def own_evaluator(trainer: Any) -> Any:
    """evaluate(model, client_id) of a participant's one trainer (None without an eval_dataset)."""
    return None if trainer.eval_dataset is None else (lambda model, client_id: _evaluate(trainer))


def evaluator(trainers: Mapping[str, Any]) -> Any:
    """evaluate(model, client_id) from each trainer's eval_dataset (None if no trainer has one)."""
    if not any(t.eval_dataset is not None for t in trainers.values()):
        return None
    return lambda model, client_id: _evaluate(trainers[client_id])


def per_client(trainer: Any, datasets: Mapping[str, Any] | None) -> dict[str, Any]:
    """client id -> a trainer whose train_dataset (and eval_dataset) is that client's."""
    from transformers import Trainer

    if isinstance(trainer, Mapping):
        if datasets is not None:
            raise TypeError("give either one trainer per client, or one trainer with datasets=, not both")
        trainers = dict(trainer)
        models = {id(t.model) for t in trainers.values()}
        if len(models) != 1:
            raise ConfigError("every client's trainer must hold the same model object (the one being federated)")
        return trainers
    if not isinstance(trainer, Trainer):
        raise TypeError(f"federate() takes a transformers.Trainer (or a dict of them), got {type(trainer).__name__}")
    if datasets is None:
        raise TypeError("in simulation, give datasets= (one training dataset per client) or one trainer per client")
    trainers = {}
    for cid, data in datasets.items():
        copy = _shallow(trainer)
        held_out = isinstance(data, Mapping) and set(data) == {"train", "test"}
        copy.train_dataset = data["train"] if held_out else data
        copy.eval_dataset = data["test"] if held_out else None
        trainers[str(cid)] = copy
    return trainers


def check_naive_lora(config: Any) -> None:
    """A trainer's model is exchanged as it is: only the naive LoRA mode (average the factors) applies."""
    from fedtune.run.objects import raw_config

    lora_mode = raw_config(config).get("server", {}).get("lora_aggregation", "naive")
    if lora_mode != "naive":
        raise ConfigError(
            f"server.lora_aggregation {lora_mode!r} needs fedtune to build the adapter (model.lora); a trainer's model "
            "is exchanged as it is, so its adapter factors are averaged ('naive'). Over gRPC, a server whose config "
            "names the same model and LoRA settings applies its mode"
        )


def _shallow(trainer: Any) -> Any:
    import copy

    return copy.copy(trainer)  # the same model, arguments and callbacks; its own datasets


def drive(run: Participation[T], trainer_of: Callable[[str], Any]) -> T:
    """Each job: the client's trainer trains the global model it holds, and the result goes back."""
    for job in run:
        count, loss = _train_round(trainer_of(job.client_id))
        job.send(count, metrics={"train_loss": loss})
    return run.result
