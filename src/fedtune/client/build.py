"""Build the client-side extensions from the config: local-training hooks and update transforms.

Hooks change local training (a proximal term, a gradient correction, per-sample clipping); update
transforms change the reply after training (clip the whole update, quantise, mask). Both are plain
callables composed in order, so strategies and privacy mechanisms stack without subclassing the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedtune.client.worker import HookFactory
from fedtune.config.schema import Config
from fedtune.core.messages import ClientUpdate, FitInstruction

UpdateTransform = Callable[[ClientUpdate, FitInstruction], ClientUpdate]


@dataclass
class ClientExtensions:
    hook_factories: list[HookFactory] = field(default_factory=list)
    update_transforms: list[UpdateTransform] = field(default_factory=list)


def build_client_extensions(config: Config) -> ClientExtensions:
    return ClientExtensions()
