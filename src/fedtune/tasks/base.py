"""The Task protocol: the only thing the client trainer and the evaluator know about a model.

An *example* is a dict of 1-D tensors (``input_ids``, ``labels``, ...); ``collate`` stacks examples into a
batch. ``loss`` returns the mean loss of a batch together with the count it averages over (tokens for a
language model, examples for a classifier). ``eval_batch`` returns sums, so evaluation over many batches
and clients is weighted exactly (pooled perplexity is exp of the token-weighted mean loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from fedtune.core.messages import EvalSums

Example = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    kind: str  # "causal_lm" | "classification" | "module"
    module: torch.nn.Module  # the whole model; parameters with requires_grad=True are trained and exchanged
    reports_accuracy: bool  # True: metrics report accuracy; False: perplexity
    compute_dtype: str  # autocast dtype of forward and backward: "float32" (none) or "bfloat16"

    def encode(self, records: Sequence[Any], *, train: bool) -> list[Example]:
        """Records of one client into examples (tokenise, chunk, mask prompts)."""
        ...

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Stack examples into one batch (padding where needed)."""
        ...

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's counted units, number of counted units). Used for training."""
        ...

    def eval_batch(self, batch: Batch) -> EvalSums:
        """Summed loss, counted units and correct predictions of one batch, under no_grad."""
        ...
