"""Export a trained task for use outside fedtune.

* ``out_dir/model/``: the global model with the adapter merged into a copy of its base weights, saved with
  its tokenizer, so plain ``AutoModelFor*.from_pretrained(out_dir / "model")`` loads it without peft. In the
  exact LoRA modes (fedex, svd, flora) the base weights already hold W0 + s R (``load_trained_task`` puts
  the residual there), so this folder is exactly the model the server's evaluation saw.
* ``out_dir/adapter/``: the peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``). A peft
  adapter cannot carry a dense residual, so when the run has one the adapted layers' base weights
  W0 + s R are written next to it (``base_weights.safetensors``, keyed by the plain base model's parameter
  names). ``load_adapter_export(base, out_dir / "adapter")`` replaces those weights and puts the adapter
  on; ``PeftModel.from_pretrained`` alone would give W0 + s B A, which is not the federated model.
* for ``model.kind: module``: ``out_dir/model/model.safetensors`` holding the module's state dict.
* ``--client ID --finetuned`` of a client that fine-tuned at its own rank r_k below the adapter's (flora /
  hetlora / flexlora): the adapter is written at rank r_k (``r: r_k`` in adapter_config.json, A (r_k, in),
  B (out, r_k) in the client's units, scaled by alpha / r_k as it trained), so plain peft loads exactly the
  model the client evaluated; the merged folder is that model too.

Each folder is written next to its destination and renamed into place, so a failed export never leaves
a folder that looks complete.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from fedtune.client.hooks import base_weight
from fedtune.core.keys import RESIDUAL_PREFIX
from fedtune.errors import ModelError
from fedtune.models.gguf_cache import write_folder_atomically
from fedtune.models.loading import HF_LOADING
from fedtune.tasks.base import Task

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
BASE_WEIGHTS = "base_weights.safetensors"  # adapted layers' W0 + s R, next to the adapter (residual modes)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_run(
    run_dir: Path,
    out_dir: Path,
    *,
    merged: bool = True,
    dtype: str | None = None,
    client: str | None = None,
    finetuned: bool = False,
    client_state: str | None = None,
) -> dict[str, Path]:
    """``fedtune export``: the global model of a run directory's last checkpoint, residual included;
    ``dtype`` (float32, bfloat16, float16) casts the written floating-point weights (default: as trained).
    ``client``: that client's personalised model instead (``fedtune.run.personal_export``; ``finetuned``: its
    model fine-tuned after the last round; ``client_state``: the store address, default the run's)."""
    from fedtune.run.artifacts import global_extras, load_trained_task
    from fedtune.run.rundir import load_run_config

    adapter_rank = None
    if client is not None:
        from fedtune.core.state import load_state
        from fedtune.run.personal_export import finetuned_rank, personal_task
        from fedtune.run.rundir import CHECKPOINT

        task = personal_task(run_dir, client, finetuned=finetuned, state=client_state)
        state = load_state(Path(run_dir) / CHECKPOINT)
        adapter_rank = finetuned_rank(run_dir, client, state=client_state) if finetuned else None
    elif finetuned or client_state is not None:
        raise ModelError("--finetuned and --client-state need --client (whose model to export)")
    else:
        task, state = load_trained_task(run_dir)
    extras = global_extras(load_run_config(run_dir), state)
    changed = [k.removeprefix(RESIDUAL_PREFIX) for k in extras if k.startswith(RESIDUAL_PREFIX)]
    return export_model(task, out_dir, merged=merged, changed_base=changed, dtype=dtype, adapter_rank=adapter_rank)


def load_state_of(run_dir: Path):
    from fedtune.core.state import load_state
    from fedtune.run.rundir import CHECKPOINT

    return load_state(Path(run_dir) / CHECKPOINT)


def export_model(
    task: Task,
    out_dir: Path,
    *,
    merged: bool = True,
    changed_base: Collection[str] = (),
    dtype: str | None = None,
    adapter_rank: tuple[int, bool] | None = None,
) -> dict[str, Path]:
    """Write the adapter and (``merged``) the merged model under ``out_dir``; returns what was written.

    ``changed_base``: the LoRA layers (names as in ``lora/residual/<module>``) whose base weights in ``task``
    hold a federated residual; their base weights are written next to the adapter. ``dtype``: cast the
    floating-point weights of every written folder (the task itself is left as it is). ``adapter_rank``:
    (r_k, rsLoRA) to write the adapter at a client's rank r_k (its vector holds zeros beyond r_k).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cast = DTYPES[dtype] if dtype is not None else None
    out_dir = Path(out_dir)
    module = task.module
    if task.kind == "module":
        return {MODEL_DIR: _replace(out_dir / MODEL_DIR, lambda tmp: _save_state_dict(module, tmp, cast))}
    if not hasattr(module, "save_pretrained"):
        raise ModelError(f"cannot export a {task.kind} model of type {type(module).__name__}")
    tokenizer = getattr(task, "tokenizer", None)
    written: dict[str, Path] = {}
    if _is_peft(module):
        base_weights = _base_weights(module, changed_base)
        written[ADAPTER_DIR] = _replace(
            out_dir / ADAPTER_DIR, lambda tmp: _save_adapter(module, base_weights, tmp, cast, adapter_rank)
        )
        if merged:
            written[MODEL_DIR] = _replace(out_dir / MODEL_DIR, lambda tmp: _save_merged(module, tokenizer, tmp, cast))
    elif changed_base:
        raise ModelError("a model without LoRA adapters cannot hold a LoRA residual")
    else:  # full-parameter training: the model itself is the export
        full = copy.deepcopy(module).to(cast) if cast is not None else module
        written[MODEL_DIR] = _replace(out_dir / MODEL_DIR, lambda tmp: _save_hf(full, tokenizer, tmp))
    return written


def load_adapter_export(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """The exported adapter on ``base`` (a fresh base model, modified in place), residual included."""
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / BASE_WEIGHTS).is_file():
        weights = load_file(str(adapter_dir / BASE_WEIGHTS))
        with torch.no_grad():
            for name, value in weights.items():
                param = base.get_parameter(name)
                if tuple(param.shape) != tuple(value.shape):
                    raise ModelError(
                        f"{BASE_WEIGHTS}: {name} is {tuple(value.shape)}, the base model's is {tuple(param.shape)}"
                    )
                param.copy_(value.to(param.dtype))
    with HF_LOADING:  # transformers' loading contexts are process-global (models/loading.py)
        return PeftModel.from_pretrained(base, adapter_dir)


def _is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "merge_and_unload")


def _base_weights(module: torch.nn.Module, layers: Collection[str]) -> dict[str, torch.Tensor]:
    """Each named LoRA layer's base weight, keyed by its name in the plain base model (peft's wrapper
    prefixes and ``base_layer`` dropped), so ``base.get_parameter(name)`` finds it."""
    base = module.get_base_model()
    names = {id(p): n for n, p in base.named_parameters()}
    out = {}
    for layer_name in layers:
        weight = base_weight(module.get_submodule(layer_name))
        plain = names[id(weight)].replace(".base_layer.", ".")  # the name the unwrapped model uses
        out[plain] = weight.detach().to("cpu", copy=True).contiguous()
    return out


def _replace(target: Path, write: Callable[[Path], None]) -> Path:
    # An earlier export is replaced as a whole, never mixed with new files.
    if target.exists():
        shutil.rmtree(target)
    return write_folder_atomically(target, write)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _save_adapter(
    module: torch.nn.Module,
    base_weights: dict[str, torch.Tensor],
    out: Path,
    dtype: torch.dtype | None,
    rank: tuple[int, bool] | None = None,
) -> None:
    from safetensors.torch import load_file, save_file

    module.save_pretrained(out, safe_serialization=True)
    if rank is not None:
        _to_client_rank(out, *rank)
    if dtype is not None:  # peft writes the live (float32) adapter; cast the file rather than the model
        for path in out.rglob("*.safetensors"):
            save_file(_cast(load_file(str(path)), dtype), str(path), metadata={"format": "pt"})
    if base_weights:
        save_file(_cast(base_weights, dtype), str(out / BASE_WEIGHTS), metadata={"format": "pt"})


def _to_client_rank(out: Path, rank: int, rslora: bool) -> None:
    """Rewrite a saved rank-r adapter (global units, zero beyond ``rank``) as the rank-``rank`` adapter it is:
    A[:r_k], B[:, :r_k] s / s_k (``fedtune.aggregation.lora_ranks``), ``r: r_k`` (alpha unchanged)."""
    import json

    from safetensors.torch import load_file, save_file

    from fedtune.aggregation.lora_ranks import scale_ratio

    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    full = int(config["r"])
    if config.get("rank_pattern"):
        raise ModelError("an adapter with a peft rank_pattern cannot be written at a client's rank")
    if rank >= full:
        return
    ratio = scale_ratio(rank, full, rslora=rslora)
    for path in out.rglob("adapter_model.safetensors"):
        tensors = load_file(str(path))
        for name, value in list(tensors.items()):
            if name.endswith("lora_A.weight"):
                tensors[name] = value[:rank].contiguous()
            elif name.endswith("lora_B.weight"):
                tensors[name] = (value[:, :rank] / ratio).contiguous()
            elif "lora_" in name:
                raise ModelError(f"cannot write {name} at a client's rank (only lora_A / lora_B)")
        save_file(tensors, str(path), metadata={"format": "pt"})
    config["r"] = rank
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _save_merged(module: torch.nn.Module, tokenizer: object, out: Path, dtype: torch.dtype | None) -> None:
    # merge on a copy: merge_and_unload rewrites the base weights, and the live task must keep its adapter;
    # merged in float32, then cast once (no rounding inside W0 + s B A)
    merged = copy.deepcopy(module).merge_and_unload()
    _save_hf(merged.to(dtype) if dtype is not None else merged, tokenizer, out)


def _save_hf(model: torch.nn.Module, tokenizer: object, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _save_state_dict(module: torch.nn.Module, out: Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = _cast({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
