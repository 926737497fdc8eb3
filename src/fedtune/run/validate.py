"""``fedtune validate`` / ``fedtune run --dry-run``: everything a run builds before its first round, nothing after.

The config is validated, the data loaded and partitioned, every client's records encoded, and the model built
with its adapters, exactly as ``fedtune run`` does (``session.prepare``), so what passes here starts; then it
reports the clients, their sizes, local steps and the trainable parameter count, and trains nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from fedtune.config.schema import Config


@dataclass(frozen=True)
class ClientSize:
    client_id: str
    train_records: int
    test_records: int
    train_examples: int  # encoded training examples (blocks of max_length tokens for a language model)
    local_steps: int  # optimizer steps per round


@dataclass(frozen=True)
class Validation:
    clients: list[ClientSize]
    dropped: list[str]
    trainable_params: int
    total_params: int
    num_labels: int | None


def local_steps(config: Config, examples: int) -> int:
    """Optimizer steps one round of local training takes on ``examples`` examples (as ``local_train`` counts)."""
    cfg = config.client
    if cfg.local_steps is not None:
        return cfg.local_steps
    batch = examples if cfg.full_batch else cfg.batch_size
    return (cfg.local_epochs or 1) * math.ceil(examples / max(batch, 1))


def validate(config: Config) -> Validation:
    from fedtune.run.session import prepare

    prepared = prepare(config)
    worker = prepared.worker
    clients = []
    for cid, (train, test) in worker.records.items():
        n = len(worker.examples(cid, train=True))
        clients.append(ClientSize(cid, len(train), len(test), n, local_steps(config, n)))
    total = sum(p.numel() for p in prepared.task.module.parameters())
    return Validation(clients, prepared.dropped_clients, worker.view.spec.numel, total, prepared.num_labels)


def show(config: Config, result: Validation, console: Console, *, max_rows: int = 40) -> None:
    table = Table(title=f"{len(result.clients)} clients")
    for header in ("client", "train records", "held-out records", "train examples", "steps/round"):
        table.add_column(header, justify="left" if header == "client" else "right")
    for c in result.clients[:max_rows]:
        table.add_row(c.client_id, str(c.train_records), str(c.test_records), str(c.train_examples), str(c.local_steps))
    if len(result.clients) > max_rows:
        table.add_row(f"... {len(result.clients) - max_rows} more", "", "", "", "")
    console.print(table)
    if result.dropped:
        console.print(
            f"dropped (fewer than data.min_train_examples examples): {', '.join(result.dropped)}", soft_wrap=True
        )
    fed = config.federation
    per_round = fed.clients_per_round if fed.clients_per_round is not None else f"fraction {fed.fraction}"
    share = result.trainable_params / max(result.total_params, 1)
    console.print(
        f"model {config.model.name if config.model.kind != 'module' else config.model.factory} "
        f"({config.model.kind}): {result.trainable_params:,} trainable parameters exchanged "
        f"of {result.total_params:,} ({share:.2%})" + (f"; {result.num_labels} labels" if result.num_labels else ""),
        soft_wrap=True,
    )
    schedule = f"{fed.rounds} rounds, {per_round} clients per round"
    if config.server.mode == "async":  # FedBuff: no rounds, buffered steps (docs/ASYNC.md)
        from fedtune.config.asynchronous import FedBuffConfig

        fb = config.server.fedbuff or FedBuffConfig()
        schedule = (
            f"{fed.rounds} buffered steps (async: {fb.concurrency} clients training at once, "
            f"a step every {fb.buffer_size} arrivals)"
        )
    console.print(f"{schedule}; nothing was trained", soft_wrap=True)
