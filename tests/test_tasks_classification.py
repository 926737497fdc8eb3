"""ClassificationTask on MiniLM, ModuleTask on the digits CNN, and build_task's factory path."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedtune.config.schema import LoraConfig, ModelConfig
from fedtune.data.types import ArrayExample, LabelledText
from fedtune.errors import ConfigError, DataError, ModelError
from fedtune.models.lora import trainable_state
from fedtune.tasks.build import build_task, import_factory
from fedtune.tasks.classification import ClassificationTask
from fedtune.tasks.module import ModuleTask

TEXTS = [
    LabelledText("The match ended in a dramatic penalty shoot-out.", 0),
    LabelledText("Shares fell sharply after the quarterly results.", 1),
    LabelledText("The new phone has a faster chip and a better camera.", 2),
    LabelledText("Parliament voted on the budget late last night.", 1),
    LabelledText("Ok", 0),
]


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # Converted models depend only on the installed model packages, so they are shared across sessions.
    return Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))


@pytest.fixture(scope="module")
def clf(model_cache: Path) -> ClassificationTask:
    cfg = ModelConfig(kind="classification", name="all-minilm-l6-v2", lora=LoraConfig(r=4), max_length=12)
    task = build_task(cfg, num_labels=3, cache_dir=model_cache, seed=0)
    assert isinstance(task, ClassificationTask)
    return task


def test_encode_truncates_and_collate_pads(clf: ClassificationTask) -> None:
    examples = clf.encode(TEXTS, train=True)
    assert len(examples) == len(TEXTS)
    assert max(len(ex["input_ids"]) for ex in examples) == 12
    batch = clf.collate(examples)
    assert batch["input_ids"].shape == (5, 12)
    assert batch["labels"].tolist() == [0, 1, 2, 1, 0]
    short = len(examples[-1]["input_ids"])
    assert batch["attention_mask"][-1].sum() == short
    assert (batch["input_ids"][-1, short:] == clf.tokenizer.pad_token_id).all()


def test_loss_and_eval_counts(clf: ClassificationTask) -> None:
    batch = clf.collate(clf.encode(TEXTS, train=True))
    sums = clf.eval_batch(batch)
    with torch.no_grad():
        clf.module.eval()
        logits = clf.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert sums.count == sums.examples == 5
    assert sums.correct == int((logits.argmax(-1) == batch["labels"]).sum())
    assert sums.loss_sum == pytest.approx(float(F.cross_entropy(logits, batch["labels"], reduction="sum")), rel=1e-5)
    loss, count = clf.loss(batch)  # eval mode here: no dropout, so it equals the eval mean
    assert count == 5
    assert float(loss.detach()) == pytest.approx(sums.loss_sum / 5, rel=1e-5)
    assert 0.0 <= sums.metrics(accuracy=True)["accuracy"] <= 1.0


def test_label_out_of_range_is_a_data_error(clf: ClassificationTask) -> None:
    with pytest.raises(DataError, match="label 7"):
        clf.encode([LabelledText("x", 7)], train=True)


def test_classification_needs_num_labels(model_cache: Path) -> None:
    cfg = ModelConfig(kind="classification", name="all-minilm-l6-v2", max_length=12)
    with pytest.raises(ModelError, match="num_labels"):
        build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)


def _digits(n: int, seed: int = 0) -> list[ArrayExample]:
    rng = np.random.default_rng(seed)
    return [ArrayExample(rng.random(64).astype(np.float32), int(rng.integers(10))) for _ in range(n)]


def module_cfg(**kwargs: object) -> ModelConfig:
    return ModelConfig(kind="module", factory="fedtune.models.cnn:digits_cnn", lora=None, factory_kwargs=kwargs)


def test_module_task_trains_all_parameters(tmp_path: Path) -> None:
    task = build_task(module_cfg(channels=4, hidden=8), num_labels=10, cache_dir=tmp_path, seed=0)
    assert isinstance(task, ModuleTask) and task.reports_accuracy
    batch = task.collate(task.encode(_digits(6), train=True))
    assert batch["x"].shape == (6, 64) and batch["labels"].shape == (6,)
    loss, count = task.loss(batch)
    assert count == 6
    loss.backward()
    assert all(p.grad is not None for p in task.module.parameters())
    sums = task.eval_batch(batch)
    assert sums.count == sums.examples == 6 and 0 <= sums.correct <= 6
    assert sums.loss_sum == pytest.approx(float(loss.detach()) * 6, rel=1e-5)
    assert len(trainable_state(task.module)) == len(list(task.module.parameters()))


def test_module_init_is_seeded(tmp_path: Path) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        return trainable_state(build_task(module_cfg(), num_labels=10, cache_dir=tmp_path, seed=seed).module)

    a, b, c = state(1), state(1), state(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_module_task_rejects_other_records(tmp_path: Path) -> None:
    task = build_task(module_cfg(), num_labels=10, cache_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match="ArrayExample"):
        task.encode(["text"], train=True)


def test_factory_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"package\.module:callable"):
        import_factory("fedtune.models.cnn")
    with pytest.raises(ModelError, match="cannot import module"):
        import_factory("fedtune.no_such_module:make")
    with pytest.raises(ModelError, match="no attribute"):
        import_factory("fedtune.models.cnn:nope")
    with pytest.raises(ModelError, match="factory_kwargs"):
        build_task(module_cfg(bogus=1), num_labels=10, cache_dir=tmp_path, seed=0)
    bad = ModelConfig(kind="module", factory="fedtune.errors:ModelError", lora=None)
    with pytest.raises(ModelError, match=r"not a torch\.nn\.Module"):
        build_task(bad, num_labels=10, cache_dir=tmp_path, seed=0)
