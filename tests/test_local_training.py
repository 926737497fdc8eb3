"""The built-in local loop's Trainer features: lr schedule with warmup across rounds, gradient accumulation,
gradient checkpointing. Oracles: transformers' own schedulers; one large batch; the loop without checkpointing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fedtune
from fedtune.client.schedule import lr_factor, round_schedule
from fedtune.client.train import LocalRun, local_train
from fedtune.config import parse_config
from fedtune.config.schema import ClientConfig
from fedtune.errors import ConfigError
from fedtune.tasks.python import PythonTask

KINDS = ["constant", "constant_with_warmup", "linear", "cosine"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedule_factors_equal_transformers(kind: str, warmup: int) -> None:
    from transformers import get_scheduler

    total = 60
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    oracle = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total + 3):  # and past the end
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        oracle.step()
    ours = [lr_factor(kind, step, warmup if kind != "constant" else 0, total) for step in range(total + 3)]
    assert ours == pytest.approx(expected, abs=1e-12)


def test_round_schedules_concatenate_to_one_federation_schedule() -> None:
    cfg = ClientConfig(local_steps=5, lr_scheduler_type="cosine", warmup_ratio=0.1)
    rounds = 4
    factors = [
        round_schedule(cfg, steps_per_round=5, round_idx=r, rounds=rounds).factor(s)
        for r in range(1, rounds + 1)
        for s in range(5)
    ]
    assert factors == [lr_factor("cosine", step, 2, 20) for step in range(20)]  # warmup = ceil(0.1 * 20)
    assert factors[0] == 0.0 and factors[2] == 1.0 and factors[-1] < 0.05


class Sum(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_the_loop_applies_the_schedule_at_the_rounds_position() -> None:
    # loss = sum(w): every gradient is 1, so plain SGD moves each weight by -lr x factor per step
    task = PythonTask(Sum(), loss=lambda model, batch: model.w.sum())
    examples = task.encode([(torch.zeros(3), 0)] * 4, train=True)
    cfg = ClientConfig(
        local_steps=3, lr=0.1, optimizer="sgd", max_grad_norm=None, lr_scheduler_type="linear", warmup_steps=2
    )
    for round_idx in (1, 2, 3):
        task.module.w.data.zero_()
        local_train(task, examples, cfg, LocalRun(0, round_idx, "a", rounds=3))
        steps = range((round_idx - 1) * 3, round_idx * 3)
        moved = -0.1 * sum(lr_factor("linear", s, 2, 9) for s in steps)
        assert task.module.w.detach().numpy() == pytest.approx(np.full(3, moved), abs=1e-6)
    with pytest.raises(ConfigError, match="how many rounds"):
        local_train(task, examples, cfg, LocalRun(0, 1, "a"))


def test_gradient_accumulation_equals_the_larger_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=g), torch.randint(0, 3, (32,), generator=g)

    def trained(batch_size: int, accumulate: int) -> torch.Tensor:
        torch.manual_seed(1)
        task = PythonTask(torch.nn.Linear(3, 3))
        cfg = ClientConfig(local_steps=6, batch_size=batch_size, gradient_accumulation_steps=accumulate, lr=0.05)
        result = local_train(task, task.encode(list(zip(x, y, strict=True)), train=True), cfg, LocalRun(0, 1, "a"))
        assert result.steps == 6
        return torch.cat([p.detach().flatten() for p in task.module.parameters()])

    big = trained(8, 1)  # 6 steps cross an epoch boundary (4 batches of 8 per epoch)
    assert torch.allclose(trained(4, 2), big, atol=1e-6)
    assert torch.allclose(trained(2, 4), big, atol=1e-6)
    assert not torch.allclose(trained(4, 1), big, atol=1e-3)  # the comparison can fail


def test_accumulation_over_epochs_counts_optimizer_steps() -> None:
    task = PythonTask(torch.nn.Linear(3, 2))
    examples = task.encode([(torch.randn(3), i % 2) for i in range(10)], train=True)
    cfg = ClientConfig(local_epochs=2, batch_size=4, gradient_accumulation_steps=2)
    # 2 epochs x 3 batches = 6 minibatches: 3 optimizer steps
    assert local_train(task, examples, cfg, LocalRun(0, 1, "a")).steps == 3


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match="has no warmup"):
        parse_config({"client": {"warmup_steps": 3}})
    with pytest.raises(ConfigError, match=r"only one of client\.warmup_steps"):
        parse_config({"client": {"lr_scheduler_type": "linear", "warmup_steps": 3, "warmup_ratio": 0.1}})
    with pytest.raises(ConfigError, match="gradient_checkpointing needs a Hugging Face model"):
        parse_config(
            {
                "model": {"kind": "module", "factory": "a:b", "lora": None},
                "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 2}},
                "client": {"gradient_checkpointing": True},
            }
        )
    with pytest.raises(ConfigError, match=r"larger client\.batch_size"):
        parse_config(
            {
                "client": {"gradient_accumulation_steps": 2},
                "server": {"weighting": "uniform"},
                "privacy": {"dpsgd": {"noise_multiplier": 1.0}},
            }
        )


def test_a_scheduled_run_resumed_after_a_crash_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    config = {
        "data": {"partition": {"kind": "iid", "num_clients": 3}},
        "federation": {"rounds": 3, "clients_per_round": 2},
        "client": {
            "local_steps": 3,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 2,
        },
        "run": {"plot": False},
    }
    calls = [0]

    def loss(model: torch.nn.Module, batch: list) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: 2 clients x 3 steps x 2 micro-batches per round
            calls[0] += 1
            if calls[0] > 24 and crash[0]:
                raise RuntimeError("power cut in round 3")
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(4, 2)

    crash = [False]
    full = fedtune.simulate(
        config | {"run": {"out_dir": str(tmp_path / "a"), "plot": False}},
        model=model(),
        datasets=data,
        loss=loss,
        quiet=True,
    )
    crash[0], calls[0] = True, 0
    with pytest.raises(RuntimeError, match="power cut"):
        fedtune.simulate(
            config | {"run": {"out_dir": str(tmp_path / "b"), "plot": False}},
            model=model(),
            datasets=data,
            loss=loss,
            quiet=True,
        )
    (run_dir,) = (tmp_path / "b").iterdir()
    crash[0] = False
    resumed = fedtune.simulate(model=model(), datasets=data, loss=loss, resume=run_dir, quiet=True)
    assert resumed.state.round == 3
    assert np.array_equal(resumed.state.params, full.state.params)


def test_gradient_checkpointing_gives_the_same_training(tmp_path: Path) -> None:
    from fedtune.tasks.build import build_run_task

    cache = Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))

    def run(checkpointing: bool) -> tuple[torch.nn.Module, np.ndarray]:
        config = parse_config(
            {
                "model": {"name": "tiny-llama", "max_length": 16, "lora": {"r": 2}},
                "data": {"source": "text", "path": "unused"},
                "client": {"local_steps": 3, "batch_size": 2, "gradient_checkpointing": checkpointing},
            }
        )
        task = build_run_task(config, num_labels=None, cache_dir=cache)
        examples = task.encode(["the cat sat on the mat and then it ran away from the dog " * 4], train=True)
        local_train(task, examples, config.client, LocalRun(0, 1, "a"))
        flat = torch.cat([p.detach().flatten() for p in task.module.parameters() if p.requires_grad])
        return task.module, flat.numpy()

    on_model, on = run(True)
    off_model, off = run(False)
    assert (
        on_model.get_base_model().is_gradient_checkpointing and not off_model.get_base_model().is_gradient_checkpointing
    )
    assert np.allclose(on, off, atol=1e-5) and not np.allclose(on, 0)
