"""``fedtune client``: read this participant's own data, build the server's model, run the participant loop.

A participant never runs code named by the server. With ``--config`` (its own copy of the federation
config) the model, training, privacy and seed sections it runs are *its own*: the server's are compared with
them and a difference is refused, naming the key. Without ``--config`` it accepts from the server only a
built-in model name or built-in factory (tasks.build.check_builtin_model); a ``model.factory`` such as
``os:system``, a local path or a hub id is refused before anything is imported or loaded. The spec digest
in every task is checked against the model built here. The participant's data never leaves this machine:

* ``--data FILE_OR_FOLDER`` is read with the format the config's ``data`` section names: ``text`` (a .txt
  file or a folder of them, paragraphs split temporally), ``instruct`` (JSON/JSONL), ``classification``
  (CSV/JSONL with integer class ids); split into train/held-out with the run's seed;
* ``--data partition:CLIENT_ID`` takes that client's share of the config's data as the simulation would
  partition it (built-in corpora such as digits or shakespeare; for demos and tests on one machine).

An optional ``--config`` is the participant's own copy of the federation config: the client refuses a
server whose model, training, privacy or seed settings differ from it, and reads its local data with
its ``data`` section.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from fedtune.client.build import build_client_extensions
from fedtune.client.worker import ClientWorker
from fedtune.config.load import parse_config
from fedtune.config.privacy import check_dpsgd_data_parallel
from fedtune.config.schema import Config, DataConfig
from fedtune.config.simulation import with_client_state
from fedtune.core.rng import derive_rng
from fedtune.core.state_store import participant_address
from fedtune.data.cache import default_cache_dir
from fedtune.data.partition import random_split
from fedtune.data.types import ClientSplit
from fedtune.errors import ConfigError, DataError, ModelError
from fedtune.run.rundir import config_digest
from fedtune.tasks.build import build_run_task, check_builtin_model
from fedtune.transport.grpc.client import Joined, ParticipantError

PARTITION = "partition:"
PINNED_SECTIONS = ("seed", "model", "client", "privacy")  # what a participant's --config pins
# distributed DP: each client sizes its own noise share by these (privacy/ddp_client.py), so a server that
# announced more clients per round (or, with target_epsilon, more rounds) would make every share too small
DDP_PINNED = ("clients_per_round", "rounds")


def _split_records(records: list[Any], cfg: DataConfig, seed: int, client_id: str) -> ClientSplit:
    # the same seeded scope the simulation uses for a pooled source, so a client's split is reproducible
    return ClientSplit(*random_split(records, cfg.test_fraction, derive_rng(seed, "split", client_id)))


def _load_file(cfg: DataConfig, path: Path, seed: int, client_id: str) -> ClientSplit:
    if cfg.source == "text":
        from fedtune.data.text import load_text

        fed = load_text(path, cfg.test_fraction, cfg)  # one client per file; each split temporally
        return ClientSplit(
            [r for s in fed.clients.values() for r in s.train], [r for s in fed.clients.values() for r in s.test]
        )
    if cfg.source == "instruct":
        from fedtune.data.instruct import load_instructions

        return _split_records(load_instructions(path, cfg), cfg, seed, client_id)
    if cfg.source == "classification":
        from fedtune.data.classify import load_labelled

        records, names = load_labelled(path, cfg=cfg)
        if cfg.label_names is None and names != [str(i) for i in range(len(names))]:
            # each participant would number its own subset of label names differently
            raise DataError(
                f"--data {path}: a networked classification run needs integer class ids as labels, or "
                "data.label_names naming the classes in id order"
            )
        return _split_records(records, cfg, seed, client_id)
    raise DataError(
        f"data.source {cfg.source!r} is a built-in corpus: give --data {PARTITION}CLIENT_ID to take one client's "
        "share of it, or use a text, instruct or classification source with your own file"
    )


def load_local_split(cfg: DataConfig, data: str, *, seed: int, client_id: str, cache_dir: Path) -> ClientSplit:
    """This participant's (train, held-out) records from ``--data``."""
    if data.startswith(PARTITION):
        from fedtune.data.sources import load_federated

        shard = data.removeprefix(PARTITION)
        fed = load_federated(cfg, seed=seed, cache_dir=cache_dir)
        if shard not in fed.clients:
            known = list(fed.clients)
            raise DataError(f"--data {data}: the configured data has no client {shard!r} ({known[0]} .. {known[-1]})")
        split = fed.clients[shard]
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"--data {path} does not exist")
        split = _load_file(cfg, path, seed, client_id)
        if cfg.max_examples_per_client is not None:
            split = ClientSplit(split.train[: cfg.max_examples_per_client], split.test)
    if not split.train:
        raise DataError(f"--data {data}: no training records")
    return split


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, sub in data.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


HETEROGENEOUS_RANK_MODES = ("flora", "hetlora", "flexlora")


def own_lora_rank(local: Config | None, server: Config) -> int | None:
    """This participant's own LoRA rank when its --config asks for less than the server's adapter rank and the
    server aggregates heterogeneous ranks (it then trains a rank-r_k adapter inside the server's layout)."""
    if local is None or local.model.lora is None or server.model.lora is None:
        return None
    if server.server.lora_aggregation not in HETEROGENEOUS_RANK_MODES or local.model.lora.r >= server.model.lora.r:
        return None
    return local.model.lora.r


def check_pinned(local: Config, server: Config) -> None:
    """Raise unless the server's seed/model/client/privacy settings equal the participant's own (a smaller
    ``model.lora.r`` is this participant's own rank when the server aggregates heterogeneous ranks)."""
    mine, theirs = local.model_dump(mode="json"), server.model_dump(mode="json")
    own = own_lora_rank(local, server)
    for section in PINNED_SECTIONS:
        a, b = _flat({section: mine[section]}), _flat({section: theirs[section]})
        for key in sorted(set(a) | set(b)):
            if key == "model.lora.r" and own is not None:
                continue
            if a.get(key) != b.get(key):
                raise ParticipantError(
                    f"the server wants {key}={b.get(key)!r} but this participant's --config says {a.get(key)!r}; "
                    "refusing to train a configuration it did not agree to",
                    2,
                )
    if local.privacy.dp is not None and local.privacy.dp.distributed:
        for key in DDP_PINNED:
            a, b = getattr(local.federation, key), getattr(server.federation, key)
            if a != b:
                raise ParticipantError(
                    f"the server wants federation.{key}={b!r} but this participant's --config says {a!r}; under "
                    "privacy.dp.distributed each client's noise share is sized by it, refusing",
                    2,
                )


def trusted_config(server: Config, local: Config | None) -> Config:
    """The configuration this participant runs. With its own ``local`` config, the server's pinned sections
    must equal it (check_pinned) and are then taken from ``local`` itself, so nothing the server named is
    built; without one, the server's model section may name only built-in models (checked here, before
    anything is imported)."""
    if local is None:
        try:
            check_builtin_model(server.model)
        except ModelError as err:
            raise ParticipantError(str(err), 2) from None
        return server
    check_pinned(local, server)
    trusted = server.model_copy(update={section: getattr(local, section) for section in PINNED_SECTIONS})
    if own_lora_rank(local, server) is not None:  # the server's adapter layout; the own rank is trained inside it
        lora = trusted.model.lora.model_copy(update={"r": server.model.lora.r})
        trusted = trusted.model_copy(update={"model": trusted.model.model_copy(update={"lora": lora})})
    return trusted


def build_participant_worker(
    config_yaml: str, local_yaml: str | None, data: str, client_id: str, num_labels: int | None
) -> ClientWorker:
    """This participant's worker from the server's config (YAML) and its own data; every data-parallel rank
    calls it too (it takes only picklable strings), so all ranks build the same model and shard."""
    config = parse_config(yaml.safe_load(config_yaml), source="received from the server")
    local_config = parse_config(yaml.safe_load(local_yaml), source="--config") if local_yaml else None
    own_rank = own_lora_rank(local_config, config)
    config = trusted_config(config, local_config)
    data_cfg = local_config.data if local_config is not None else config.data
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    cache_dir = default_cache_dir(data_cfg.cache_dir)
    # this participant's own state (its DP-SGD ledger) stays on its own disk, whatever the server configured
    config = with_client_state(config, participant_address(cache_dir, config_digest(config)))
    split = load_local_split(data_cfg, data, seed=config.seed, client_id=client_id, cache_dir=cache_dir)
    if num_labels is not None and (not isinstance(num_labels, int) or not 1 <= num_labels <= 1 << 20):
        raise ParticipantError(f"the server sent num_labels={num_labels!r}, not a class count", 2)
    task = build_run_task(
        config,
        num_labels=config.model.num_labels or num_labels,
        cache_dir=cache_dir,
        builtin_only=local_config is None,  # the model section is the server's: built-in names only
    )
    ext = build_client_extensions(config, own_rank=own_rank)  # own_rank: announced in each reply's metrics
    worker = ClientWorker(
        task,
        {client_id: (split.train, split.test)},
        hook_factories=ext.hook_factories,
        update_transforms=ext.update_transforms,
        personal=ext.personal,  # its state: this participant's own store (above)
        residual_state=ext.residual_state,  # its copy of the LoRA residual: the same store
    )
    if not worker.examples(client_id, train=True):
        raise DataError(f"--data {data}: no training examples after encoding (model.max_length too large?)")
    return worker


def count_examples(worker: ClientWorker, client_id: str) -> int:
    """The training examples a participant declares at Join: its own encoded training data, the count each of
    its fit replies claims (partial work claims fewer)."""
    return len(worker.examples(client_id, train=True))


def worker_factory(
    data: str, *, local_config: Config | None = None, console: Console | None = None, nproc: int = 1
) -> Callable[[Joined], ClientWorker]:
    """The function the participant loop calls once, with the server's configuration, to build its worker.

    ``nproc > 1``: local training runs data-parallel on that many processes (DistributedDataParallel, gloo on
    CPU); this process is rank 0 and the only one that talks to the server."""
    console = console or Console(stderr=True)
    local_yaml = yaml.safe_dump(local_config.model_dump(mode="json")) if local_config is not None else None

    def make(joined: Joined) -> ClientWorker:
        cid = joined.client_id
        received = parse_config(yaml.safe_load(joined.config_yaml))
        check_dpsgd_data_parallel(received.privacy, nproc, nproc_key="--nproc")
        if nproc > 1 and received.personalization.active:  # its per-client state is written by one process
            raise ConfigError("personalization trains this participant's own parameters in one process: drop --nproc")
        args = (joined.config_yaml, local_yaml, data, cid, joined.extra.get("num_labels"))
        worker = build_participant_worker(*args)
        split_train, split_test = worker.records[cid]
        console.print(
            f"local data: {len(split_train)} training / {len(split_test)} held-out records, "
            f"{len(worker.examples(cid, train=True))} training examples; "
            f"{worker.view.spec.numel:,} trainable parameters"
        )
        if nproc > 1:
            from fedtune.client.distributed import DistributedClientWorker

            console.print(f"local training runs data-parallel on {nproc} processes")
            return DistributedClientWorker(worker, functools.partial(build_participant_worker, *args), nproc)  # type: ignore[return-value]
        if console.is_terminal:  # a live bar of the local steps; in a log, the line per round says it
            from fedtune.run.progress import StepBar

            worker.on_step = StepBar(console)
        return worker

    return make
