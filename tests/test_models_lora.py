"""LoRA on tiny-llama and MiniLM: what trains, stable names, seeded init, state round trips."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fedtune.config.schema import LoraConfig, ModelConfig
from fedtune.errors import ModelError
from fedtune.models.lora import (
    apply_lora,
    count_parameters,
    freeze_lora_a,
    load_trainable,
    stable_name,
    trainable_state,
)
from fedtune.tasks.build import build_task


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # Converted models depend only on the installed model packages, so they are shared across sessions
    # (the first SmolLM2 conversion takes ~35 s; later loads well under a second).
    return Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))


def tiny_cfg(**overrides: object) -> ModelConfig:
    base = {"kind": "causal_lm", "name": "tiny-llama", "lora": LoraConfig(r=4, alpha=8), "max_length": 32}
    return ModelConfig(**{**base, **overrides})


def test_only_adapters_train_and_names_are_stable(model_cache: Path) -> None:
    task = build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=0)
    state = trainable_state(task.module)
    assert state, "LoRA must leave something trainable"
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in state)
    assert not any(".default" in n for n in state)
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(state) == 8
    trainable, total = count_parameters(task.module)
    assert trainable == sum(t.numel() for t in state.values()) < total / 10
    again = build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=0)
    assert list(trainable_state(again.module)) == list(state)
    assert task.module.training  # build_task hands back a model ready to train


def test_same_seed_same_init_different_seed_differs(model_cache: Path) -> None:
    a = trainable_state(build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=7).module)
    b = trainable_state(build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=7).module)
    c = trainable_state(build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=8).module)
    assert all(torch.equal(a[n], b[n]) for n in a)
    lora_a = [n for n in a if "lora_A" in n]
    assert any(not torch.equal(a[n], c[n]) for n in lora_a)


def test_build_does_not_disturb_global_rng(model_cache: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_load_trainable_round_trip_and_validation(model_cache: Path) -> None:
    task = build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=0)
    state = {n: torch.randn_like(t) for n, t in trainable_state(task.module).items()}
    load_trainable(task.module, state)
    back = trainable_state(task.module)
    assert all(torch.equal(back[n], state[n]) for n in state)

    name = next(iter(state))
    with pytest.raises(ModelError, match="missing"):
        load_trainable(task.module, {n: t for n, t in state.items() if n != name})
    with pytest.raises(ModelError, match="unexpected"):
        load_trainable(task.module, {**state, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="shape"):
        load_trainable(task.module, {**state, name: torch.zeros(3, 3)})


def test_trainable_state_is_a_snapshot(model_cache: Path) -> None:
    task = build_task(tiny_cfg(), num_labels=None, cache_dir=model_cache, seed=0)
    state = trainable_state(task.module)
    name = next(iter(state))
    before = state[name].clone()
    with torch.no_grad():
        for p in task.module.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert torch.equal(state[name], before)


def test_full_parameter_mode_trains_everything(model_cache: Path) -> None:
    task = build_task(tiny_cfg(lora=None), num_labels=None, cache_dir=model_cache, seed=0)
    trainable, total = count_parameters(task.module)
    assert trainable == total
    state = trainable_state(task.module)
    assert "model.embed_tokens.weight" in state
    load_trainable(task.module, state)


def test_unknown_target_module_names_the_choices(model_cache: Path) -> None:
    cfg = tiny_cfg(lora=LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ModelError, match=r"qkv.*q_proj"):
        build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)


def test_classifier_head_stays_trainable_with_lora(model_cache: Path) -> None:
    # the default targets q_proj/v_proj are translated to BERT's query/value
    cfg = ModelConfig(kind="classification", name="all-minilm-l6-v2", lora=LoraConfig(r=4), max_length=32)
    task = build_task(cfg, num_labels=3, cache_dir=model_cache, seed=0)
    names = list(trainable_state(task.module))
    assert any("classifier" in n for n in names)
    assert any("query.lora_A" in n for n in names) and any("value.lora_B" in n for n in names)
    assert not any("key" in n or "embeddings" in n for n in names)
    head = [n for n in names if "classifier" in n]
    twin = build_task(cfg, num_labels=3, cache_dir=model_cache, seed=0)
    a, b = trainable_state(task.module), trainable_state(twin.module)
    assert all(torch.equal(a[n], b[n]) for n in head)


def test_classification_needs_a_head() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ModelError, match="classifier head"):
        apply_lora(model, LoraConfig(target_modules=["0"]), task_type="classification")


def test_stable_name_strips_only_adapter_labels() -> None:
    adapters = {"default"}
    assert stable_name("m.q_proj.lora_A.default.weight", adapters) == "m.q_proj.lora_A.weight"
    assert stable_name("m.classifier.modules_to_save.default.bias", adapters) == "m.classifier.modules_to_save.bias"
    assert stable_name("m.default.weight", adapters) == "m.default.weight"


def _lora_a(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_ffa_freezes_a_at_build_and_exchanges_only_b_and_the_head(model_cache: Path, kind: str) -> None:
    """FFA-LoRA: the exchanged vector is B (and a classifier head) only; A keeps its seeded init."""
    if kind == "causal_lm":
        cfg = tiny_cfg()
    else:
        cfg = ModelConfig(kind="classification", name="all-minilm-l6-v2", lora=LoraConfig(r=4), max_length=32)
    plain = build_task(cfg, num_labels=3, cache_dir=model_cache, seed=5)
    ffa = build_task(cfg, num_labels=3, cache_dir=model_cache, seed=5, freeze_lora_a=True)
    everything, exchanged = trainable_state(plain.module), trainable_state(ffa.module)
    b_and_head = {n: t for n, t in everything.items() if ".lora_A." not in n}
    assert list(exchanged) == list(b_and_head) and any(".lora_B." in n for n in exchanged)
    assert (kind == "classification") == any("classifier" in n for n in exchanged)
    numel = sum(t.numel() for t in exchanged.values())
    assert numel == sum(t.numel() for t in b_and_head.values()) == count_parameters(ffa.module)[0]
    # A is still there, frozen, and drawn from the same seeded stream: identical on every client
    twin = build_task(cfg, num_labels=3, cache_dir=model_cache, seed=5, freeze_lora_a=True)
    frozen, reference = _lora_a(ffa.module), _lora_a(plain.module)
    assert all(torch.equal(frozen[n], t) for n, t in _lora_a(twin.module).items())
    assert frozen and all(not p.requires_grad for n, p in ffa.module.named_parameters() if ".lora_A." in n)
    assert list(frozen) == list(reference) and all(torch.equal(frozen[n], reference[n]) for n in frozen)
    assert any(frozen[n].abs().max() > 0 for n in frozen)  # a real (non-zero) init, not a placeholder


def test_freezing_a_needs_lora(model_cache: Path) -> None:
    with pytest.raises(ModelError, match=r"needs model\.lora"):
        build_task(tiny_cfg(lora=None), num_labels=None, cache_dir=model_cache, seed=0, freeze_lora_a=True)
    with pytest.raises(ModelError, match="no LoRA A"):
        freeze_lora_a(torch.nn.Linear(3, 3))
