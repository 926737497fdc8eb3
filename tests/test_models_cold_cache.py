"""A first run (cold model cache) must draw exactly the same initial adapter as every later run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.config import parse_config
from fedtune.data.cache import default_cache_dir
from fedtune.models.lora import trainable_state
from fedtune.tasks.build import build_task


def test_cold_and_warm_cache_give_identical_initial_adapters(tmp_path: Path) -> None:
    warm = default_cache_dir(None)
    model_cfg = parse_config({"model": {"name": "tiny-llama", "lora": {"r": 4}}}).model
    build_task(model_cfg, num_labels=None, cache_dir=warm, seed=5)  # makes sure the SmolLM2 tokenizer exists
    cold = tmp_path / "cache"
    (cold / "models").mkdir(parents=True)
    # share the converted SmolLM2 (its tokenizer), but let tiny-llama be built from scratch in this cache
    (cold / "models" / "smollm2-135m-instruct").symlink_to(warm / "models" / "smollm2-135m-instruct")
    first = trainable_state(build_task(model_cfg, num_labels=None, cache_dir=cold, seed=5).module)
    again = trainable_state(build_task(model_cfg, num_labels=None, cache_dir=cold, seed=5).module)
    assert first.keys() == again.keys()
    for name in first:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)


@pytest.mark.slow
def test_gguf_conversion_on_first_run_does_not_shift_the_lora_init(tmp_path: Path) -> None:
    """Converting the GGUF draws random numbers (from_config); the seeded init must not see them."""
    model_cfg = parse_config({"model": {"name": "smollm2-135m-instruct", "lora": {"r": 2, "top_layers": 1}}}).model
    warm = trainable_state(build_task(model_cfg, num_labels=None, cache_dir=default_cache_dir(None), seed=5).module)
    cold = trainable_state(build_task(model_cfg, num_labels=None, cache_dir=tmp_path / "cache", seed=5).module)
    for name in warm:
        torch.testing.assert_close(cold[name], warm[name], rtol=0, atol=0)
