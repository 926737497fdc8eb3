"""Build a simulation from Python objects: the user's model and datasets instead of config names.

The run's ``config.yaml`` says what was used, truthfully: ``data.source: python`` for datasets given as
objects and ``model.name: python:<ClassName>`` for a model object. Everything else (federation, client,
server, privacy) comes from the config as usual, so the digest a resume checks covers it.

Datasets: a mapping of client id -> dataset is one client per entry (``data.partition.kind: natural``; a
``{"train": ..., "test": ...}`` value, e.g. a ``datasets.DatasetDict``, gives that client its own held-out
set instead of a split); one dataset is partitioned as ``data.partition`` says. A dataset is anything with
``len`` and indexing: a ``datasets.Dataset``, a torch ``Dataset``, a list.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune.config.load import parse_config, read_yaml
from fedtune.config.schema import PYTHON_MODEL_PREFIX, Config
from fedtune.core.rng import derive_rng, derive_seed
from fedtune.data import partition as part
from fedtune.data.cache import default_cache_dir
from fedtune.data.sources import cap_examples, client_ids, keep_largest, load_federated, partition_indices
from fedtune.data.types import ClientSplit, FederatedData, Instruction, LabelledText
from fedtune.errors import ConfigError, DataError, ModelError
from fedtune.models.lora import apply_lora
from fedtune.models.personal import freeze_local_params
from fedtune.run.session import Prepared, prepare_worker
from fedtune.tasks.base import Task
from fedtune.tasks.build import build_run_task, enable_gradient_checkpointing
from fedtune.tasks.python import EvalFn, LossFn, PythonTask

HELD_OUT_KEYS = frozenset({"train", "test"})


@dataclass(frozen=True)
class Objects:
    """What the user passed besides the config (each optional)."""

    model: torch.nn.Module | None = None
    datasets: Any = None
    tokenizer: Any = None
    loss: LossFn | None = None
    evaluate: EvalFn | None = None


# --------------------------------------------------------------------------------------------- config


def raw_config(config: str | Path | Mapping | Config | None) -> dict:
    """A config file path, a nested dict, or a Config, as a nested dict (validated once the objects are in:
    a config without a data section must not fail for the default data source it would otherwise get)."""
    if isinstance(config, Config):
        return config.model_dump(mode="json")
    if config is None or isinstance(config, Mapping):
        return copy.deepcopy(dict(config or {}))
    return read_yaml(config)


def model_kind(model: torch.nn.Module) -> str:
    """causal_lm / classification for Hugging Face models (by their head), module for any other nn.Module."""
    # a Hugging Face model was built by transformers, so it is imported already; a plain module's run need not
    # pay seconds to import it just to learn that
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return "module"
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    raise ModelError(f"a Hugging Face {name} is neither a causal LM nor a sequence classifier; wrap it in an nn.Module")


def object_config(data: dict, objects: Objects, *, python_data: bool = False, as_is: bool = False) -> Config:
    """The config ``data`` describes, with what the objects replace: the model section names the model
    object's class, the data section says the data came from Python (``python_data``: they stay in the
    user's own training loop)."""
    data = copy.deepcopy(data)
    if objects.model is not None:
        kind = "module" if as_is else model_kind(objects.model)  # as_is: its trainable parameters, no LoRA added
        model = {**data.get("model", {}), "kind": kind, "name": f"{PYTHON_MODEL_PREFIX}{type(objects.model).__name__}"}
        if kind == "module":
            model.update(factory=None, factory_kwargs={}, lora=None)  # full-parameter exchange
        data["model"] = model
    if objects.datasets is not None or python_data:
        section = data.get("data") or {}
        if section.get("path"):
            raise ConfigError(f"data.path {section['path']!r} and datasets= both name the data: give only one")
        data["data"] = {**section, "source": "python"}
    return parse_config(data, source="the config given to fedtune.simulate")


# --------------------------------------------------------------------------------------------- data


def materialise(dataset: Any, what: str) -> list[Any]:
    """A dataset's items as a list (a ``datasets.Dataset`` yields its rows as dicts)."""
    if isinstance(dataset, str | bytes) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(
            f"{what} must be a dataset (len and indexing: datasets.Dataset, torch Dataset, list), "
            f"got {type(dataset).__name__}"
        )
    return [dataset[i] for i in range(len(dataset))]


def _label(record: Any) -> int:
    if isinstance(record, LabelledText):
        return record.label
    if isinstance(record, Mapping):
        for key in ("labels", "label"):
            if key in record:
                return int(record[key])
    if isinstance(record, tuple) and len(record) == 2:
        return int(record[1])
    raise DataError(f"data.partition.kind 'dirichlet_labels' needs labelled items, got {type(record).__name__}")


def label_names(dataset: Any) -> list[str]:
    """The names of a ``datasets.Dataset``'s ClassLabel column ``label``/``labels``, if it has one."""
    datasets = sys.modules.get("datasets")  # a Dataset was made by the datasets package: imported already
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        for key in ("label", "labels"):
            feature = dataset.features.get(key)
            if isinstance(feature, datasets.ClassLabel):
                return list(feature.names)
    return []


def federated_objects(datasets: Any, config: Config) -> FederatedData:
    """The clients the datasets argument describes, split and capped as ``config.data`` says."""
    cfg, seed = config.data, config.seed
    if isinstance(datasets, Mapping) and set(datasets) == HELD_OUT_KEYS:
        raise DataError(
            "datasets= is one {'train', 'test'} split: pass a dict of one dataset per client (each may be such a "
            "split), or one dataset for data.partition to divide among clients"
        )
    if isinstance(datasets, Mapping):
        if not datasets:
            raise DataError("datasets= is an empty mapping: give one dataset per client")
        names = next((label_names(d) for d in datasets.values() if label_names(d)), [])
        clients = {str(cid): _client_split(d, str(cid), cfg.test_fraction, seed) for cid, d in datasets.items()}
        if cfg.partition.kind != "natural":  # re-partition the pooled records (in client order)
            pooled = [r for s in clients.values() for r in (*s.train, *s.test)]
            clients = _partition(pooled, config)
    else:
        if cfg.partition.kind == "natural":
            raise DataError(
                "one dataset has no natural clients: set data.partition.kind (iid, dirichlet_sizes or "
                "dirichlet_labels) and data.partition.num_clients, or pass a dict of one dataset per client"
            )
        names = label_names(datasets)
        clients = _partition(materialise(datasets, "datasets="), config)
    clients = cap_examples(keep_largest(clients, cfg.max_clients), cfg.max_examples_per_client)
    return FederatedData(clients=clients, label_names=names)


def _client_split(dataset: Any, cid: str, test_fraction: float, seed: int) -> ClientSplit:
    if isinstance(dataset, Mapping) and set(dataset) == HELD_OUT_KEYS:  # the client's own held-out set
        return ClientSplit(materialise(dataset["train"], f"{cid}['train']"), materialise(dataset["test"], cid))
    records = materialise(dataset, f"datasets[{cid!r}]")
    return ClientSplit(*part.random_split(records, test_fraction, derive_rng(seed, "split", cid)))


def _partition(records: list[Any], config: Config) -> dict[str, ClientSplit]:
    cfg = config.data
    labels = [_label(r) for r in records] if cfg.partition.kind == "dirichlet_labels" else None
    parts = partition_indices(cfg.partition, len(records), labels, derive_rng(config.seed, "partition"))
    return {
        cid: ClientSplit(
            *part.random_split([records[i] for i in idx], cfg.test_fraction, derive_rng(config.seed, "split", cid))
        )
        for cid, idx in zip(client_ids(len(parts)), parts, strict=True)
    }


def text_record(row: Any, kind: str) -> Any:
    """A dataset row as the record a language-model task encodes (text, Alpaca instruction, labelled text)."""
    if kind == "causal_lm":
        if isinstance(row, str | Instruction):
            return row
        if isinstance(row, Mapping) and "text" in row:
            return str(row["text"])
        if isinstance(row, Mapping) and "instruction" in row and "output" in row:
            return Instruction(str(row["instruction"]), str(row.get("input") or ""), str(row["output"]))
    elif kind == "classification":
        if isinstance(row, LabelledText):
            return row
        if isinstance(row, Mapping) and "text" in row and ("label" in row or "labels" in row):
            return LabelledText(str(row["text"]), int(row["label"] if "label" in row else row["labels"]))
        if isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], str):
            return LabelledText(row[0], int(row[1]))
    keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
    wanted = "'text', or 'instruction' and 'output'" if kind == "causal_lm" else "'text' and 'label'"
    raise DataError(f"a {kind} model needs rows with {wanted}; got {keys}")


def _as_text_records(fed: FederatedData, kind: str) -> FederatedData:
    clients = {
        cid: ClientSplit([text_record(r, kind) for r in s.train], [text_record(r, kind) for r in s.test])
        for cid, s in fed.clients.items()
    }
    return FederatedData(clients=clients, label_names=fed.label_names)


# --------------------------------------------------------------------------------------------- model


def object_task(
    config: Config,
    objects: Objects,
    num_labels: int | None,
    cache_dir: Path,
    *,
    in_place: bool = False,
    as_is: bool = False,
) -> Task:
    """The task over a copy of the user's model (their object is never changed), or the config's model.
    ``in_place``: train the user's object itself (their own loop holds it and its optimizer), no tokenizer;
    ``as_is``: exchange its trainable parameters as they are (e.g. a Trainer's peft model), adding no LoRA."""
    if objects.model is None:
        return build_run_task(config, num_labels=num_labels, cache_dir=cache_dir)
    model = objects.model if in_place else copy.deepcopy(objects.model)
    kind = config.model.kind
    if kind == "module" or as_is:
        model.train()
        return PythonTask(model, loss=objects.loss, evaluate=objects.evaluate)
    if objects.tokenizer is None and not in_place:
        raise ModelError(f"a Hugging Face {type(model).__name__} needs its tokenizer: pass tokenizer=")
    from fedtune.tasks.causal_lm import CausalLMTask
    from fedtune.tasks.classification import ClassificationTask

    if config.model.lora is not None:
        with torch.random.fork_rng(devices=[]):  # LoRA's A matrices: seeded like build_task's
            torch.manual_seed(derive_seed(config.seed, "model-init"))
            model = apply_lora(
                model,
                config.model.lora,
                task_type=kind,
                freeze_a=config.server.lora_aggregation == "ffa",
            )
    freeze_local_params(model, config.personalization)  # as build_run_task: local parameters are never exchanged
    if config.client.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    task_cls = CausalLMTask if kind == "causal_lm" else ClassificationTask
    return task_cls(model, objects.tokenizer, config.model.max_length, config.model.compute_dtype)


def check_objects(config: Config, objects: Objects) -> None:
    """The objects cover what the config says came from Python, and a Python run stays in-process."""
    if config.data.source == "python" and objects.datasets is None:
        raise DataError("this config's data.source is 'python': pass the same datasets= again")
    if config.model.name.startswith(PYTHON_MODEL_PREFIX):
        if objects.model is None:
            raise ModelError(f"this config's model.name is {config.model.name!r}: pass the same model= again")
        if config.model.name != f"{PYTHON_MODEL_PREFIX}{type(objects.model).__name__}":
            raise ModelError(f"model= is a {type(objects.model).__name__}, the run was made with {config.model.name}")
    if (objects.loss is not None or objects.evaluate is not None) and config.model.kind != "module":
        raise ModelError("loss= and evaluate= apply to your own nn.Module (a Hugging Face model brings its own)")
    if config.simulation.backend != "inprocess" or config.simulation.client_nproc > 1:
        raise ConfigError(
            "a run built from Python objects runs in this process: simulation.backend must be 'inprocess' "
            "and simulation.client_nproc 1 (Ray actors and data-parallel ranks rebuild the model from the config)"
        )


def prepare_objects(config: Config, objects: Objects, console: Console | None) -> Prepared:
    """``session.prepare`` for Python objects."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    cache_dir = default_cache_dir(config.data.cache_dir)
    if objects.datasets is not None:
        fed = federated_objects(objects.datasets, config)
    else:
        fed = load_federated(config.data, seed=config.seed, cache_dir=cache_dir)
    num_labels = config.model.num_labels or (len(fed.label_names) or None)
    task = object_task(config, objects, num_labels, cache_dir)
    if task.kind in ("causal_lm", "classification") and objects.datasets is not None:
        fed = _as_text_records(fed, task.kind)
    prepared = prepare_worker(config, task, fed, cache_dir=cache_dir, num_labels=num_labels, console=console)
    if isinstance(task, PythonTask):
        first = next(iter(prepared.worker.records))
        task.check(prepared.worker.examples(first, train=True), prepared.worker.examples(first, train=False))
    return prepared
