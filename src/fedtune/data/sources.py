"""``data`` config -> FederatedData: load a source, partition pooled records, split, and cap.

Sources with natural clients (Shakespeare roles, text files) keep them under ``partition.kind: natural``;
any other kind pools their records (in client order) and re-partitions them. Pooled sources (instructions,
labelled text, digits) must be partitioned. Randomness comes only from ``derive_rng(seed, ...)``: the
partition from scope ("partition",), each client's random train/test split from ("split", client_id).
Text keeps a temporal split: the held-out paragraphs or speeches come after the trained ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config.schema import DataConfig, PartitionConfig
from fedtune.core.rng import derive_rng
from fedtune.data import partition as part
from fedtune.data.types import ClientSplit, FederatedData
from fedtune.errors import DataError

NATURAL_SOURCES = frozenset({"shakespeare", "text"})


@dataclass(frozen=True)
class _Pool:
    """Records of a source without natural clients, with labels for label-skew partitions."""

    records: list[Any]
    labels: list[int] | None
    label_names: list[str]
    temporal: bool  # split by position (text) rather than at random


# --------------------------------------------------------------------------------------------- loading


def _require_path(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise DataError(f"data.path is required for data.source {cfg.source!r}")
    return Path(cfg.path).expanduser()


def _load_natural(cfg: DataConfig, cache_dir: Path) -> FederatedData:
    if cfg.source == "shakespeare":
        from fedtune.data.shakespeare import load_shakespeare

        texts_dir = Path(cfg.path).expanduser() if cfg.path else None
        return load_shakespeare(cache_dir, texts_dir=texts_dir, plays=cfg.plays, test_fraction=cfg.test_fraction)
    from fedtune.data.text import load_text

    return load_text(_require_path(cfg), cfg.test_fraction)


def _load_pool(cfg: DataConfig) -> _Pool:
    if cfg.source == "instruct":
        from fedtune.data.instruct import load_instructions

        return _Pool(load_instructions(_require_path(cfg)), None, [], temporal=False)
    if cfg.source in ("classification", "bbc_news"):
        from fedtune.data.classify import load_bbc_news, load_labelled

        if cfg.source == "bbc_news":
            records, names = load_bbc_news()
        else:
            records, names = load_labelled(_require_path(cfg), cfg.text_field, cfg.label_field)
        return _Pool(records, [r.label for r in records], names, temporal=False)
    if cfg.source == "digits":
        from fedtune.data.digits import DIGIT_NAMES, load_digits_records

        records = load_digits_records()
        return _Pool(records, [r.label for r in records], list(DIGIT_NAMES), temporal=False)
    raise DataError(f"unknown data.source {cfg.source!r}")


def _pool_natural(data: FederatedData) -> _Pool:
    """All records of natural clients in client order, each client's in its own order (train then test)."""
    records = [r for split in data.clients.values() for r in (*split.train, *split.test)]
    return _Pool(records, None, list(data.label_names), temporal=True)


# --------------------------------------------------------------------------------------------- partitioning


def partition_indices(
    pcfg: PartitionConfig, n: int, labels: Sequence[int] | None, rng: np.random.Generator
) -> list[np.ndarray]:
    """The partitioner named by ``data.partition`` applied to a pool of ``n`` records."""
    if pcfg.kind == "natural" or pcfg.num_clients is None:
        raise DataError("this data.source has no natural clients: set data.partition.kind and num_clients")
    if pcfg.kind == "iid":
        return part.iid(n, pcfg.num_clients, rng)
    if pcfg.kind == "dirichlet_sizes":
        return part.dirichlet_sizes(n, pcfg.num_clients, pcfg.alpha, rng)
    if pcfg.kind == "dirichlet_labels":
        if labels is None:
            raise DataError("data.partition.kind 'dirichlet_labels' needs labelled data")
        return part.dirichlet_labels(labels, pcfg.num_clients, pcfg.alpha, rng)
    raise DataError(f"unknown data.partition.kind {pcfg.kind!r}")


def client_ids(num_clients: int) -> list[str]:
    """``client_000``, ``client_001``, ...: zero-padded so string order equals numeric order."""
    width = max(3, len(str(num_clients - 1)))
    return [f"client_{i:0{width}d}" for i in range(num_clients)]


def _split(pool: _Pool, records: list[Any], cid: str, test_fraction: float, seed: int) -> ClientSplit:
    if pool.temporal:
        return ClientSplit(*part.temporal_split(records, test_fraction))
    return ClientSplit(*part.random_split(records, test_fraction, derive_rng(seed, "split", cid)))


def partition_pool(pool: _Pool, cfg: DataConfig, seed: int) -> FederatedData:
    rng = derive_rng(seed, "partition")
    parts = partition_indices(cfg.partition, len(pool.records), pool.labels, rng)
    clients = {
        cid: _split(pool, [pool.records[i] for i in idx], cid, cfg.test_fraction, seed)
        for cid, idx in zip(client_ids(len(parts)), parts, strict=True)
    }
    return FederatedData(clients=clients, label_names=pool.label_names)


# --------------------------------------------------------------------------------------------- capping


def keep_largest(clients: dict[str, ClientSplit], max_clients: int | None) -> dict[str, ClientSplit]:
    """At most ``max_clients``: most training records first, ties by id; the result is in id order."""
    if max_clients is None or len(clients) <= max_clients:
        return dict(sorted(clients.items()))
    ranked = sorted(clients, key=lambda cid: (-len(clients[cid].train), cid))[:max_clients]
    return {cid: clients[cid] for cid in sorted(ranked)}


def cap_examples(clients: dict[str, ClientSplit], max_examples: int | None) -> dict[str, ClientSplit]:
    """Each client's first ``max_examples`` training records (held-out data is capped at evaluation)."""
    if max_examples is None:
        return clients
    return {cid: ClientSplit(list(s.train[:max_examples]), list(s.test)) for cid, s in clients.items()}


# --------------------------------------------------------------------------------------------- entry point


def load_federated(cfg: DataConfig, *, seed: int, cache_dir: Path) -> FederatedData:
    """Clients (sorted ids) with train/test records, as ``cfg`` describes; DataError if none is left."""
    if cfg.source in NATURAL_SOURCES:
        data = _load_natural(cfg, Path(cache_dir))
        if cfg.partition.kind != "natural":
            data = partition_pool(_pool_natural(data), cfg, seed)
    else:
        if cfg.partition.kind == "natural":
            raise DataError(
                f"data.source {cfg.source!r} has no natural clients: set data.partition.kind "
                "(iid, dirichlet_sizes or dirichlet_labels) and data.partition.num_clients"
            )
        data = partition_pool(_load_pool(cfg), cfg, seed)
    clients = cap_examples(keep_largest(data.clients, cfg.max_clients), cfg.max_examples_per_client)
    if not clients:
        raise DataError(f"data.source {cfg.source!r} yielded no clients")
    return FederatedData(clients=clients, label_names=list(data.label_names))
