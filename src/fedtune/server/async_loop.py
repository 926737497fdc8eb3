"""The asynchronous (FedBuff) loop over any transport: dispatch, wait for K arrivals, step, report.

    repeat until federation.rounds buffered steps:
        arrivals = the next K clients to finish on the simulated clock (server.clock), each with the model
                   version it was dispatched with; freed slots are refilled at once (concurrency M)
        train them: one transport.fit over the K instructions (the in-process worker in turn, or Ray actors
                   in parallel), each instruction carrying its own version's vector
        state = aggregate_round(FedBuff, state, ...)    the loop's summer forms the staleness-discounted sum
                                                        (FedBuff.sum_plan); FedBuff.apply_sum steps (+ DP)
        evaluate every eval.every steps; hand (state, report) to on_round (the run's sinks)

Training is lazy: a client's update is computed when it arrives, from the vector of the version it was
dispatched with. That vector is kept in ``state.arrays["fedbuff/version/<v>"]`` while any in-flight client
still needs it, and the schedule (clock, dispatch counter, in-flight clients) in ``state.extra["fedbuff"]``,
so the checkpoint written after a step is everything a resumed run needs to continue bit for bit.
Within a step, updates are influence-bounded and the step checked exactly as in a synchronous round
(``server.influence``), and folded in arrival order whatever order the transport answers in, hence
bit-identical results for the same seed on every backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from fedtune.aggregation.fedbuff import StalenessWeight
from fedtune.config.asynchronous import ClientSpeedConfig, FedBuffConfig
from fedtune.config.schema import Config
from fedtune.core.events import EventListener, ignore, observed
from fedtune.core.keys import ROUNDS_OPTION
from fedtune.core.messages import ClientFailure, ClientUpdate, FitInstruction
from fedtune.core.state import ServerState
from fedtune.errors import CheckpointError, ConfigError, UpdateRejected
from fedtune.privacy.sums import Summer, plain_sum
from fedtune.server.build import server_optimizer
from fedtune.server.clock import Clock, InFlight, Schedule, client_speeds
from fedtune.server.fedbuff import FedBuff, staleness_metrics
from fedtune.server.influence import Bounds
from fedtune.server.loop import (
    RoundReport,
    _bounded,
    _checked,
    aggregate_round,
    check_reply,
    eval_clients,
    evaluate_models,
)
from fedtune.transport.base import Dispatch, Transport

SCHEDULE_KEY = "fedbuff"  # state.extra[SCHEDULE_KEY]: the Schedule
VERSION_PREFIX = "fedbuff/version/"  # state.arrays: vectors of older versions still being trained on


def build_fedbuff(config: Config) -> FedBuff:
    """The FedBuff server of an async config (the optimiser from ``server``, as for a synchronous FedOpt)."""
    server, fb = config.server, config.server.fedbuff or FedBuffConfig()
    options = {"proximal_mu": server.proximal_mu} if server.proximal_mu > 0 else {}
    return FedBuff(
        optimizer=server_optimizer(config),
        staleness=StalenessWeight(fb.staleness, a=fb.staleness_a, b=fb.staleness_b),
        buffer_size=fb.buffer_size,
        weighting=server.weighting,
        client_options=options,
        dp=config.privacy.dp,
        seed=config.seed,
    )


def build_clock(config: Config, population: list[str]) -> Clock:
    fb = config.server.fedbuff or FedBuffConfig()
    if len(population) < fb.buffer_size:
        raise ConfigError(
            f"server.fedbuff.buffer_size ({fb.buffer_size}) exceeds the population ({len(population)} clients): "
            "a client contributes at most once per buffered step"
        )
    speed = config.simulation.client_speed or ClientSpeedConfig()
    assert config.client.local_steps is not None  # async mode requires it (config.asynchronous)
    speeds = client_speeds(speed, population, seed=config.seed)
    return Clock(speeds, speed, config.client.local_steps, config.seed, tuple(population))


def schedule_of(state: ServerState) -> Schedule:
    data = state.extra.get(SCHEDULE_KEY)
    return Schedule() if data is None else Schedule.from_json(data)


def version_params(state: ServerState, version: int) -> np.ndarray:
    if version == state.round:
        return state.params
    key = f"{VERSION_PREFIX}{version}"
    if key not in state.arrays:
        raise CheckpointError(f"the vector of model version {version} (a client in flight trains on it) is missing")
    return state.arrays[key]


def with_schedule(new: ServerState, old: ServerState, sched: Schedule) -> ServerState:
    """``new`` holding ``sched`` and the vectors of exactly the versions its in-flight clients train on."""
    needed = {f.version for f in sched.in_flight} - {new.round}
    arrays = {k: v for k, v in new.arrays.items() if not k.startswith(VERSION_PREFIX)}
    arrays.update({f"{VERSION_PREFIX}{v}": version_params(old, v) for v in sorted(needed)})
    return new.evolve(arrays=arrays, extra={**new.extra, SCHEDULE_KEY: sched.to_json()})


def _instruction(config: Config, server: FedBuff, state: ServerState, flight: InFlight) -> FitInstruction:
    arrays, options = server.fit_payload(state, flight.client_id)
    return FitInstruction(
        client_id=flight.client_id,
        round=flight.dispatch,  # the client's random streams: one per dispatch, as one per round in sync mode
        params=version_params(state, flight.version),
        spec_digest=state.spec.digest,
        seed=config.seed,
        train=config.client,
        extras=arrays,
        options={**options, ROUNDS_OPTION: config.federation.rounds},
        version=flight.version,
    )


def _check(update: ClientUpdate, flight: InFlight | None, state: ServerState, seen: set[str]) -> InFlight:
    if flight is None:
        raise UpdateRejected(f"client {update.client_id!r} is not in this buffer")
    if update.round != flight.dispatch:
        raise UpdateRejected(f"update is for dispatch {update.round}, the client was dispatched as {flight.dispatch}")
    # the dispatch decides the version; a transport that echoes it (gRPC) must echo the one it was sent
    if update.version is not None and update.version != flight.version:
        raise UpdateRejected(
            f"update trained on model version {update.version}, the client was dispatched with {flight.version}"
        )
    check_reply(update, state, seen)  # the checks every reply gets, in a round or a buffer
    return flight


def _accepted(
    replies: Iterator[ClientUpdate | ClientFailure],
    buffer: list[InFlight],
    state: ServerState,
    report: RoundReport,
    bounds: Bounds,
) -> Iterator[ClientUpdate]:
    """Valid updates stamped with the version they trained on, influence-bounded as in a synchronous round
    (``server.influence``), yielded in arrival order whatever order the transport answers in (so the fold is
    bit-identical on Ray with ``ordered: false``); the rest become report failures. Only updates that
    overtake an earlier arrival wait."""
    by_id, seen = {f.client_id: f for f in buffer}, set()
    waiting: dict[str, ClientUpdate] = {}
    resolved: set[str] = set()
    order = iter(buffer)
    head = next(order, None)
    for reply in replies:
        resolved.add(reply.client_id)
        if isinstance(reply, ClientFailure):
            report.failures.append(reply)
        else:
            try:
                _check(reply, by_id.get(reply.client_id), state, seen)
            except UpdateRejected as err:
                report.failures.append(ClientFailure(reply.client_id, reply.round, f"rejected: {err}"))
            else:
                seen.add(reply.client_id)
                waiting[reply.client_id] = reply
        del reply  # not alive while the transport produces the next one
        while head is not None and head.client_id in resolved:
            if head.client_id in waiting:
                yield _arrival(waiting.pop(head.client_id), head, state, report, bounds)
            head = next(order, None)
    for flight in buffer:  # the transport ended with some arrivals unresolved: the rest, in order
        if flight.client_id in waiting:
            yield _arrival(waiting.pop(flight.client_id), flight, state, report, bounds)


def _arrival(
    update: ClientUpdate, flight: InFlight, state: ServerState, report: RoundReport, bounds: Bounds
) -> ClientUpdate:
    update = _bounded(replace(update, version=flight.version), report, bounds)  # appends its metrics line
    staleness = state.round - flight.version
    report.clients[-1].update(staleness=staleness, dispatch=flight.dispatch, sim_seconds=flight.finish - flight.start)
    return update


def async_step(
    config: Config,
    server: FedBuff,
    clock: Clock,
    transport: Transport,
    state: ServerState,
    *,
    summer: Summer = plain_sum,
    events: EventListener = ignore,
) -> tuple[ServerState, RoundReport]:
    """One buffered step: the next K arrivals trained and folded; returns the new state and what happened
    (``events``: the step's arrivals instructed and answering, as a round's clients)."""
    started = time.perf_counter()
    fb = config.server.fedbuff or FedBuffConfig()
    buffer, dropped, sched = clock.next_buffer(
        schedule_of(state),
        version=state.round,
        slots=fb.concurrency,
        size=fb.buffer_size,
        max_staleness=fb.max_staleness,
    )
    report = RoundReport(round=state.round + 1, sampled=[f.client_id for f in dropped + buffer])
    report.failures += [
        ClientFailure(f.client_id, f.dispatch, f"dropped: staleness {state.round - f.version} > max_staleness")
        for f in dropped
    ]
    instructions = [_instruction(config, server, state, f) for f in buffer]
    fitted = observed(events, "train", report.round, [f.client_id for f in buffer], transport.fit(instructions))
    replies = _accepted(fitted, buffer, state, report, Bounds.for_round(config, state))
    new_state, report.aggregate = aggregate_round(server, state, replies, summer)
    report.aggregate.update(staleness_metrics([c["staleness"] for c in report.clients]))
    new_state = _checked(config, state, new_state, report)  # a non-finite or exploding step is rejected
    new_state = with_schedule(new_state, state, sched)
    report.aggregate.update(
        sim_time=sched.clock,
        dispatches=sched.dispatches,
        dropped_stale=len(dropped),
        versions_kept=sum(k.startswith(VERSION_PREFIX) for k in new_state.arrays),
    )
    evaluate_step(config, server, transport, new_state, report, events)
    report.seconds = time.perf_counter() - started
    return new_state, report


def evaluate_step(
    config: Config,
    server: FedBuff,
    transport: Transport,
    state: ServerState,
    report: RoundReport,
    events: EventListener,
) -> None:
    """Evaluate ``state``'s global model into ``report`` when ``config.eval.every`` (or the last step) says so."""
    if state.round % config.eval.every == 0 or state.round == config.federation.rounds:
        askees = eval_clients(config, transport.client_ids())  # type: ignore[arg-type]
        evaluation = evaluate_models(config, server, transport, state, askees, events=events)
        report.eval_clients, report.eval_pooled = evaluation.per_client, evaluation.pooled
        report.eval_bytes_down = evaluation.bytes_down
        report.failures += evaluation.failures


def run_async(
    config: Config,
    server: FedBuff,
    transport: Transport,
    state: ServerState,
    *,
    on_round: Callable[[ServerState, RoundReport], None] = lambda s, r: None,
    on_stop: Callable[[ServerState, str], None] | None = None,
    summer: Summer = plain_sum,
    dispatch: Dispatch | None = None,
    events: EventListener = ignore,
) -> ServerState:
    """Buffered steps from ``state.round + 1`` to ``config.federation.rounds`` (``run_rounds``' contract): on
    the simulated clock, or, given a transport's ``dispatch`` (``Capabilities.asynchronous``), over real clients
    arriving when they finish (``fedtune.server.async_live``)."""
    if dispatch is not None:
        from fedtune.server.async_live import run_live  # it builds on this module's checks

        stop = on_stop or _log_stop
        return run_live(
            config, server, transport, dispatch, state, on_round=on_round, on_stop=stop, summer=summer, events=events
        )
    population = transport.client_ids()
    clock = build_clock(config, population)
    while state.round < config.federation.rounds:
        state = server.begin_round(state, population=len(population))
        reason = server.should_stop(state)
        if reason is not None:
            (on_stop or _log_stop)(state, reason)
            break
        state, report = async_step(config, server, clock, transport, state, summer=summer, events=events)
        on_round(state, report)
    return state


def _log_stop(state: ServerState, reason: str) -> None:
    logging.getLogger("fedtune").warning("stopping after buffered step %d: %s", state.round, reason)
