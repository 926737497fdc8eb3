"""The raw record types every data source yields, and the per-client split container."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")


@dataclass(frozen=True)
class LabelledText:
    """A classification example before tokenisation."""

    text: str
    label: int


@dataclass(frozen=True)
class Instruction:
    """An Alpaca-style example: the loss is taken on ``output`` only."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Completion:
    """A TRL standard prompt-completion pair: plain text, no chat template; the loss is on ``completion``."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Conversation:
    """A chat (TRL ``messages``, or a conversational prompt-completion pair): ``(role, content)`` turns.

    The loss is on the assistant turns from index ``train_from`` on (0: every assistant turn; for a
    prompt-completion pair, the first completion turn), rendered with the model's chat template.
    """

    messages: tuple[tuple[str, str], ...]
    train_from: int = 0


@dataclass(frozen=True)
class ArrayExample:
    """A dense feature vector (or image) with an integer label."""

    x: np.ndarray
    label: int


@dataclass(frozen=True)
class ClientSplit(Generic[R]):
    """One client's records: ``train`` for local training, ``test`` held out for evaluation."""

    train: list[R]
    test: list[R]


@dataclass(frozen=True)
class FederatedData(Generic[R]):
    """Clients in a fixed order (the order client ids are sampled from)."""

    clients: dict[str, ClientSplit[R]]
    label_names: list[str] = field(default_factory=list)  # classification only
