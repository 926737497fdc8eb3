"""Transport-neutral messages between the server and clients. Arrays are flat float32."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.config.schema import ClientConfig
from fedtune.errors import ClientStateLost


@dataclass(frozen=True)
class FitInstruction:
    """What a sampled client is asked to do in one round."""

    client_id: str
    round: int
    params: np.ndarray  # the global trainable vector (read-only for the client)
    spec_digest: str
    seed: int  # the run's seed; the client derives its own streams from (seed, round, client_id)
    # the client section of the config, validated once where it was loaded (or decoded off the wire)
    train: ClientConfig
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # strategy payloads (e.g. control variates)
    options: dict[str, Any] = field(default_factory=dict)  # strategy scalars (e.g. proximal mu)
    # async mode (FedBuff): the server's model version ``params`` is; the reply echoes it (None: a sync round)
    version: int | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply: the change of its trainable vector and how many examples produced it."""

    client_id: str
    round: int
    num_examples: int
    delta: np.ndarray  # local - global, flat float32
    spec_digest: str
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    bytes_down: int = 0  # bytes the client received for this round (filled by the transport)
    bytes_up: int = 0  # bytes the client sent
    version: int | None = None  # async mode: the model version it trained on (FitInstruction.version)


@dataclass(frozen=True)
class HeldUpdate:
    """A client's reply under networked secure aggregation: it trained and keeps its update, which only the
    SecAgg protocol's sum will contain. No delta travels, so none is made up here."""

    client_id: str
    round: int
    num_examples: int
    spec_digest: str
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0


Reply = ClientUpdate | HeldUpdate  # what a fit task may answer besides a ClientFailure


@dataclass(frozen=True)
class EvalInstruction:
    """Evaluate the global model (``params`` plus ``extras``) on one client's test data."""

    client_id: str
    round: int
    params: np.ndarray
    spec_digest: str
    batch_size: int
    max_examples: int | None
    # the rest of the global model, from strategy.eval_payload (e.g. LoRA residuals "lora/residual/<module>")
    extras: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSums:
    """Additive evaluation statistics: summed loss, counted units, correct predictions."""

    loss_sum: float = 0.0
    count: int = 0
    correct: int = 0
    examples: int = 0

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(
            self.loss_sum + other.loss_sum,
            self.count + other.count,
            self.correct + other.correct,
            self.examples + other.examples,
        )

    def metrics(self, *, accuracy: bool) -> dict[str, float]:
        """loss and either accuracy (classifiers) or perplexity (language models)."""
        if self.count == 0:
            return {}
        loss = self.loss_sum / self.count
        out = {"loss": loss}
        if accuracy:
            out["accuracy"] = self.correct / max(self.examples, 1)
        else:
            out["perplexity"] = math.exp(min(loss, 50.0))
        return out


@dataclass(frozen=True)
class ClientEval:
    client_id: str
    round: int
    sums: EvalSums  # the global model's
    # the same held-out examples under the client's own models (fedtune.client.personal): "personal" (its
    # personalised model), "finetuned" (after the last round, locally fine-tuned); empty without personalisation
    personal: dict[str, EvalSums] = field(default_factory=dict)
    bytes_down: int = 0  # bytes the client received for this evaluation (filled by the transport)


class Cause(enum.Enum):
    """What kind of failure a ClientFailure is, where the server can act on it (the reason is for people)."""

    ERROR = "error"  # anything else: the client's task failed, was rejected, timed out
    # the instruction relied on client state the client does not hold (fedtune.errors.ClientStateLost): the
    # server can send what it lost (strategy.client_state_lost) and ask again
    STATE_LOST = "state-lost"


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not produce a usable reply, and why (logged, never silent)."""

    client_id: str
    round: int
    reason: str
    cause: Cause = Cause.ERROR


def failure_of(client_id: str, round: int, err: BaseException, *, reason: str | None = None) -> ClientFailure:
    """The failure a client's task ended with when it raised ``err`` (``reason``: its text, default str(err)),
    typed by the error's class, so every transport reports the same cause for the same error."""
    cause = Cause.STATE_LOST if isinstance(err, ClientStateLost) else Cause.ERROR
    return ClientFailure(client_id, round, str(err) if reason is None else reason, cause)
