"""``data`` config -> FederatedData: load a source, partition pooled records, split, and cap.

Sources with natural clients (Shakespeare roles, a folder of your files: one client per file) keep them
under ``partition.kind: natural``; any other kind pools their records (in client order) and re-partitions
them. Pooled sources (one file, BBC News, digits) must be partitioned. ``data.test_path`` replaces the
split with your held-out files. Randomness comes only from ``derive_rng(seed, ...)``: the partition from
scope ("partition",), each client's random train/test split from ("split", client_id), a pooled test file's
spread over clients from ("test-partition",). Text keeps a temporal split: the held-out paragraphs or
speeches come after the trained ones. Clients left without held-out data are a DataWarning; none with any
is a DataError.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config.schema import DataConfig, PartitionConfig
from fedtune.core.rng import derive_rng
from fedtune.data import partition as part
from fedtune.data.local import LocalData, load_local
from fedtune.data.types import ClientSplit, FederatedData
from fedtune.errors import DataError, DataWarning

LOCAL_SOURCES = frozenset({"text", "instruct", "classification"})  # your files under data.path
SHOWN_IDS = 8  # client ids a warning lists before "..."


@dataclass(frozen=True)
class _Pool:
    """Records of a source without natural clients, with labels for label-skew partitions."""

    records: list[Any]
    labels: list[int] | None
    label_names: list[str]
    temporal: bool  # split by position (text) rather than at random


# --------------------------------------------------------------------------------------------- loading


def _load_shakespeare(cfg: DataConfig, cache_dir: Path) -> FederatedData:
    from fedtune.data.shakespeare import load_shakespeare

    texts_dir = Path(cfg.path).expanduser() if cfg.path else None
    return load_shakespeare(cache_dir, texts_dir=texts_dir, plays=cfg.plays, test_fraction=cfg.test_fraction)


def _load_pool(cfg: DataConfig) -> _Pool:
    if cfg.source == "bbc_news":
        from fedtune.data.classify import load_bbc_news

        records, names = load_bbc_news()
        return _Pool(records, [r.label for r in records], names, temporal=False)
    if cfg.source == "digits":
        from fedtune.data.digits import DIGIT_NAMES, load_digits_records

        records = load_digits_records()
        return _Pool(records, [r.label for r in records], list(DIGIT_NAMES), temporal=False)
    raise DataError(f"unknown data.source {cfg.source!r}")


def warn_data(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


def _shown(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN_IDS]) + (", ..." if len(ids) > SHOWN_IDS else "")


def _load_files(cfg: DataConfig, seed: int, cache_dir: Path) -> FederatedData:
    """Your files: one client per file of a folder (natural), or the pooled records partitioned."""
    local = load_local(cfg, cache_dir)
    empty = [cid for cid, records in local.train.items() if not records]
    if len(empty) == len(local.train):
        what = "no non-empty paragraphs found" if cfg.source == "text" else "no records in any file"
        raise DataError(f"data.path {cfg.path}: {what}")
    if empty:
        warn_data(
            f"{len(empty)} of {len(local.train)} files of data.path hold no records, so no client: {_shown(empty)}"
        )
    temporal = cfg.source == "text"
    if cfg.partition.kind != "natural":
        return _partition_local(local, empty, cfg, seed, temporal)
    if not local.folder and cfg.source != "text":
        raise DataError(
            f"data.source {cfg.source!r} with one file has no natural clients: set data.partition.kind "
            "(iid, dirichlet_sizes or dirichlet_labels) and data.partition.num_clients, or make data.path a "
            "folder with one file per client"
        )
    clients = {}
    for cid, records in local.train.items():
        if cid in empty:
            continue
        if local.test is not None:
            clients[cid] = ClientSplit(list(records), list(local.test[cid]))
        else:
            clients[cid] = _split(temporal, list(records), cid, cfg.test_fraction, seed)
    return FederatedData(clients=clients, label_names=local.label_names)


def _partition_local(local: LocalData, empty: list[str], cfg: DataConfig, seed: int, temporal: bool) -> FederatedData:
    records = [r for cid, rs in local.train.items() if cid not in empty for r in rs]
    labels = [r.label for r in records] if cfg.source == "classification" else None
    pool = _Pool(records, labels, local.label_names, temporal)
    if local.test is None:
        return partition_pool(pool, cfg, seed)
    test = [r for rs in local.test.values() for r in rs]
    return partition_pool(pool, cfg, seed, test_pool=test)


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


def _split(temporal: bool, records: list[Any], cid: str, test_fraction: float, seed: int) -> ClientSplit:
    if temporal:
        return ClientSplit(*part.temporal_split(records, test_fraction))
    return ClientSplit(*part.random_split(records, test_fraction, derive_rng(seed, "split", cid)))


def partition_pool(pool: _Pool, cfg: DataConfig, seed: int, test_pool: list[Any] | None = None) -> FederatedData:
    """Partition the pool and split each client's share, or (``test_pool``) keep every share for training and
    deal the test records iid over the clients: evaluation pools sums, so the pooled metrics are the file's."""
    rng = derive_rng(seed, "partition")
    parts = partition_indices(cfg.partition, len(pool.records), pool.labels, rng)
    ids = client_ids(len(parts))
    if test_pool is None:
        clients = {
            cid: _split(pool.temporal, [pool.records[i] for i in idx], cid, cfg.test_fraction, seed)
            for cid, idx in zip(ids, parts, strict=True)
        }
    else:
        test_rng = derive_rng(seed, "test-partition")
        test_parts = np.array_split(test_rng.permutation(len(test_pool)), len(parts))
        clients = {
            cid: ClientSplit([pool.records[i] for i in idx], [test_pool[i] for i in sorted(tidx)])
            for cid, idx, tidx in zip(ids, parts, test_parts, strict=True)
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
    if cfg.source == "shakespeare":
        data = _load_shakespeare(cfg, Path(cache_dir))
        if cfg.partition.kind != "natural":
            data = partition_pool(_pool_natural(data), cfg, seed)
    elif cfg.source in LOCAL_SOURCES:
        data = _load_files(cfg, seed, Path(cache_dir))
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
    check_held_out(clients, cfg)
    return FederatedData(clients=clients, label_names=list(data.label_names))


def check_held_out(clients: dict[str, ClientSplit], cfg: DataConfig) -> None:
    """A warning naming the clients without held-out records (too few to split); an error if none has any."""
    bare = [cid for cid, split in clients.items() if not split.test]
    if not bare:
        return
    hint = "give more records per client, or held-out files with data.test_path"
    if len(bare) == len(clients):
        raise DataError(f"no client has held-out data to evaluate on ({len(clients)} clients): {hint}")
    warn_data(
        f"{len(bare)} of {len(clients)} clients have too few records to hold any out and are not evaluated: "
        f"{_shown(bare)} ({hint})"
    )
