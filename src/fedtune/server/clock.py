"""FedBuff's simulated clock: who is training, on which model version, and who arrives next.

The schedule is a pure function of the config and the seed, never of the data or of how long training really
took: each client has a speed factor drawn once (lognormal, plus a seeded slow tail), each dispatch costs
``local_steps x seconds_per_step x factor x jitter`` simulated seconds, and the next arrival is the in-flight
client that finishes first (ties broken by dispatch order). A freed slot goes to a client drawn uniformly from
those neither training nor already in the buffer being filled, so a client contributes at most once per step
(which DP's sensitivity bound relies on). The whole schedule is a JSON-able ``Schedule`` value kept in
``ServerState.extra``, so a resumed run continues the same timeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from fedtune.config.asynchronous import ClientSpeedConfig
from fedtune.core.rng import derive_rng


@dataclass(frozen=True)
class InFlight:
    client_id: str
    dispatch: int  # 1-based dispatch counter: the client's random streams use it where a sync run has the round
    version: int  # completed server steps when dispatched: the model it trains on
    start: float  # simulated seconds
    finish: float


@dataclass(frozen=True)
class Schedule:
    clock: float = 0.0  # simulated seconds
    dispatches: int = 0  # dispatches so far
    in_flight: tuple[InFlight, ...] = ()

    def to_json(self) -> dict:
        return {"clock": self.clock, "dispatches": self.dispatches, "in_flight": [asdict(f) for f in self.in_flight]}

    @classmethod
    def from_json(cls, data: dict) -> Schedule:
        flights = tuple(InFlight(**f) for f in data["in_flight"])
        return cls(clock=float(data["clock"]), dispatches=int(data["dispatches"]), in_flight=flights)


def client_speeds(cfg: ClientSpeedConfig, population: Sequence[str], *, seed: int) -> dict[str, float]:
    """Each client's slowness factor (x seconds_per_step): lognormal(0, sigma), x slow_factor for the tail."""
    rng = derive_rng(seed, "fedbuff", "client-speed")
    factors = np.exp(rng.normal(0.0, cfg.sigma, size=len(population)))
    slow = rng.permutation(len(population))[: round(cfg.slow_fraction * len(population))]
    factors[slow] *= cfg.slow_factor
    return {cid: float(f) for cid, f in zip(population, factors, strict=True)}


@dataclass(frozen=True)
class Clock:
    """The dispatch and arrival rules over a fixed population (``speeds`` from ``client_speeds``)."""

    speeds: dict[str, float]
    cfg: ClientSpeedConfig
    local_steps: int
    seed: int
    population: tuple[str, ...] = field(default=())

    def duration(self, client_id: str, dispatch: int) -> float:
        seconds = self.local_steps * self.cfg.seconds_per_step * self.speeds[client_id]
        if self.cfg.jitter_sigma > 0:
            rng = derive_rng(self.seed, "fedbuff", "jitter", dispatch)
            seconds *= float(np.exp(rng.normal(0.0, self.cfg.jitter_sigma)))
        return seconds

    def dispatch(self, sched: Schedule, *, version: int, slots: int, busy: set[str]) -> Schedule:
        """Fill free slots (up to ``slots`` in flight) with idle clients not in ``busy``, at ``sched.clock``."""
        flights, count = list(sched.in_flight), sched.dispatches
        taken = busy | {f.client_id for f in flights}
        while len(flights) < slots:
            idle = [c for c in self.population if c not in taken]
            if not idle:
                break
            count += 1
            cid = idle[int(derive_rng(self.seed, "fedbuff", "dispatch", count).integers(len(idle)))]
            taken.add(cid)
            flights.append(InFlight(cid, count, version, sched.clock, sched.clock + self.duration(cid, count)))
        return replace(sched, dispatches=count, in_flight=tuple(flights))

    def next_buffer(
        self, sched: Schedule, *, version: int, slots: int, size: int, max_staleness: int | None
    ) -> tuple[list[InFlight], list[InFlight], Schedule]:
        """(the next ``size`` arrivals, the too-stale arrivals dropped on the way, the schedule after them).

        Slots freed before the buffer is full are refilled at once with the current version; the slot of
        the arrival that fills the buffer is refilled by the next call, after the server has stepped.
        """
        sched = self.dispatch(sched, version=version, slots=slots, busy=set())
        buffer: list[InFlight] = []
        dropped: list[InFlight] = []
        while len(buffer) < size:
            if not sched.in_flight:
                raise ValueError(f"no client can be dispatched: the population is smaller than the buffer ({size})")
            first = min(sched.in_flight, key=lambda f: (f.finish, f.dispatch))
            rest = tuple(f for f in sched.in_flight if f is not first)
            sched = replace(sched, clock=first.finish, in_flight=rest)
            stale = max_staleness is not None and version - first.version > max_staleness
            (dropped if stale else buffer).append(first)
            if len(buffer) < size:
                sched = self.dispatch(sched, version=version, slots=slots, busy={f.client_id for f in buffer})
        return buffer, dropped, sched
