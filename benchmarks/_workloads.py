"""Benchmark workloads with the same shapes as the Flower baseline harness (../shared/tools/flower-baseline):
a ~1.0M-parameter char-level causal transformer on synthetic tokens (workload "A"), and the 9.6k-parameter
micro MLP (workload "C"). Defined here independently; only the shapes and sizes are shared."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedtune.tasks.base import Batch, EvalSums, Example

VOCAB, SEQ = 128, 32


class CharTransformer(nn.Module):
    """Pre-norm causal transformer: d=128, 5 layers, 4 heads, ff=512 (~1.03M parameters)."""

    def __init__(self, d: int = 128, layers: int = 5, heads: int = 4, ff: int = 512) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(SEQ, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, VOCAB)
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t))
        return self.head(self.ln(self.blocks(h, mask=self.mask[:t, :t], is_causal=True)))


def micro_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


class SyntheticTask:
    """A Task over pre-made tensors: records are already examples {"x", "y"}."""

    kind = "module"
    reports_accuracy = False
    compute_dtype = "float32"

    def __init__(self, module: nn.Module, *, sequence: bool) -> None:
        self.module = module
        self.sequence = sequence

    def encode(self, records: Sequence[Example], *, train: bool) -> list[Example]:
        return list(records)

    def collate(self, examples: Sequence[Example]) -> Batch:
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}

    def _logits_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.module(batch["x"])
        if self.sequence:
            return out.reshape(-1, out.shape[-1]), batch["y"].reshape(-1)
        return out, batch["y"]

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        logits, y = self._logits_targets(batch)
        return nn.functional.cross_entropy(logits, y), int(y.numel())

    def eval_batch(self, batch: Batch) -> EvalSums:
        logits, y = self._logits_targets(batch)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        return EvalSums(float(loss), int(y.numel()), 0, len(batch["x"]))


def client_examples(workload: str, client: int, n: int) -> list[Example]:
    gen = torch.Generator().manual_seed(1_000_003 * client + 17)
    if workload == "A":
        x = torch.randint(0, VOCAB, (n, SEQ + 1), generator=gen)
        return [{"x": row[:-1], "y": row[1:]} for row in x]
    xs, ys = torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return [{"x": a, "y": b} for a, b in zip(xs, ys, strict=True)]


def build(workload: str) -> SyntheticTask:
    torch.manual_seed(0)
    if workload == "A":
        return SyntheticTask(CharTransformer(), sequence=True)
    return SyntheticTask(micro_mlp(), sequence=False)


def smollm2_config(num_hidden_layers: int = 30, vocab_size: int = 49152, **extra: object) -> object:
    """SmolLM2-135M-Instruct's architecture (hidden 576, 9 query / 3 key-value heads of 64, tied embeddings) as
    a ``transformers.LlamaConfig``, for random-weight models of its shape (nothing downloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        **extra,
    )
