"""Shared fixtures for the strategy tests: tiny tasks and a federation run through the real worker and loop.

(A module of helpers, not tests; named like the strategy tests so it sits with them.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedtune.client.build import strategy_extensions
from fedtune.client.worker import ClientWorker
from fedtune.config.schema import Config
from fedtune.core.rng import derive_rng
from fedtune.core.state import ServerState
from fedtune.server.build import build_strategy
from fedtune.server.loop import run_rounds
from fedtune.tasks.base import Batch, EvalSums, Example
from fedtune.transport.inprocess import InProcessTransport


@dataclass
class ArrayTask:
    """A fedtune Task over (x, y) records: ``mse`` (regression, y float) or ``ce`` (classes, y int)."""

    module: nn.Module
    loss_kind: str = "ce"
    kind: str = "module"
    reports_accuracy: bool = True
    compute_dtype: str = "float32"

    def encode(self, records: Sequence[tuple[np.ndarray, float]], *, train: bool) -> list[Example]:
        dtype = torch.long if self.loss_kind == "ce" else torch.float32
        return [{"x": torch.as_tensor(x, dtype=torch.float32), "y": torch.tensor(y, dtype=dtype)} for x, y in records]

    def collate(self, examples: Sequence[Example]) -> Batch:
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}

    def _losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.module(batch["x"])
        if self.loss_kind == "mse":
            return (out.squeeze(-1) - batch["y"]) ** 2, torch.zeros(len(out), dtype=torch.bool)
        return nn.functional.cross_entropy(out, batch["y"], reduction="none"), out.argmax(-1) == batch["y"]

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        losses, _ = self._losses(batch)
        return losses.mean(), len(losses)

    def eval_batch(self, batch: Batch) -> EvalSums:
        with torch.no_grad():
            losses, correct = self._losses(batch)
        n = len(losses)
        return EvalSums(float(losses.sum()), n, int(correct.sum()), n)


class LoraLinear(nn.Module):
    """A linear layer with a LoRA adapter laid out like peft's (base_layer, lora_A/B.default, scaling)."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out, bias=False)
        self.base_layer.weight.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})
        self.scaling = {"default": alpha / r}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.lora_B["default"](self.lora_A["default"](x))
        return self.base_layer(x) + self.scaling["default"] * adapter

    def effective_weight(self) -> torch.Tensor:
        a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
        return self.base_layer.weight + self.scaling["default"] * b @ a


class TinyLoraNet(nn.Module):
    """x (6) -> q_proj (LoRA, 6->5) -> tanh -> v_proj (LoRA, 5->3 classes)."""

    def __init__(self, r: int = 2, alpha: float = 4.0) -> None:
        super().__init__()
        self.q_proj = LoraLinear(6, 5, r, alpha)
        self.v_proj = LoraLinear(5, 3, r, alpha)
        with torch.no_grad():  # non-zero B so that products differ from the first round
            for layer in (self.q_proj, self.v_proj):
                layer.lora_B["default"].weight.normal_(0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


def classification_records(num_clients: int, *, seed: int = 0, dim: int = 6, classes: int = 3, skew: bool = True):
    """Gaussian blobs; with ``skew`` each client sees mostly one class (non-IID) and sizes differ."""
    rng = derive_rng(seed, "test-data")
    centers = rng.normal(0, 2.0, size=(classes, dim))
    records = {}
    for k in range(num_clients):
        n = 8 + 4 * (k % 3)
        probs = np.full(classes, 0.1 / (classes - 1)) if skew else np.full(classes, 1 / classes)
        if skew:
            probs[k % classes] = 0.9
        labels = rng.choice(classes, size=n + 4, p=probs)
        xs = centers[labels] + rng.normal(0, 1.0, size=(n + 4, dim))
        rows = [(x.astype(np.float32), int(y)) for x, y in zip(xs, labels, strict=True)]
        records[f"c{k}"] = (rows[:n], rows[n:])
    return records


def regression_records(num_clients: int, *, seed: int = 0, dim: int = 4):
    """Linear regression with a different true weight per client (client drift for SCAFFOLD)."""
    rng = derive_rng(seed, "test-regression")
    records = {}
    for k in range(num_clients):
        w = rng.normal(0, 1.0, size=dim) + k
        xs = rng.normal(0, 1.0, size=(6 + k, dim))
        ys = xs @ w
        rows = [(x.astype(np.float32), float(y)) for x, y in zip(xs, ys, strict=True)]
        records[f"c{k}"] = (rows, rows[:2])
    return records


def make_config(**sections: dict) -> Config:
    base: dict = {
        "seed": 3,
        "federation": {"rounds": 3, "clients_per_round": 4},
        "client": {"local_steps": 3, "batch_size": 4, "lr": 0.1, "optimizer": "sgd", "max_grad_norm": None},
        "eval": {"every": 1, "baseline": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return Config.model_validate(base)


def make_worker(task, records, *, seed: int = 0) -> ClientWorker:
    ext = strategy_extensions()
    return ClientWorker(task, records, hook_factories=ext.hook_factories, update_transforms=ext.update_transforms)


def run_federation(config: Config, task, records, *, state: ServerState | None = None, on_round=None):
    """Run config.federation.rounds through the real worker, transport, strategy and loop."""
    worker = make_worker(task, records)
    strategy = build_strategy(config, num_clients=len(records))
    if state is None:
        state = strategy.init_state(worker.current_params(), worker.view.spec)
    reports = []

    def record(new_state, report):
        reports.append(report)
        if on_round is not None:
            on_round(new_state, report)

    final = run_rounds(config, strategy, InProcessTransport(worker), state, on_round=record)
    return final, reports, worker


def seeded(module_factory, seed: int = 0):
    torch.manual_seed(seed)
    return module_factory()
