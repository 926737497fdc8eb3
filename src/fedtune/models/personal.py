"""Local parameters for personalisation: which trainable parameters stay on each client, frozen at build.

FedSA-LoRA keeps every LoRA B local; FedPer keeps what ``personalization.local_params`` names. Both are made
non-trainable when the model is built (like FFA-LoRA's A, ``fedtune.models.lora.freeze_lora_a``), so they
leave the exchanged vector, its spec digest and every message: server, clients, Ray actors and export all
build through ``fedtune.tasks.build.build_run_task`` and agree. During a client's own fit the client turns
them back on (``fedtune.client.personal``), trains them beside the shared part, and keeps them in its state.

Which parameters were made local is remembered per module object (``local_parameters``), because once
frozen they can no longer be told apart from the base model's frozen weights by ``requires_grad``.
"""

from __future__ import annotations

import fnmatch
import re
import weakref

import torch

from fedtune.config.personalization import PersonalizationConfig
from fedtune.errors import ModelError
from fedtune.models.lora import trainable_parameters

FEDSA_LOCAL = "*.lora_B.weight"  # FedSA-LoRA: every B matrix (stable names, peft's adapter label dropped)

_LOCAL: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Parameter]] = weakref.WeakKeyDictionary()


def local_patterns(cfg: PersonalizationConfig) -> list[str]:
    """The name patterns that stay local under ``cfg`` (empty: nothing is local)."""
    if cfg.method == "fedsa":
        return [FEDSA_LOCAL, *cfg.local_params]
    if cfg.method == "fedper":
        return list(cfg.local_params)
    return []


def matches(name: str, pattern: str) -> bool:
    """A shell glob over the whole name, or ``re:<regex>`` searched anywhere in it.

    >>> matches("base_model.model.classifier.modules_to_save.weight", "*classifier*")
    True
    >>> matches("model.layers.0.q_proj.lora_B.weight", "re:lora_B")
    True
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def freeze_local_params(module: torch.nn.Module, cfg: PersonalizationConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze (and remember) the trainable parameters ``cfg`` keeps local; returns them by stable name.

    Every pattern must match at least one trainable parameter and at least one must stay shared: a typo
    would otherwise silently share (or localise) everything."""
    patterns = local_patterns(cfg)
    if not patterns:
        return {}
    trainable = trainable_parameters(module)
    for pattern in patterns:
        if not any(matches(n, pattern) for n in trainable):
            raise ModelError(
                f"personalization: {pattern!r} matches no trainable parameter; names look like "
                f"{', '.join(list(trainable)[:4])}"
            )
    local = {n: p for n, p in trainable.items() if any(matches(n, pat) for pat in patterns)}
    if len(local) == len(trainable):
        raise ModelError(f"personalization: {patterns} match every trainable parameter, so nothing would be shared")
    for param in local.values():
        param.requires_grad_(False)
    _LOCAL[module] = local
    return local


def local_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters ``freeze_local_params`` made local in ``module`` (empty when none were)."""
    return _LOCAL.get(module, {})
