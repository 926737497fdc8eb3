"""Export a trained task for use outside fedtune.

* ``out_dir/adapter/``: the peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``), which
  ``PeftModel.from_pretrained(base, out_dir / "adapter")`` puts back on the base model;
* ``out_dir/model/``: the adapter merged into a copy of the base weights, saved with its tokenizer, so
  plain ``AutoModelFor*.from_pretrained(out_dir / "model")`` loads it without peft;
* for ``model.kind: module``: ``out_dir/model/model.safetensors`` holding the module's state dict.

Each folder is written next to its destination and renamed into place, so a failed export never leaves
a folder that looks complete.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from fedtune.errors import ModelError
from fedtune.models.gguf_cache import write_folder_atomically
from fedtune.tasks.base import Task

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def export_model(task: Task, out_dir: Path, *, merged: bool = True) -> dict[str, Path]:
    """Write the adapter and (``merged``) the merged model under ``out_dir``; returns what was written."""
    out_dir = Path(out_dir)
    module = task.module
    if task.kind == "module":
        return {MODEL_DIR: _replace(out_dir / MODEL_DIR, lambda tmp: _save_state_dict(module, tmp))}
    if not hasattr(module, "save_pretrained"):
        raise ModelError(f"cannot export a {task.kind} model of type {type(module).__name__}")
    tokenizer = getattr(task, "tokenizer", None)
    written: dict[str, Path] = {}
    if _is_peft(module):
        written[ADAPTER_DIR] = _replace(out_dir / ADAPTER_DIR, lambda tmp: _save_adapter(module, tmp))
        if merged:
            written[MODEL_DIR] = _replace(out_dir / MODEL_DIR, lambda tmp: _save_merged(module, tokenizer, tmp))
    else:  # full-parameter training: the model itself is the export
        written[MODEL_DIR] = _replace(out_dir / MODEL_DIR, lambda tmp: _save_hf(module, tokenizer, tmp))
    return written


def _is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "merge_and_unload")


def _replace(target: Path, write: Callable[[Path], None]) -> Path:
    # An earlier export is replaced as a whole, never mixed with new files.
    if target.exists():
        shutil.rmtree(target)
    return write_folder_atomically(target, write)


def _save_adapter(module: torch.nn.Module, out: Path) -> None:
    module.save_pretrained(out, safe_serialization=True)


def _save_merged(module: torch.nn.Module, tokenizer: object, out: Path) -> None:
    # merge on a copy: merge_and_unload rewrites the base weights, and the live task must keep its adapter
    merged = copy.deepcopy(module).merge_and_unload()
    _save_hf(merged, tokenizer, out)


def _save_hf(model: torch.nn.Module, tokenizer: object, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _save_state_dict(module: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
