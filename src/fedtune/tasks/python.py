"""``PythonTask``: a user's own ``nn.Module`` with the user's own loss and evaluation, given in Python.

What ``fedtune.simulate(model=..., datasets=..., loss=..., evaluate=...)`` trains when the model is not a
Hugging Face language model. Records are the user's dataset items, unchanged: a ``(x, y)`` pair, a dict (a
``datasets.Dataset`` row), or anything ``torch.utils.data.default_collate`` stacks. The user's functions see
the model and a collated batch:

* ``loss(model, batch) -> Tensor``: the mean loss of the batch (default: cross-entropy of ``model(x)``
  against ``y`` for a pair, or against ``batch["labels"]`` given ``batch["x"]``);
* ``evaluate(model, batch) -> {"loss": float, "accuracy": float (optional)}``: means over the batch,
  weighted by batch size across batches and clients (default: the loss, plus accuracy under the default
  cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from fedtune.data.types import ArrayExample
from fedtune.errors import DataError
from fedtune.tasks.base import Batch, EvalSums, Example
from fedtune.tasks.module import classification_sums, eval_mode

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
EvalFn = Callable[[torch.nn.Module, Any], Mapping[str, float]]


def as_record(item: Any) -> Any:
    """A dataset item as a record ``default_collate`` stacks: arrays and lists of numbers become tensors."""
    if isinstance(item, ArrayExample):
        return {"x": torch.as_tensor(np.asarray(item.x, dtype=np.float32)), "labels": torch.tensor(int(item.label))}
    if isinstance(item, Mapping):
        return {k: _tensor_or_value(v) for k, v in item.items()}
    if isinstance(item, tuple):
        return tuple(_tensor_or_value(v) for v in item)
    return _tensor_or_value(item)


def _tensor_or_value(value: Any) -> Any:
    # floats become float32 (what a module's parameters are; default_collate would make Python floats float64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32)
    if isinstance(value, np.ndarray) or (isinstance(value, list) and value and isinstance(value[0], int | float)):
        array = np.asarray(value)
        return torch.as_tensor(array.astype(np.float32) if array.dtype == np.float64 else array)
    if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
        return value.float()
    return value


def batch_size(batch: Any) -> int:
    """Examples in a collated batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    raise DataError("cannot tell the batch size: a batch needs at least one tensor with a batch dimension")


def _inputs_and_labels(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "x" in batch and ("labels" in batch or "label" in batch):
        return batch["x"], batch["labels"] if "labels" in batch else batch["label"]
    raise DataError(
        "the default loss is cross-entropy on (x, y) pairs or {'x', 'labels'} dicts; for other items pass "
        "loss=fn(model, batch) -> Tensor (and evaluate=fn(model, batch) -> {'loss': ...})"
    )


class PythonTask:
    kind = "module"
    compute_dtype = "float32"  # your module runs as you built it

    def __init__(self, module: torch.nn.Module, loss: LossFn | None = None, evaluate: EvalFn | None = None) -> None:
        self.module = module
        self._loss = loss
        self._evaluate = evaluate
        # accuracy is reported under the default cross-entropy; an evaluate function that returns
        # "accuracy" switches it on (see check)
        self.reports_accuracy = loss is None and evaluate is None

    def encode(self, records: Sequence[Any], *, train: bool) -> list[Example]:
        return [as_record(r) for r in records]

    def collate(self, examples: Sequence[Example]) -> Batch:
        return default_collate(list(examples))

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        n = batch_size(batch)
        if self._loss is not None:
            value = self._loss(self.module, batch)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise DataError(f"loss(model, batch) must return a scalar tensor, got {type(value).__name__}")
            return value, n
        x, y = _inputs_and_labels(batch)
        return F.cross_entropy(self.module(x), y), n

    def eval_batch(self, batch: Batch) -> EvalSums:
        n = batch_size(batch)
        with eval_mode(self.module):
            if self._evaluate is not None:
                return _sums(self._evaluate(self.module, batch), n)
            if self._loss is not None:
                return EvalSums(loss_sum=float(self._loss(self.module, batch)) * n, count=n, examples=n)
            x, y = _inputs_and_labels(batch)
            return classification_sums(self.module(x), y)

    def check(self, train: Sequence[Example], test: Sequence[Example]) -> None:
        """Try the loss and evaluation once on two examples before any round, so that a mismatch between the
        items and the functions is an error now rather than a failure of every client in every round; and
        report accuracy if the user's evaluate returns one."""
        with eval_mode(self.module):
            self.loss(self.collate(train[:2]))
            if self._evaluate is not None and test:
                self.reports_accuracy = "accuracy" in self._evaluate(self.module, self.collate(test[:2]))


def _sums(metrics: Mapping[str, float], n: int) -> EvalSums:
    if "loss" not in metrics:
        raise DataError(f"evaluate(model, batch) must return a mapping with 'loss', got keys {sorted(metrics)}")
    correct = round(float(metrics["accuracy"]) * n) if "accuracy" in metrics else 0
    return EvalSums(loss_sum=float(metrics["loss"]) * n, count=n, correct=correct, examples=n)
