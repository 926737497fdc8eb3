"""The round loop, transport-agnostic: sample, instruct, fold replies, evaluate, report.

Each reply is validated (round, sampled, not a duplicate, spec digest, length, finite values) before it
reaches the strategy; a bad reply becomes a logged failure and the round continues with the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fedtune.config.schema import Config
from fedtune.core.keys import ROUNDS_OPTION
from fedtune.core.messages import ClientEval, ClientFailure, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.params import check_vector
from fedtune.core.sampling import poisson_sample, sample_clients, sampling_rate
from fedtune.core.state import ServerState
from fedtune.errors import UpdateRejected
from fedtune.server.strategy import Strategy
from fedtune.tasks.base import EvalSums
from fedtune.transport.base import Transport


@dataclass
class RoundReport:
    round: int
    sampled: list[str]
    clients: list[dict] = field(default_factory=list)  # one dict per reply: id, examples, loss, bytes
    failures: list[ClientFailure] = field(default_factory=list)
    aggregate: dict = field(default_factory=dict)
    eval_clients: dict[str, EvalSums] = field(default_factory=dict)
    eval_pooled: EvalSums | None = None
    seconds: float = 0.0

    @property
    def bytes_down(self) -> int:
        return sum(c["bytes_down"] for c in self.clients)

    @property
    def bytes_up(self) -> int:
        return sum(c["bytes_up"] for c in self.clients)

    @property
    def train_loss(self) -> float | None:
        """Example-weighted mean of the clients' local training losses (clients that reported one)."""
        reported = [c for c in self.clients if math.isfinite(c.get("train_loss", math.nan))]
        total = sum(c["num_examples"] for c in reported)
        if not total:
            return None
        return sum(c["train_loss"] * c["num_examples"] for c in reported) / total


def validate_update(update: ClientUpdate, state: ServerState, expected: set[str], seen: set[str]) -> None:
    """Raise UpdateRejected with the reason a reply cannot be aggregated."""
    if update.round != state.round + 1:
        raise UpdateRejected(f"update is for round {update.round}, the server is in round {state.round + 1}")
    if update.client_id not in expected:
        raise UpdateRejected(f"client {update.client_id!r} was not sampled this round")
    if update.client_id in seen:
        raise UpdateRejected(f"duplicate update from client {update.client_id!r}")
    if update.spec_digest != state.spec.digest:
        raise UpdateRejected(f"spec digest {update.spec_digest} does not match the server's {state.spec.digest}")
    if update.num_examples <= 0:
        raise UpdateRejected(f"client reports {update.num_examples} training examples")
    check_vector(update.delta, state.spec, who=f"update from {update.client_id}")


def _accepted(
    replies: Iterator[ClientUpdate | ClientFailure], state: ServerState, report: RoundReport
) -> Iterator[ClientUpdate]:
    """Yield valid updates one at a time (for the strategy's streaming fold), recording the rest."""
    expected, seen = set(report.sampled), set()
    for reply in replies:
        if isinstance(reply, ClientFailure):
            report.failures.append(reply)
            continue
        try:
            validate_update(reply, state, expected, seen)
        except UpdateRejected as err:
            report.failures.append(ClientFailure(reply.client_id, reply.round, f"rejected: {err}"))
            continue
        seen.add(reply.client_id)
        report.clients.append(
            {
                "client_id": reply.client_id,
                "num_examples": reply.num_examples,
                "train_loss": reply.metrics.get("train_loss", float("nan")),
                "bytes_down": reply.bytes_down,
                "bytes_up": reply.bytes_up,
                **{k: v for k, v in reply.metrics.items() if k != "train_loss"},
            }
        )
        yield reply
        # Drop our reference before asking the transport for the next reply: otherwise two model-sized
        # updates are alive while it produces one.
        del reply


def eval_clients(config: Config, population: list[str]) -> list[str]:
    ids = population
    if config.eval.max_clients is not None and len(ids) > config.eval.max_clients:
        ids = sample_clients(ids, seed=config.seed, round_idx=0, count=config.eval.max_clients, fraction=None)
    return ids


def evaluate_global(
    config: Config, strategy: Strategy, transport: Transport, state: ServerState, clients: list[str]
) -> tuple[dict[str, EvalSums], EvalSums, list[ClientFailure]]:
    """Evaluate the global model of ``state``: its vector and what the strategy adds (LoRA residuals)."""
    extras = strategy.eval_payload(state)  # one dict shared by every instruction (transports send it once)
    instructions = [
        EvalInstruction(
            client_id=cid,
            round=state.round,
            params=state.params,
            spec_digest=state.spec.digest,
            batch_size=config.eval.batch_size,
            max_examples=config.eval.max_examples_per_client,
            extras=extras,
        )
        for cid in clients
    ]
    per_client: dict[str, EvalSums] = {}
    failures: list[ClientFailure] = []
    for reply in transport.evaluate(instructions):
        if isinstance(reply, ClientEval):
            per_client[reply.client_id] = reply.sums
        else:
            failures.append(reply)
    pooled = sum(per_client.values(), EvalSums())
    return per_client, pooled, failures


def sample_round(config: Config, population: list[str], round_idx: int) -> list[str]:
    """This round's clients: Poisson with rate q under DP's Poisson sampling, else a fixed-size sample."""
    fed, dp = config.federation, config.privacy.dp
    secure = dp is not None and dp.secure_rng
    if dp is not None and dp.sampling == "poisson":
        rate = sampling_rate(len(population), count=fed.clients_per_round, fraction=fed.fraction)
        return poisson_sample(population, seed=config.seed, round_idx=round_idx, rate=rate, secure=secure)
    return sample_clients(
        population,
        seed=config.seed,
        round_idx=round_idx,
        count=fed.clients_per_round,
        fraction=fed.fraction,
        secure=secure,
    )


def begin_round(strategy: Strategy, state: ServerState, population: list[str]) -> ServerState:
    """A strategy that accounts per round (DP) records the population size before sampling; idempotent."""
    begin = getattr(strategy, "begin_round", None)
    return begin(state, population=len(population)) if begin is not None else state


def _log_stop(state: ServerState, reason: str) -> None:
    logging.getLogger("fedtune").warning("stopping after round %d: %s", state.round, reason)


def run_round(
    config: Config, strategy: Strategy, transport: Transport, state: ServerState
) -> tuple[ServerState, RoundReport]:
    """One communication round; returns the new state and what happened."""
    started = time.perf_counter()
    round_idx = state.round + 1
    population = transport.client_ids()
    state = begin_round(strategy, state, population)
    sampled = sample_round(config, population, round_idx)
    train_cfg = config.client
    instructions = []
    for cid in sampled:
        arrays, options = strategy.fit_payload(state, cid)
        instructions.append(
            FitInstruction(
                client_id=cid,
                round=round_idx,
                params=state.params,
                spec_digest=state.spec.digest,
                seed=config.seed,
                train=train_cfg,
                extras=arrays,
                options={**options, ROUNDS_OPTION: config.federation.rounds},  # the local lr schedule's span
            )
        )
    report = RoundReport(round=round_idx, sampled=sampled)
    new_state, report.aggregate = strategy.aggregate(state, _accepted(transport.fit(instructions), state, report))
    if round_idx % config.eval.every == 0 or round_idx == config.federation.rounds:
        per_client, pooled, failures = evaluate_global(
            config, strategy, transport, new_state, eval_clients(config, population)
        )
        report.eval_clients, report.eval_pooled = per_client, pooled
        report.failures += failures
    report.seconds = time.perf_counter() - started
    return new_state, report


def run_rounds(
    config: Config,
    strategy: Strategy,
    transport: Transport,
    state: ServerState,
    *,
    on_round: Callable[[ServerState, RoundReport], None] = lambda s, r: None,
    on_stop: Callable[[ServerState, str], None] | None = None,
) -> ServerState:
    """Run from ``state.round + 1`` to ``config.federation.rounds``; ``on_round`` persists each round.

    A strategy may stop the run early (``should_stop(state) -> reason``, e.g. an exhausted privacy
    budget): ``on_stop(state, reason)`` reports it (default: a warning on the ``fedtune`` logger).
    """
    on_stop = on_stop or _log_stop
    while state.round < config.federation.rounds:
        # optional strategy hooks (DP-FedAvg): record the population, then stop cleanly before a round
        # that would overspend the privacy budget
        state = begin_round(strategy, state, transport.client_ids())
        should_stop = getattr(strategy, "should_stop", None)
        reason = should_stop(state) if should_stop is not None else None
        if reason is not None:
            on_stop(state, reason)
            break
        state, report = run_round(config, strategy, transport, state)
        on_round(state, report)
    return state
