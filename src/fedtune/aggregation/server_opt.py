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
Moments are float32 (like the parameters); the arithmetic is done in float64 and rounded once.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


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
        return _f32(params.astype(np.float64) + self.lr * delta.astype(np.float64)), {}


@dataclass(frozen=True)
class ServerMomentum:
    """FedAvgM (Hsu et al. 2019): heavy-ball momentum on the pseudo-gradient, v <- beta v + delta."""

    lr: float = 1.0
    momentum: float = 0.9
    name: str = "momentum"

    def init(self, numel: int) -> Slots:
        return {"v": np.zeros(numel, np.float32)}

    def step(self, params: np.ndarray, delta: np.ndarray, slots: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Slots]:
        v = self.momentum * slots["v"].astype(np.float64) + delta.astype(np.float64)
        return _f32(params.astype(np.float64) + self.lr * v), {"v": _f32(v)}


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
        d = delta.astype(np.float64)
        m = self.beta1 * slots["m"].astype(np.float64) + (1.0 - self.beta1) * d
        v = self._second_moment(slots["v"].astype(np.float64), d * d)
        new = params.astype(np.float64) + self.lr * m / (np.sqrt(v) + self.tau)
        return _f32(new), {"m": _f32(m), "v": _f32(v)}


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
