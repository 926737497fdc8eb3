"""``fedtune.federate``: federate a ``transformers.Trainer`` (or TRL's ``SFTTrainer``) in one call.

Built on ``fedtune.participate``: each round the trainer's model receives the global weights of its
trainable parameters (with a peft model: the adapter), ``trainer.train()`` runs on the client's data with a
fresh optimizer and schedule (as fedtune's own loop starts each round), and the change of those parameters
goes back with the size of the training set. The model is exchanged as it is (no LoRA is added by fedtune),
so the server's aggregation, DP clipping of the update and secure aggregation (over gRPC) apply; what acts
inside fedtune's own loop (FedProx, SCAFFOLD, DP-SGD, stragglers, FLoRA ranks) is refused, as for any
external loop.

In simulation there is one trainer per client, all holding the same model object (TRL's SFTTrainer prepares
each one's dataset when it is built), or one plain ``Trainer`` with ``datasets=`` of one dataset per client.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, Unpack

from fedtune.errors import ConfigError


class ServerConnection(TypedDict, total=False):
    """How a participant reaches a ``fedtune server`` (see ``fedtune.participate``)."""

    server: str | None  # "host:port"; None: simulation
    ca: str | Path  # the federation's CA certificate (PEM)
    cert: str | Path  # this participant's certificate (PEM); its CN is the client id
    key: str | Path  # its private key (PEM)
    server_name: str | None  # the name the server's certificate is checked against (default: the host)
    reconnect_timeout_s: float  # how long to keep reconnecting to a server that is away (default 300)


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


def _evaluator(trainers: Mapping[str, Any]) -> Any:
    """evaluate(model, client_id) from each trainer's eval_dataset (None if no trainer has one)."""
    if not any(t.eval_dataset is not None for t in trainers.values()):
        return None
    return lambda model, client_id: _evaluate(trainers[client_id])


def _per_client(trainer: Any, datasets: Mapping[str, Any] | None) -> dict[str, Any]:
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


def _shallow(trainer: Any) -> Any:
    import copy

    return copy.copy(trainer)  # the same model, arguments and callbacks; its own datasets


def _drive(run: Any, trainer_of: Any) -> Any:
    """Each job: the client's trainer trains the global model it holds, and the result goes back."""
    for job in run:
        count, loss = _train_round(trainer_of(job.client_id))
        job.send(count, metrics={"train_loss": loss})
    return run.result


def federate(
    trainer: Any,
    config: str | Path | Mapping | Any = None,
    *,
    datasets: Mapping[str, Any] | None = None,
    quiet: bool = False,
    **connection: Unpack[ServerConnection],
) -> Any:
    """Federate ``trainer``: in simulation (``config`` and one trainer per client, or ``datasets=``) it returns
    the ``SimulationResult``; with ``server=`` (and ``ca``, ``cert``, ``key``, optionally ``server_name`` and
    ``reconnect_timeout_s``: ``fedtune.participate``'s connection arguments) it joins that ``fedtune server`` as
    a participant training on ``trainer.train_dataset`` (held-out: ``trainer.eval_dataset``) and returns 0 when
    the federation finished."""
    from fedtune.api import participate
    from fedtune.run.objects import raw_config

    unknown = set(connection) - set(ServerConnection.__annotations__)
    if unknown:
        raise TypeError(f"federate() got unexpected keyword arguments {sorted(unknown)}")
    if connection.get("server") is not None:
        evaluate = None if trainer.eval_dataset is None else (lambda model, client_id: _evaluate(trainer))
        run = participate(config, model=trainer.model, evaluate=evaluate, quiet=quiet, _as_is=True, **connection)
        return _drive(run, lambda client_id: trainer)
    if config is None:
        raise TypeError("federate() in simulation needs the federation's config (rounds, clients per round, ...)")
    trainers = _per_client(trainer, datasets)
    model = next(iter(trainers.values())).model
    lora_mode = raw_config(config).get("server", {}).get("lora_aggregation", "naive")
    if lora_mode != "naive":
        raise ConfigError(
            f"server.lora_aggregation {lora_mode!r} needs fedtune to build the adapter (model.lora); a trainer's model "
            "is exchanged as it is, so its adapter factors are averaged ('naive'). Over gRPC, a server whose config "
            "names the same model and LoRA settings applies its mode"
        )
    run = participate(
        config, model=model, clients=list(trainers), evaluate=_evaluator(trainers), quiet=quiet, _as_is=True
    )
    return _drive(run, trainers.__getitem__)
