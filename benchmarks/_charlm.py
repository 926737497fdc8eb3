"""Character-level language modelling on Shakespeare for the FedAvg benchmark (McMahan et al. 2017, sec. 3).

The model is the paper's: an 8-dimensional character embedding, two LSTM layers of 256 units and a softmax
over the characters, unrolled over 80 characters; it predicts every next character of a segment. The task
implements ``fedtune.tasks.base.Task`` so the benchmark runs through the product's ClientWorker and round loop.

Data: one client per (play, role) from ``fedtune.data.shakespeare.load_shakespeare``. A client's speeches are
joined with newlines and cut into non-overlapping 81-character segments (80 inputs, 80 targets). The IID
variant shuffles the same training segments and deals them evenly over the same clients (the paper's
balanced IID control).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.core.rng import derive_rng
from fedtune.tasks.base import Batch, EvalSums, Example

SEQ_LEN = 80
# printable ASCII plus newline; everything else maps to one "unknown" id 0
VOCAB = ["\x00", "\n", *[c for c in string.printable if c.isprintable()]]
CHAR_ID = {c: i for i, c in enumerate(VOCAB)}


def encode_text(text: str) -> torch.Tensor:
    return torch.tensor([CHAR_ID.get(c, 0) for c in text], dtype=torch.long)


def segments(speeches: Sequence[str], seq_len: int = SEQ_LEN) -> list[str]:
    """Non-overlapping windows of seq_len + 1 characters (the last partial window is dropped)."""
    text = "\n".join(speeches)
    return [text[i : i + seq_len + 1] for i in range(0, len(text) - seq_len, seq_len)]


class CharLSTM(nn.Module):
    """McMahan et al. 2017: embedding 8 -> LSTM 256 -> LSTM 256 -> softmax over characters."""

    def __init__(self, vocab: int = len(VOCAB), embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        out, _ = self.lstm(self.embed(ids))
        return self.head(out)


@dataclass
class CharTask:
    """A fedtune Task: records are 81-character segments; accuracy is per predicted character."""

    module: nn.Module
    kind: str = "module"
    reports_accuracy: bool = True
    compute_dtype: str = "float32"

    def encode(self, records: Sequence[str], *, train: bool) -> list[Example]:
        out = []
        for segment in records:
            ids = encode_text(segment)
            out.append({"input_ids": ids[:-1], "labels": ids[1:]})
        return out

    def collate(self, examples: Sequence[Example]) -> Batch:
        return {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "labels")}

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = self.module(batch["input_ids"])  # (B, T, V)
        labels = batch["labels"]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return loss, int(labels.numel())

    def eval_batch(self, batch: Batch) -> EvalSums:
        with torch.no_grad():
            logits = self.module(batch["input_ids"])
            labels = batch["labels"]
            flat_logits = logits.reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(flat_logits, labels.reshape(-1), reduction="sum")
            correct = int((logits.argmax(-1) == labels).sum())
        n = int(labels.numel())
        return EvalSums(loss_sum=float(loss), count=n, correct=correct, examples=n)


def select_clients(
    clients: dict, *, num_clients: int, min_train: int, max_train: int, max_test: int, seed: int
) -> dict[str, tuple[list[str], list[str]]]:
    """A seeded sample of (play, role) clients with at least ``min_train`` training segments.

    Each keeps its first ``max_train`` training segments and ``max_test`` held-out segments, which bounds
    the cost of a round on two CPU cores (the paper's clients are unbounded).
    """
    eligible = []
    for cid, split in clients.items():
        train, test = segments(split.train), segments(split.test)
        if len(train) >= min_train and test:
            eligible.append((cid, train[:max_train], test[:max_test]))
    if len(eligible) < num_clients:
        raise ValueError(f"only {len(eligible)} roles have {min_train}+ training segments")
    keep = sorted(derive_rng(seed, "bench-clients").choice(len(eligible), num_clients, replace=False).tolist())
    return {eligible[i][0]: (eligible[i][1], eligible[i][2]) for i in keep}


def iid_balanced(records: dict[str, tuple[list[str], list[str]]], seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """The paper's IID control: the same training segments shuffled and dealt evenly to the same clients.

    McMahan et al. 2017 compare the role split with "a balanced and IID dataset": every client gets the
    same number of segments (up to one), drawn uniformly from the pool. Each client keeps its own held-out
    segments (accuracy is measured on the pooled held-out set, identical for both partitions).
    """
    pool = [s for train, _ in records.values() for s in train]
    order = derive_rng(seed, "bench-iid").permutation(len(pool))
    share, extra = divmod(len(pool), len(records))
    out, pos = {}, 0
    for i, (cid, (_, test)) in enumerate(records.items()):
        take = share + (1 if i < extra else 0)
        out[cid] = ([pool[j] for j in order[pos : pos + take]], test)
        pos += take
    return out
