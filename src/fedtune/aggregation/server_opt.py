"""Server optimisers for FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

Each round the server treats the aggregated client change ``delta`` (a weighted mean of local - global) as a
pseudo-gradient step direction and applies one optimiser step to the global vector. The optimisers are
small stateless objects: their moments live in a ``slots`` dict that the caller keeps in ServerState.arrays,
so a checkpoint of the state resumes the optimiser exactly. ``step`` never mutates its inputs.

    sgd       x <- x + eta * delta                                   (FedAvg when eta = 1)
    momentum  v <- beta * v + delta;  x <- x + eta * v               (FedAvgM, Hsu et al. 2019)
    adagrad   m <- b1 m + (1-b1) delta;  v <- v + delta^2;           x <- x + eta m / (sqrt(v) + tau)
    adam      m <- b1 m + (1-b1) delta;  v <- b2 v + (1-b2) delta^2; x <- x + eta m / (sqrt(v) + tau)
    yogi      m as adam;  v <- v - (1-b2) delta^2 sign(v - delta^2); x <- x + eta m / (sqrt(v) + tau)

As in the paper there is no bias correction, and v starts at tau^2 (Algorithm 2: "v_{-1} >= tau^2"), so
the first adaptive step is bounded by eta * (1-b1) |delta| / (sqrt(tau^2 + ...) + tau) rather than blowing up.
Moments are float32 (like the parameters); the arithmetic is done in float64 and rounded once. Each rule is
elementwise, so ``_step_blockwise`` runs it on blocks of 64K values into fresh float32 outputs: bit-identical to
whole-vector float64 arithmetic, with no model-sized temporaries (a float64 copy of a 100 MB model is 200 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Slots = dict[str, np.ndarray]


class ServerOptimizer(Protocol):
    name: str

    def init(self, numel: int) -> Slots:
        """Fresh optimiser state for a vector of ``numel`` values."""
        ...

    def step(self, params: np.ndarray, delta: np.ndarray, slots: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Slots]:
        """(new params, new slots); ``params``, ``delta`` and ``slots`` are left untouched."""
        ...


# One rule on float64 blocks: (params, delta, slots) -> (new params, new slots).
Rule = Callable[[np.ndarray, np.ndarray, Slots], tuple[np.ndarray, Slots]]
_BLOCK = 1 << 16  # values per block: each float64 temporary is 512 KiB, whatever the model size


def _step_blockwise(
    rule: Rule, params: np.ndarray, delta: np.ndarray, slots: Mapping[str, np.ndarray], names: tuple[str, ...]
) -> tuple[np.ndarray, Slots]:
    """``rule`` on float64 copies of each block, rounded once into new float32 arrays.

    Memory beyond the inputs is the outputs (new params, new slots) and a few blocks of scratch. The inputs
    are only read: a previous ServerState that still holds them stays a valid value.
    """
    for name, array in (("delta", delta), *((f"slot {n!r}", slots[n]) for n in names)):
        if array.shape != params.shape:
            raise ValueError(f"{name} has shape {array.shape}, the parameters {params.shape}")
    new_params = np.empty(params.size, np.float32)
    new_slots = {name: np.empty(params.size, np.float32) for name in names}
    for start in range(0, params.size, _BLOCK):
        b = slice(start, start + _BLOCK)
        old = {name: slots[name][b].astype(np.float64) for name in names}
        x, new = rule(params[b].astype(np.float64), delta[b].astype(np.float64), old)
        new_params[b] = x  # float64 -> float32, round to nearest: the one rounding
        for name in names:
            new_slots[name][b] = new[name]
    return new_params, new_slots


@dataclass(frozen=True)
class ServerSGD:
    """x <- x + lr * delta. With lr = 1 this is plain FedAvg.

    >>> p, s = ServerSGD(lr=0.5).step(np.zeros(2, np.float32), np.array([2, -4], np.float32), {})
    >>> p.tolist()
    [1.0, -2.0]
    """

    lr: float = 1.0
    name: str = "sgd"

    def init(self, numel: int) -> Slots:
        return {}

    def step(self, params: np.ndarray, delta: np.ndarray, slots: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Slots]:
        return _step_blockwise(self._rule, params, delta, slots, ())

    def _rule(self, x: np.ndarray, d: np.ndarray, slots: Slots) -> tuple[np.ndarray, Slots]:
        return x + self.lr * d, {}


@dataclass(frozen=True)
class ServerMomentum:
    """FedAvgM (Hsu et al. 2019): heavy-ball momentum on the pseudo-gradient, v <- beta v + delta."""

    lr: float = 1.0
    momentum: float = 0.9
    name: str = "momentum"

    def init(self, numel: int) -> Slots:
        return {"v": np.zeros(numel, np.float32)}

    def step(self, params: np.ndarray, delta: np.ndarray, slots: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Slots]:
        return _step_blockwise(self._rule, params, delta, slots, ("v",))

    def _rule(self, x: np.ndarray, d: np.ndarray, slots: Slots) -> tuple[np.ndarray, Slots]:
        v = self.momentum * slots["v"] + d
        return x + self.lr * v, {"v": v}


@dataclass(frozen=True)
class ServerAdaptive:
    """FedAdagrad / FedAdam / FedYogi: one object, the second-moment rule picked by ``name``."""

    name: str  # "adagrad" | "adam" | "yogi"
    lr: float = 0.01  # eta (server learning rate)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: larger tau makes the step more SGD-like

    def __post_init__(self) -> None:
        if self.name not in ("adagrad", "adam", "yogi"):
            raise ValueError(f"unknown adaptive server optimiser {self.name!r}")

    def init(self, numel: int) -> Slots:
        return {"m": np.zeros(numel, np.float32), "v": np.full(numel, self.tau**2, np.float32)}

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        if self.name == "adagrad":
            return v + d2
        if self.name == "adam":
            return self.beta2 * v + (1.0 - self.beta2) * d2
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)  # yogi: additive, sign-controlled

    def step(self, params: np.ndarray, delta: np.ndarray, slots: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Slots]:
        return _step_blockwise(self._rule, params, delta, slots, ("m", "v"))

    def _rule(self, x: np.ndarray, d: np.ndarray, slots: Slots) -> tuple[np.ndarray, Slots]:
        m = self.beta1 * slots["m"] + (1.0 - self.beta1) * d
        v = self._second_moment(slots["v"], d * d)
        return x + self.lr * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}


SERVER_OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "yogi")


def make_server_optimizer(
    name: str, *, lr: float, momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerOptimizer:
    """The registry: a validated name to an optimiser object."""
    if name == "sgd":
        return ServerSGD(lr=lr)
    if name == "momentum":
        return ServerMomentum(lr=lr, momentum=momentum)
    if name in ("adagrad", "adam", "yogi"):
        return ServerAdaptive(name=name, lr=lr, beta1=beta1, beta2=beta2, tau=tau)
    raise ValueError(f"unknown server optimizer {name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")
