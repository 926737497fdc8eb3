"""``ClassificationTask``: an encoder with a sequence-classification head on ``LabelledText`` records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.data.types import LabelledText
from fedtune.errors import DataError
from fedtune.tasks.base import Batch, EvalSums, Example, Task
from fedtune.tasks.module import classification_sums, compute_context, eval_mode


class ClassificationTask:
    kind = "classification"
    reports_accuracy = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, compute_dtype: str = "float32") -> None:
        compute_context(compute_dtype)  # validates the name early
        self.module = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.compute_dtype = compute_dtype
        self.num_labels = int(model.config.num_labels)

    @property
    def label_names(self) -> list[str]:
        """The class names in id order, as the model's config holds them (its ``id2label``)."""
        id2label = self.module.config.id2label or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.num_labels)]

    def set_label_names(self, names: Sequence[str]) -> None:
        """Name the classes in the model's config (``id2label``/``label2id``), which an export writes out."""
        if len(names) != self.num_labels:
            raise DataError(f"{len(names)} label names {list(names)} for a model with {self.num_labels} classes")
        self.module.config.id2label = {i: str(n) for i, n in enumerate(names)}
        self.module.config.label2id = {str(n): i for i, n in enumerate(names)}

    def encode(self, records: Sequence[LabelledText], *, train: bool) -> list[Example]:
        for r in records:
            self._check(r)
        if not records:
            return []
        enc = self.tokenizer(
            [r.text for r in records], truncation=True, max_length=self.max_length, add_special_tokens=True
        )
        return [
            {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(r.label, dtype=torch.long),
            }
            for ids, r in zip(enc["input_ids"], records, strict=True)
        ]

    def _check(self, record: Any) -> None:
        if not isinstance(record, LabelledText):
            raise DataError(f"a classification task encodes LabelledText records, got {type(record).__name__}")
        if not 0 <= record.label < self.num_labels:
            raise DataError(f"label {record.label} is outside the model's {self.num_labels} classes")

    def collate(self, examples: Sequence[Example]) -> Batch:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, ex in enumerate(examples):
            input_ids[i, : len(ex["input_ids"])] = ex["input_ids"]
            attention_mask[i, : len(ex["input_ids"])] = 1
        labels = torch.stack([ex["labels"] for ex in examples])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _logits(self, batch: Batch) -> torch.Tensor:
        with compute_context(self.compute_dtype):
            out = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float()

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        return F.cross_entropy(self._logits(batch), batch["labels"]), int(batch["labels"].numel())

    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        """Class probabilities, one row per text (``fedtune predict``)."""
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        with torch.no_grad(), eval_mode(self.module):
            return torch.softmax(self._logits(enc), dim=-1)

    def eval_batch(self, batch: Batch) -> EvalSums:
        with eval_mode(self.module):
            return classification_sums(self._logits(batch), batch["labels"])


def name_labels(task: Task, names: Sequence[str]) -> list[str]:
    """Put the data's class names on a classifier (its export's ``id2label``); the names it now holds."""
    if not isinstance(task, ClassificationTask) or not names:
        return []
    if len(names) != task.num_labels and list(names) == [str(i) for i in range(len(names))]:
        return []  # integer labels below a larger model.num_labels: nothing to name, keep the model's defaults
    if len(names) != task.num_labels:
        raise DataError(
            f"the data has {len(names)} classes {list(names)[:10]} but model.num_labels is {task.num_labels}"
        )
    task.set_label_names(names)
    return list(names)
