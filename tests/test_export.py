"""Export round trips: the merged folder loads with plain transformers, the adapter with peft."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fedtune.config.schema import LoraConfig, ModelConfig
from fedtune.errors import ModelError
from fedtune.models.hub import load_causal_lm
from fedtune.models.lora import load_trainable, trainable_state
from fedtune.run.export import export_model
from fedtune.run.generate import generate_text
from fedtune.tasks.build import build_task
from fedtune.tasks.causal_lm import CausalLMTask


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # Converted models depend only on the installed model packages, so they are shared across sessions.
    return Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))


def _perturbed_tiny(model_cache: Path) -> CausalLMTask:
    # LoRA's B starts at zero, so a fresh adapter changes nothing; give it random values to make the
    # round trip meaningful.
    cfg = ModelConfig(name="tiny-llama", lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    task = build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)
    assert isinstance(task, CausalLMTask)
    gen = torch.Generator().manual_seed(0)
    load_trainable(
        task.module,
        {n: torch.randn(t.shape, generator=gen) * 0.5 for n, t in trainable_state(task.module).items()},
    )
    return task


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_causal_lm_export_round_trip(model_cache: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = _perturbed_tiny(model_cache)
    ids = torch.tensor([[1, 400, 2000, 35, 9, 77, 12000, 2]])
    expected = _logits(task.module, ids)
    base_logits = _logits(load_causal_lm("tiny-llama", model_cache)[0], ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3), "the adapter should change the output"
    before = trainable_state(task.module)

    written = export_model(task, tmp_path / "export")
    assert set(written) == {"adapter", "model"}
    adapter, merged = tmp_path / "export" / "adapter", tmp_path / "export" / "model"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert [p.name for p in (tmp_path / "export").iterdir() if p.name.startswith(".")] == []

    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not hasattr(plain, "peft_config")
    torch.testing.assert_close(_logits(plain, ids), expected, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(merged).chat_template

    base, _ = load_causal_lm("tiny-llama", model_cache)
    restored = PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(_logits(restored, ids), expected, atol=1e-4, rtol=1e-4)

    # the live task keeps its (unmerged) adapter
    after = trainable_state(task.module)
    assert list(after) == list(before) and all(torch.equal(after[n], before[n]) for n in before)
    torch.testing.assert_close(_logits(task.module, ids), expected)


def test_export_replaces_an_earlier_export(model_cache: Path, tmp_path: Path) -> None:
    task = _perturbed_tiny(model_cache)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "stale.txt").write_text("old")
    written = export_model(task, tmp_path, merged=False)
    assert set(written) == {"adapter"}
    assert not (tmp_path / "adapter" / "stale.txt").exists()
    assert not (tmp_path / "model").exists()


def test_full_parameter_export_is_the_model(model_cache: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name="tiny-llama", lora=None)
    task = build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)
    with torch.no_grad():
        task.module.model.norm.weight.mul_(1.5)
    ids = torch.tensor([[5, 6, 7]])
    written = export_model(task, tmp_path)
    assert set(written) == {"model"}
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), ids), _logits(task.module, ids)
    )


def test_module_export_is_a_safetensors_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedtune.models.cnn import digits_cnn

    cfg = ModelConfig(kind="module", factory="fedtune.models.cnn:digits_cnn", lora=None)
    task = build_task(cfg, num_labels=10, cache_dir=tmp_path, seed=0)
    export_model(task, tmp_path / "out")
    fresh = digits_cnn()
    fresh.load_state_dict(load_file(tmp_path / "out" / "model" / "model.safetensors"))
    x = torch.rand(2, 64)
    torch.testing.assert_close(fresh.eval()(x), task.module.eval()(x))
    with pytest.raises(ModelError, match="cannot generate"):
        generate_text(task, "hi")
