"""LoRA adapters through peft, and the trainable-parameter state that federated rounds exchange.

``trainable_state`` names drop peft's adapter label (``lora_A.default.weight`` -> ``lora_A.weight``) so
the names do not depend on what the adapter was called; the same helpers serve full-parameter training
(no LoRA), where every parameter is trainable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from fedtune.config.schema import LoraConfig
from fedtune.errors import ModelError

log = logging.getLogger(__name__)

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
# Classifier heads of AutoModelForSequenceClassification models (BERT-likes: classifier, Llama-likes: score).
HEAD_NAMES = ("classifier", "score")
# Encoders such as BERT/MiniLM call their attention projections query/key/value, while the config default
# follows Llama (q_proj/v_proj). Translating keeps the default usable for both families.
ENCODER_ALIASES = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
# peft containers whose next name component is the adapter label
_ADAPTER_CONTAINERS = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "modules_to_save",
}


def _leaf_names(model: torch.nn.Module) -> set[str]:
    """Last name component of every Linear/Embedding/Conv1D-like module (what LoRA can target)."""
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if name and _is_adaptable(mod)}


def _is_adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear | torch.nn.Embedding) or type(module).__name__ == "Conv1D"


def _resolve_targets(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    available = _leaf_names(model)
    resolved = [t if t in available else ENCODER_ALIASES.get(t, t) for t in wanted]
    missing = [t for t, r in zip(wanted, resolved, strict=True) if r not in available]
    if missing:
        raise ModelError(
            f"lora.target_modules {missing} match no layer of {type(model).__name__}; "
            f"adaptable layer names are: {', '.join(sorted(available))}"
        )
    if resolved != wanted:
        log.info("LoRA target modules %s resolved to %s for %s", wanted, resolved, type(model).__name__)
    return resolved


def classifier_head(model: torch.nn.Module) -> str | None:
    children = dict(model.named_children())
    return next((name for name in HEAD_NAMES if name in children), None)


def apply_lora(
    model: torch.nn.Module, lora_cfg: LoraConfig, *, task_type: str, freeze_a: bool = False
) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA model; only adapters (and a classifier head) stay trainable.

    LoRA's A matrices draw from torch's global RNG: seed it first for a reproducible init. ``freeze_a``
    (FFA-LoRA) leaves them at that init and out of the trainable set, so only B (and a head) is exchanged.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if task_type not in TASK_TYPES:
        raise ModelError(f"LoRA task_type must be one of {sorted(TASK_TYPES)}, got {task_type!r}")
    modules_to_save = None
    if task_type == "classification":
        head = classifier_head(model)
        if head is None:
            raise ModelError(f"{type(model).__name__} has no classifier head named one of {HEAD_NAMES}")
        # the head is freshly initialised, so it must train alongside the adapters
        modules_to_save = [head]
    layers = None
    if lora_cfg.top_layers is not None:
        total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if total is None:
            raise ModelError(
                f"lora.top_layers needs a transformer with config.num_hidden_layers; {type(model).__name__} has none"
            )
        if lora_cfg.top_layers > total:
            raise ModelError(f"lora.top_layers is {lora_cfg.top_layers} but the model has {total} layers")
        layers = list(range(total - lora_cfg.top_layers, total))
    peft_cfg = PeftLoraConfig(
        layers_to_transform=layers,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        use_rslora=lora_cfg.use_rslora,
        lora_dropout=lora_cfg.dropout,
        target_modules=_resolve_targets(model, list(lora_cfg.target_modules)),
        modules_to_save=modules_to_save,
        task_type=TASK_TYPES[task_type],
    )
    peft_model = get_peft_model(model, peft_cfg)
    if freeze_a:
        freeze_lora_a(peft_model)
    return peft_model


def freeze_lora_a(module: torch.nn.Module) -> list[str]:
    """FFA-LoRA (Sun et al. 2024): make every LoRA A matrix non-trainable; returns their stable names.

    The values stay what the (seeded) initialisation drew, so every client that builds the model from the
    same seed holds the same A; that is what makes averaging B alone exact. A frozen parameter is outside
    ``trainable_parameters``, so it leaves the exchanged vector (and the spec digest) and the optimiser.
    """
    adapters = _adapter_names(module)
    frozen = []
    for name, param in module.named_parameters():
        parts = name.split(".")
        if "lora_A" in parts or "lora_embedding_A" in parts:
            param.requires_grad_(False)
            frozen.append(stable_name(name, adapters))
    if not frozen:
        raise ModelError(f"{type(module).__name__} has no LoRA A matrices to freeze (FFA-LoRA needs LoRA adapters)")
    return frozen


def _adapter_names(module: torch.nn.Module) -> set[str]:
    return set(getattr(module, "peft_config", {}) or {}) | {"default"}


def stable_name(name: str, adapter_names: set[str]) -> str:
    """``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``; other names unchanged."""
    parts = name.split(".")
    kept = [
        part
        for i, part in enumerate(parts)
        if not (i > 0 and part in adapter_names and parts[i - 1] in _ADAPTER_CONTAINERS)
    ]
    return ".".join(kept)


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by stable name, in registration order (tied parameters appear once)."""
    adapters = _adapter_names(module)
    return {stable_name(n, adapters): p for n, p in module.named_parameters() if p.requires_grad}


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters, by stable name, in a fixed order."""
    return {name: p.detach().clone() for name, p in trainable_parameters(module).items()}


def load_trainable(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters in place; keys and shapes must match exactly."""
    params = trainable_parameters(module)
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    if missing or unexpected:
        raise ModelError(
            f"trainable state does not match the model: missing {_preview(missing)}, unexpected {_preview(unexpected)}"
        )
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ModelError(
                f"trainable state {name!r} has shape {tuple(state[name].shape)}, the model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(dtype=param.dtype))


def _preview(names: list[str], limit: int = 3) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())
