"""FedBuff over real clients (a transport that declares ``Capabilities.asynchronous``, e.g. gRPC).

    repeat until federation.rounds buffered steps:
        keep up to M clients training: each free connected client drawn (seeded, as on the simulated clock)
            gets the current vector, with its version, in its own instruction (``Dispatch.dispatch``)
        fold replies as they come (``Dispatch.next_reply``) into the step's sum, each discounted by its staleness,
            until K are accepted; a freed slot is refilled at once; a failed or dropped client frees its slot
        state = aggregate_round(FedBuff, state, ...)   the same contract, summer and step as in simulation
        checkpoint (the run's sinks), evaluate every eval.every steps

The schedule here is the network's: arrivals come in the order clients finish, so only the dispatch rule is
seeded. With one client in flight and a buffer of one (``concurrency: 1``, ``buffer_size: 1``) the order is
forced, and the run equals the simulated one bit for bit (tests/test_fedbuff_grpc.py). The replies stream into
the sum: no buffer of K updates is kept.

Resume: the checkpoint after each step holds the dispatch counter and who was training on which version; the
clients' tasks end with the server process, so a resumed server starts with nobody in flight (their late
replies name tasks it never issued and are refused) and dispatches afresh from the saved counter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from fedtune.config.asynchronous import FedBuffConfig
from fedtune.config.schema import Config
from fedtune.core.events import Collected, Dispatched, EventListener, answered, ignore
from fedtune.core.messages import ClientFailure, ClientUpdate
from fedtune.core.rng import derive_rng
from fedtune.core.state import ServerState
from fedtune.errors import FedtuneError, UpdateRejected
from fedtune.privacy.sums import Summer, plain_sum
from fedtune.server.async_loop import SCHEDULE_KEY, _arrival, _check, _instruction, schedule_of
from fedtune.server.clock import InFlight, Schedule
from fedtune.server.fedbuff import FedBuff, staleness_metrics
from fedtune.server.influence import Bounds
from fedtune.server.loop import RoundReport, _checked, aggregate_round, eval_clients, evaluate_global
from fedtune.transport.base import Dispatch, Transport

log = logging.getLogger("fedtune")
POLL_S = 1.0  # how long one wait for a reply lasts before the loop looks for free clients again


class Live:
    """Who is training on what, between steps: the dispatch counter and the flights by client id."""

    def __init__(self, config: Config, dispatch: Dispatch, sched: Schedule, events: EventListener = ignore) -> None:
        self.config, self.dispatch, self.events = config, dispatch, events
        self.fb = config.server.fedbuff or FedBuffConfig()
        self.count = sched.dispatches
        self.started, self.clock0 = time.monotonic(), sched.clock
        if sched.in_flight:
            log.warning(
                "resuming: the %d clients training when the server stopped (%s) are not waited for; their "
                "replies will be refused",
                len(sched.in_flight),
                ", ".join(f.client_id for f in sched.in_flight),
            )
        self.flights: dict[str, InFlight] = {}

    def now(self) -> float:
        """Seconds of the run (across resumes: the saved clock plus this process's time)."""
        return self.clock0 + time.monotonic() - self.started

    def fill(self, server: FedBuff, state: ServerState, busy: set[str]) -> None:
        """Dispatch the current version to free connected clients (not training, not in ``busy``) up to M; the
        client is drawn as on the simulated clock (``Clock.dispatch``), among those connected (sorted)."""
        connected = self.dispatch.connected()
        while len(self.flights) < self.fb.concurrency:
            taken = busy | set(self.flights)
            idle = [c for c in connected if c not in taken]
            if not idle:
                return
            self.count += 1
            cid = idle[int(derive_rng(self.config.seed, "fedbuff", "dispatch", self.count).integers(len(idle)))]
            flight = InFlight(cid, self.count, state.round, self.now(), self.now())
            self.flights[cid] = flight
            self.dispatch.dispatch(_instruction(self.config, server, state, flight))
            self.events(Dispatched("train", state.round + 1, (cid,)))

    def schedule(self) -> Schedule:
        return Schedule(clock=self.now(), dispatches=self.count, in_flight=tuple(self.flights.values()))


def _arrivals(
    live: Live, server: FedBuff, state: ServerState, report: RoundReport, bounds: Bounds
) -> Iterator[ClientUpdate]:
    """Accepted replies, as they come, until K (each stamped with its version and bounded, as in simulation)."""
    seen: set[str] = set()
    waited = 0.0
    while len(seen) < live.fb.buffer_size:
        live.fill(server, state, busy=seen)
        reply = live.dispatch.next_reply(POLL_S)
        if reply is None:
            waited = waited + POLL_S if not live.flights else 0.0
            if waited >= live.config.deployment.quorum_timeout_s:
                raise FedtuneError(
                    f"no client could be dispatched for {waited:g}s (deployment.quorum_timeout_s): none is connected "
                    "and free"
                )
            continue
        waited = 0.0
        flight = live.flights.get(reply.client_id)
        if flight is None or reply.round != flight.dispatch:
            continue  # a reply to a dispatch already ended (cannot happen: every task ends once); ignore it
        del live.flights[reply.client_id]
        live.events(answered("train", report.round, reply))
        report.sampled.append(reply.client_id)
        if isinstance(reply, ClientFailure):
            report.failures.append(reply)
            continue
        try:
            if not isinstance(reply, ClientUpdate):
                raise UpdateRejected("the update stayed on the client (secure aggregation is not asynchronous)")
            if reply.version is None:
                raise UpdateRejected("the reply does not echo the model version it trained on")
            _check(reply, flight, state, seen)
        except UpdateRejected as err:
            report.failures.append(ClientFailure(reply.client_id, reply.round, f"rejected: {err}"))
            continue
        seen.add(reply.client_id)
        arrived = replace(flight, finish=live.now())
        yield _arrival(reply, arrived, state, report, bounds)
        del reply


def live_step(
    config: Config, server: FedBuff, live: Live, transport: Transport, state: ServerState, summer: Summer
) -> tuple[ServerState, RoundReport]:
    """One buffered step over real clients; returns the new state (holding the schedule) and what happened."""
    started = time.perf_counter()
    report = RoundReport(round=state.round + 1, sampled=[])
    replies = _arrivals(live, server, state, report, Bounds.for_round(config, state))
    new_state, report.aggregate = aggregate_round(server, state, replies, summer)
    live.events(Collected("train", report.round))
    report.aggregate.update(staleness_metrics([c["staleness"] for c in report.clients]))
    new_state = _checked(config, state, new_state, report)
    sched = live.schedule()
    new_state = new_state.evolve(extra={**new_state.extra, SCHEDULE_KEY: sched.to_json()})
    report.aggregate.update(wall_time=sched.clock, dispatches=sched.dispatches, in_flight=len(sched.in_flight))
    for line in report.clients:  # real seconds on the network, not a simulated duration
        line["seconds"] = line.pop("sim_seconds")
    if new_state.round % config.eval.every == 0 or new_state.round == config.federation.rounds:
        askees = eval_clients(config, transport.client_ids())
        per_client, pooled, failures = evaluate_global(config, server, transport, new_state, askees, events=live.events)
        report.eval_clients, report.eval_pooled = per_client, pooled
        report.failures += failures
    report.seconds = time.perf_counter() - started
    return new_state, report


def run_live(
    config: Config,
    server: FedBuff,
    transport: Transport,
    dispatch: Dispatch,
    state: ServerState,
    *,
    on_round: Callable[[ServerState, RoundReport], None],
    on_stop: Callable[[ServerState, str], None],
    summer: Summer = plain_sum,
    events: EventListener = ignore,
) -> ServerState:
    """Buffered steps from ``state.round + 1`` to ``config.federation.rounds`` over ``dispatch``'s clients
    (``events``: each dispatch, reply and evaluation, as the synchronous loop tells them)."""
    population = transport.client_ids()  # waits for deployment.min_clients
    live = Live(config, dispatch, schedule_of(state), events)
    try:
        while state.round < config.federation.rounds:
            state = server.begin_round(state, population=len(population))
            reason = server.should_stop(state)
            if reason is not None:
                on_stop(state, reason)
                break
            state, report = live_step(config, server, live, transport, state, summer)
            on_round(state, report)
    finally:
        dispatch.abandon()  # whoever is still training: their replies are refused
    return state
