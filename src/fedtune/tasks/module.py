"""``ModuleTask``: any ``nn.Module`` classifier on dense arrays (``ArrayExample``), all parameters trained.

Also home of the two small context helpers every task shares (evaluation mode, CPU autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedtune.data.types import ArrayExample
from fedtune.errors import DataError
from fedtune.tasks.base import Batch, EvalSums, Example

COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) and no autograd, restoring the caller's training flag afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def compute_context(compute_dtype: str) -> contextlib.AbstractContextManager[Any]:
    """CPU autocast for bfloat16 compute; parameters (the master weights) stay float32 either way."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    dtype = COMPUTE_DTYPES[compute_dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def classification_sums(logits: torch.Tensor, labels: torch.Tensor) -> EvalSums:
    """Summed CE, example count and correct predictions of one batch of logits."""
    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
    correct = int((logits.argmax(dim=-1) == labels).sum())
    n = int(labels.numel())
    return EvalSums(loss_sum=float(loss_sum), count=n, correct=correct, examples=n)


class ModuleTask:
    kind = "module"
    reports_accuracy = True
    compute_dtype = "float32"

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def encode(self, records: Sequence[ArrayExample], *, train: bool) -> list[Example]:
        return [_encode_array(r) for r in records]

    def collate(self, examples: Sequence[Example]) -> Batch:
        return {key: torch.stack([ex[key] for ex in examples]) for key in ("x", "labels")}

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = self.module(batch["x"])
        return F.cross_entropy(logits, batch["labels"]), int(batch["labels"].numel())

    def eval_batch(self, batch: Batch) -> EvalSums:
        with eval_mode(self.module):
            return classification_sums(self.module(batch["x"]), batch["labels"])


def _encode_array(record: Any) -> Example:
    if not isinstance(record, ArrayExample):
        raise DataError(f"a module task encodes ArrayExample records, got {type(record).__name__}")
    x = torch.from_numpy(np.asarray(record.x, dtype=np.float32).copy())
    return {"x": x, "labels": torch.tensor(int(record.label), dtype=torch.long)}
