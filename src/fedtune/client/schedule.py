"""The local learning-rate schedule, with ``transformers.TrainingArguments``' names and formulas.

A client's schedule spans all of its local steps over the federation: ``federation.rounds`` rounds of
``steps_per_round`` optimizer steps each, with round r starting at step (r - 1) x steps_per_round. The
position comes from the round number alone (not from how often this client happened to be sampled), so it
is deterministic and a resumed run replays it exactly. The server sends the round count with every fit
(``FitInstruction.options[ROUNDS_OPTION]``); the factors are those of ``transformers.get_scheduler``
(constant, constant_with_warmup, linear, cosine with half a cycle), checked against it in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config.schema import ClientConfig
from fedtune.errors import ConfigError


@dataclass(frozen=True)
class LrSchedule:
    kind: str
    warmup: int  # warmup steps
    total: int  # the client's optimizer steps over the whole federation
    offset: int  # steps before this round

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at this round's ``step`` (0-based)."""
        return lr_factor(self.kind, self.offset + step, self.warmup, self.total)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """transformers' schedule lambdas at global ``step``."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ConfigError(f"unknown client.lr_scheduler_type {kind!r}")


def round_schedule(cfg: ClientConfig, *, steps_per_round: int, round_idx: int, rounds: int | None) -> LrSchedule:
    """The schedule of round ``round_idx`` (1-based) of ``rounds``."""
    if cfg.lr_scheduler_type == "constant":
        return LrSchedule("constant", 0, steps_per_round, 0)
    if rounds is None:
        raise ConfigError(
            f"client.lr_scheduler_type {cfg.lr_scheduler_type!r} spans the federation, but the server did not say "
            "how many rounds it has (a server older than this client?)"
        )
    total = rounds * steps_per_round
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)  # as TrainingArguments.get_warmup_steps
    return LrSchedule(cfg.lr_scheduler_type, warmup, total, (round_idx - 1) * steps_per_round)
