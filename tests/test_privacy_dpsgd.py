"""Local DP-SGD: the private gradient equals a plain PyTorch per-example loop (clip, sum, noise, scale) on
a CNN and on a LoRA causal LM; a parameter without a per-sample gradient is refused; epsilon is reported."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedtune.client.weights import TrainableView
from fedtune.config.privacy import DpSgdConfig
from fedtune.config.schema import ClientConfig, LoraConfig, ModelConfig
from fedtune.core.fit import LocalHooks
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.models.cnn import digits_cnn
from fedtune.privacy import accountant
from fedtune.privacy.dpsgd import DpSgd
from fedtune.privacy.errors import PrivacyError
from fedtune.privacy.noise import gaussian, noise_generator
from fedtune.tasks.module import ModuleTask

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

C = 0.05  # small enough that most examples are clipped, large enough that some are not


def instruction(view: TrainableView, **train) -> FitInstruction:
    cfg = ClientConfig(**{"local_steps": 1, "batch_size": 8, **train})
    return FitInstruction("c1", 2, view.read(), view.spec.digest, 5, cfg)


def private_grads(
    task, batch, cfg: DpSgdConfig, **train
) -> tuple[list[torch.Tensor], tuple[DpSgd, LocalHooks], FitInstruction]:
    view = TrainableView(task.module)
    dpsgd = DpSgd(cfg, state=f"memory:{uuid.uuid4().hex}")
    instr = instruction(view, **train)
    hooks = dpsgd.hooks(task, instr, view)
    task.module.train()
    for p in view.params:
        p.grad = None
    loss, _ = task.loss(batch)
    loss.backward()
    for hook in hooks.grad_hooks:
        hook()
    return [p.grad.detach().clone() for p in view.params], (dpsgd, hooks), instr


def oracle(task, examples: list[dict], per_example_loss, cfg: DpSgdConfig, instr, keep=None) -> list[torch.Tensor]:
    """Per-example gradients of each example's own loss, clipped, summed, noised, divided: by hand."""
    params = [p for p in task.module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i, ex in enumerate(examples):
        if keep is not None and not keep[i]:
            continue
        grads = torch.autograd.grad(per_example_loss(ex), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, cfg.max_grad_norm / (float(norm) + 1e-6))
        total = [t + g.double() * factor for t, g in zip(total, grads, strict=True)]
    numel = sum(p.numel() for p in params)
    noise = gaussian(
        numel,
        cfg.noise_multiplier * cfg.max_grad_norm,
        seed=instr.seed,
        scope=("dpsgd", instr.round, instr.client_id, 0, "noise"),
    )
    out, offset = [], 0
    for t, p in zip(total, params, strict=True):
        out.append(t + torch.from_numpy(noise[offset : offset + p.numel()]).view_as(p))
        offset += p.numel()
    return out


def test_cnn_private_gradient_matches_a_per_example_loop() -> None:
    torch.manual_seed(0)
    task = ModuleTask(digits_cnn(channels=4, hidden=16))
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    cfg = DpSgdConfig(noise_multiplier=0.7, max_grad_norm=C)
    got, _, instr = private_grads(task, {"x": x, "labels": y}, cfg)
    examples = [{"x": x[i : i + 1], "labels": y[i : i + 1]} for i in range(8)]
    want = oracle(task, examples, lambda ex: F.cross_entropy(task.module(ex["x"]), ex["labels"]), cfg, instr)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w / 8, rtol=1e-4, atol=1e-6)


def test_full_batch_poisson_mask_matches_the_loop() -> None:
    torch.manual_seed(1)
    task = ModuleTask(digits_cnn(channels=4, hidden=16))
    x, y = torch.randn(12, 64), torch.randint(0, 10, (12,))
    cfg = DpSgdConfig(noise_multiplier=0.5, max_grad_norm=C, sample_rate=0.5)
    got, _, instr = private_grads(task, {"x": x, "labels": y}, cfg, full_batch=True)
    keep = noise_generator(seed=instr.seed, scope=("dpsgd", 2, "c1", 0, "sample"), secure=False).random(12) < 0.5
    assert 0 < keep.sum() < 12
    examples = [{"x": x[i : i + 1], "labels": y[i : i + 1]} for i in range(12)]
    want = oracle(task, examples, lambda ex: F.cross_entropy(task.module(ex["x"]), ex["labels"]), cfg, instr, keep=keep)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w / (0.5 * 12), rtol=1e-4, atol=1e-6)


class Sneaky(torch.nn.Module):
    """A trainable parameter used outside any layer Opacus knows: no per-sample gradient for it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
        self.temperature = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.temperature


def test_a_parameter_without_per_sample_gradient_is_refused() -> None:
    task = ModuleTask(Sneaky())
    with pytest.raises(PrivacyError, match="temperature"):
        private_grads(task, {"x": torch.randn(4, 64), "labels": torch.randint(0, 10, (4,))}, DpSgdConfig())


def test_epsilon_is_reported_per_client_and_composes_over_rounds() -> None:
    task = ModuleTask(digits_cnn(channels=4, hidden=16))
    cfg = DpSgdConfig(noise_multiplier=1.3, max_grad_norm=1.0)
    _, (dpsgd, hooks), _ = private_grads(task, {"x": torch.randn(8, 64), "labels": torch.randint(0, 10, (8,))}, cfg)
    update = ClientUpdate("c1", 2, 40, np.zeros(3, np.float32), "x", metrics={"train_loss": 1.0})
    (finish,) = hooks.finish  # the fit's own finish books its cost
    out = finish(update)
    # one step of batch 8 over 40 examples touches one epoch: one Gaussian(z / 2) under replace-one
    one = accountant.epsilon([accountant.gaussian_replace_entry(1.3, 1)], cfg.delta)
    assert out.metrics["dpsgd_epsilon_round"] == pytest.approx(one)
    assert out.metrics["dpsgd_epsilon"] == pytest.approx(one) and out.metrics["train_loss"] == 1.0
    assert dpsgd.ledger("c1", round=3) == [accountant.gaussian_replace_entry(1.3, 1)]


@pytest.fixture(scope="module")
def lm_task():
    from fedtune.tasks.build import build_task

    cache = Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))
    try:
        return build_task(
            ModelConfig(name="tiny-llama", lora=LoraConfig(r=2), max_length=12),
            num_labels=None,
            cache_dir=cache,
            seed=0,
        )
    except Exception as err:  # the tiny model needs the SmolLM2 tokenizer package
        pytest.skip(f"tiny-llama unavailable: {err}")


def test_lora_causal_lm_gradient_is_per_example_despite_token_weighting(lm_task) -> None:
    """Examples of different lengths: the batch loss weights tokens, yet each clipped g_i must be the
    gradient of example i's own mean loss (else examples would be coupled through the token count)."""
    task = lm_task
    texts = ["To be, or not to be, that is the question.", "All the world's a stage.", "Friends, Romans, countrymen."]
    examples = task.encode(texts, train=False)[:3]
    assert len({len(e["input_ids"]) for e in examples}) > 1
    batch = task.collate(examples)
    cfg = DpSgdConfig(noise_multiplier=0.3, max_grad_norm=0.01)
    got, _, instr = private_grads(task, batch, cfg)
    assert len(got) == sum(1 for p in task.module.parameters() if p.requires_grad) > 0

    def own_loss(ex: dict) -> torch.Tensor:
        loss, _ = task.loss(task.collate([ex]))
        return loss

    want = oracle(task, examples, own_loss, cfg, instr)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w / len(examples), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    ("train", "epochs"),
    [
        ({"local_steps": 16}, 2),
        ({"local_steps": 15}, 2),
        ({"local_steps": 8}, 1),
        ({"local_steps": 9}, 2),
        ({"local_epochs": 2, "local_steps": None}, 2),
    ],
)
def test_epochs_are_counted_exactly_whatever_the_last_batch(train: dict, epochs: int) -> None:
    """72 examples in batches of 10 make 8 steps an epoch (the last of 2 examples): 16 steps are two epochs,
    and the accounting must say so (not the one epoch the last batch's size suggests)."""
    from dp_accounting import rdp

    from fedtune.client.train import LocalRun, local_train
    from fedtune.data.types import ArrayExample

    torch.manual_seed(0)
    task = ModuleTask(digits_cnn(channels=4, hidden=16))
    rng = np.random.default_rng(0)
    examples = task.encode([ArrayExample(rng.normal(size=64), int(rng.integers(10))) for _ in range(72)], train=True)
    cfg = DpSgdConfig(noise_multiplier=1.1, max_grad_norm=1.0)
    view = TrainableView(task.module)
    dpsgd = DpSgd(cfg, state=f"memory:{uuid.uuid4().hex}")
    instr = instruction(view, batch_size=10, **train)
    hooks = dpsgd.hooks(task, instr, view)
    result = local_train(task, examples, instr.train, LocalRun(5, 2, "c1"), hooks=hooks)
    update = ClientUpdate("c1", 2, result.num_examples, np.zeros(3, np.float32), "x")
    (finish,) = hooks.finish  # the fit's own finish books its cost
    out = finish(update)
    # the oracle: dp-accounting itself, `epochs` Gaussian mechanisms of sensitivity 2C under replace-one
    ref = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.1 / 2), epochs))
    assert out.metrics["dpsgd_steps"] == result.steps
    assert out.metrics["dpsgd_epsilon_round"] == pytest.approx(ref.get_epsilon(cfg.delta), rel=1e-6)
