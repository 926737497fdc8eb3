"""The round loop, transport-agnostic: sample, instruct, fold replies, evaluate, report.

Each reply is validated (round, sampled, not a duplicate, spec digest, length, finite values) before it
reaches the strategy; a bad reply becomes a logged failure and the round continues with the others. A client
that fails for lack of client state the strategy assumed it keeps (cause STATE_LOST: a wiped copy of the LoRA
residual) is asked once more in the same round, with what ``strategy.client_state_lost`` says to send it; the
retried fit computes what the first would have, so the round's result is the same as without the loss.
Accepted updates reach the strategy in sampled order, whatever order they arrived in (so the float32 fold
is bit-identical across transports), with their influence bounded (server/influence.py). A round whose
aggregate is not finite or explodes, or in which no update was aggregated, is rejected: the model stays as
it was and ``RoundReport.rejected`` says why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fedtune.config.schema import Config
from fedtune.core.events import EventListener, ignore, observed
from fedtune.core.keys import ROUNDS_OPTION
from fedtune.core.messages import (
    Cause,
    ClientEval,
    ClientFailure,
    ClientUpdate,
    EvalInstruction,
    FitInstruction,
    HeldUpdate,
    Reply,
)
from fedtune.core.params import check_vector
from fedtune.core.sampling import poisson_sample, sample_clients, sampling_rate
from fedtune.core.state import ServerState
from fedtune.core.strategy import Strategy
from fedtune.core.sums import LinearSum
from fedtune.errors import UpdateRejected
from fedtune.privacy.errors import PrivacyError, SecAggAbort
from fedtune.privacy.sums import Summer, plain_sum
from fedtune.server.influence import Bounds, rejection, with_round_median
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
    # personalisation: per variant ("personal", "finetuned"), each evaluated client's sums on the same data
    eval_personal: dict[str, dict[str, EvalSums]] = field(default_factory=dict)
    seconds: float = 0.0
    rejected: str | None = None  # why the round did not change the model (it does not count as completed)
    # failures of cause STATE_LOST that the round answered by asking the client again (its retry's outcome is
    # in ``clients`` or ``failures``, as any other reply)
    recovered: list[ClientFailure] = field(default_factory=list)
    eval_bytes_down: int = 0  # bytes the evaluation instructions carried (the model and e.g. the LoRA residual)
    norms: list[float] = field(default_factory=list)  # accepted updates' L2 norms, when bounds measure them
    counts: list[int] = field(default_factory=list)  # accepted updates' declared example counts

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


def validate_update(update: Reply, state: ServerState, expected: set[str], seen: set[str]) -> None:
    """Raise UpdateRejected with the reason a reply cannot be aggregated."""
    if update.round != state.round + 1:
        raise UpdateRejected(f"update is for round {update.round}, the server is in round {state.round + 1}")
    if update.client_id not in expected:
        raise UpdateRejected(f"client {update.client_id!r} was not sampled this round")
    check_reply(update, state, seen)


def check_reply(update: Reply, state: ServerState, seen: set[str]) -> None:
    """What any reply must be, whichever round or buffer it belongs to: the first from its client, built on
    the server's parameter layout, from at least one example, and (unless held for SecAgg) a finite vector of
    the right size."""
    if update.client_id in seen:
        raise UpdateRejected(f"duplicate update from client {update.client_id!r}")
    if update.spec_digest != state.spec.digest:
        raise UpdateRejected(f"spec digest {update.spec_digest} does not match the server's {state.spec.digest}")
    if update.num_examples <= 0:
        raise UpdateRejected(f"client reports {update.num_examples} training examples")
    if isinstance(update, ClientUpdate):  # a HeldUpdate has no vector: its client keeps it for SecAgg
        check_vector(update.delta, state.spec, who=f"update from {update.client_id}")


Retry = Callable[[list[str]], Iterator[Reply | ClientFailure]]  # ask these clients again: their replies


def _accepted(
    replies: Iterator[Reply | ClientFailure],
    state: ServerState,
    report: RoundReport,
    bounds: Bounds,
    retry: Retry | None = None,
) -> Iterator[Reply]:
    """Yield valid updates one at a time (for the strategy's streaming fold), recording the rest.

    Replies are validated as they arrive, but yielded in the order the clients were sampled: an update that
    arrives before an earlier-sampled client has answered (or failed) waits. The fold, a float32 sum, then
    sees the same order whatever the network did, so the result is bit-identical to the in-process run. Only
    updates that overtake an earlier client are held (in-process: none).

    ``retry``: a client failing with cause STATE_LOST is asked again once, after the transport's first
    replies are in (the updates sampled after it wait for its retry); its first failure goes to
    ``report.recovered``. Without ``retry`` it is an ordinary failure.
    """
    expected, seen = set(report.sampled), set()
    order = iter(report.sampled)
    waiting: dict[str, Reply] = {}
    resolved: set[str] = set()
    head = next(order, None)
    for reply in _with_retries(replies, report, retry):
        if isinstance(reply, ClientFailure):
            report.failures.append(reply)
            resolved.add(reply.client_id)
        else:
            try:
                validate_update(reply, state, expected, seen)
                bounds.admit(reply)  # example counts declared at enrolment: refused, when so configured
            except UpdateRejected as err:
                report.failures.append(ClientFailure(reply.client_id, reply.round, f"rejected: {err}"))
                resolved.add(reply.client_id)
            else:
                seen.add(reply.client_id)
                waiting[reply.client_id] = reply
                resolved.add(reply.client_id)
        del reply  # not alive while the transport produces the next one
        while head is not None and head in resolved:
            if head in waiting:
                yield _bounded(waiting.pop(head), report, bounds)
            head = next(order, None)
    for cid in report.sampled:  # the transport ended with some clients unresolved: the rest, in order
        if cid in waiting:
            yield _bounded(waiting.pop(cid), report, bounds)


def _with_retries(
    replies: Iterator[Reply | ClientFailure], report: RoundReport, retry: Retry | None
) -> Iterator[Reply | ClientFailure]:
    """``replies``, then (with ``retry``) the replies of the clients that failed with cause STATE_LOST, asked
    once more; their first failures are kept in ``report.recovered``, not yielded."""
    lost: list[str] = []
    for reply in replies:
        if (
            _lost_state(reply)
            and retry is not None
            and reply.client_id in report.sampled
            and reply.client_id not in lost
        ):
            report.recovered.append(reply)
            lost.append(reply.client_id)
            continue
        yield reply
        del reply
    if lost and retry is not None:  # in sampled order, whatever order they failed in (as every transport)
        lost.sort(key=report.sampled.index)
        report.recovered.sort(key=lambda f: report.sampled.index(f.client_id))
        logging.getLogger("fedtune").warning(
            "round %d: %s lost their client state; asking again with what they lost", report.round, ", ".join(lost)
        )
        yield from retry(lost)


def _lost_state(reply: Reply | ClientFailure) -> bool:
    return isinstance(reply, ClientFailure) and reply.cause is Cause.STATE_LOST


def _bounded(update: Reply, report: RoundReport, bounds: Bounds) -> Reply:
    """The update with its influence bounded (server/influence.py), recorded in the report."""
    report.counts.append(update.num_examples)  # as declared: the adaptive cap's median
    update, info = bounds.apply(update)
    if "update_norm" in info:
        report.norms.append(info["update_norm"])
    report.clients.append(
        {
            "client_id": update.client_id,
            "num_examples": update.num_examples,
            "train_loss": update.metrics.get("train_loss", float("nan")),
            "bytes_down": update.bytes_down,
            "bytes_up": update.bytes_up,
            **{k: v for k, v in update.metrics.items() if k != "train_loss"},
            **info,
        }
    )
    return update


def eval_clients(config: Config, population: list[str]) -> list[str]:
    ids = population
    if config.eval.max_clients is not None and len(ids) > config.eval.max_clients:
        ids = sample_clients(ids, seed=config.seed, round_idx=0, count=config.eval.max_clients, fraction=None)
    return ids


@dataclass
class Evaluation:
    """What evaluating a model on some clients gave."""

    per_client: dict[str, EvalSums]  # in the order the clients were asked
    pooled: EvalSums
    personal: dict[str, dict[str, EvalSums]]  # personalisation: {variant: {client: sums}}
    failures: list[ClientFailure]
    # clients that failed with cause STATE_LOST and were asked again (with the strategy's client_state_lost)
    recovered: list[ClientFailure] = field(default_factory=list)
    bytes_down: int = 0  # what the answered evaluations' instructions carried, as the transport counted it


def evaluate_global(
    config: Config,
    strategy: Strategy,
    transport: Transport,
    state: ServerState,
    clients: list[str],
    *,
    events: EventListener = ignore,
) -> tuple[dict[str, EvalSums], EvalSums, list[ClientFailure]]:
    """Evaluate the global model of ``state``: its vector and what the strategy adds (LoRA residuals)."""
    result = evaluate_models(config, strategy, transport, state, clients, events=events)
    return result.per_client, result.pooled, result.failures


def evaluate_models(
    config: Config,
    strategy: Strategy,
    transport: Transport,
    state: ServerState,
    clients: list[str],
    *,
    events: EventListener = ignore,
) -> Evaluation:
    """``evaluate_global``, plus what clients report for their own models on the same held-out data
    (personalisation: {variant: {client: sums}}). ``events`` hears who was asked and who answered. A client
    that fails with cause STATE_LOST (it lost its copy of the LoRA residual) is asked once more with what
    ``strategy.client_state_lost`` says to send it (the dense residual); the state itself is not changed here."""

    def instruction(at: ServerState, cid: str) -> EvalInstruction:
        return EvalInstruction(
            client_id=cid,
            round=state.round,
            params=state.params,
            spec_digest=state.spec.digest,
            batch_size=config.eval.batch_size,
            max_examples=config.eval.max_examples_per_client,
            # per client: the LoRA residual's increments depend on the version it holds (the dense arrays are
            # the state's own, so a transport that shares equal arrays still sends them once)
            extras=strategy.eval_payload(at, client_id=cid),
        )

    answered: dict[str, ClientEval] = {}
    out = Evaluation({}, EvalSums(), {}, [])
    lost: list[str] = []
    replies = transport.evaluate([instruction(state, cid) for cid in clients])
    for reply in observed(events, "eval", state.round, clients, replies):
        if isinstance(reply, ClientEval):
            answered[reply.client_id] = reply
        elif _lost_state(reply) and reply.client_id in clients and reply.client_id not in lost:
            out.recovered.append(reply)
            lost.append(reply.client_id)
        else:
            out.failures.append(reply)
    if lost:
        retried = transport.evaluate([instruction(strategy.client_state_lost(state, cid), cid) for cid in lost])
        for reply in observed(events, "eval", state.round, lost, retried):
            if isinstance(reply, ClientEval):
                answered[reply.client_id] = reply
            else:
                out.failures.append(reply)
    # summed in the order the clients were asked, not the order they answered: the same floats every run
    for cid in clients:
        if cid in answered:
            reply = answered[cid]
            out.per_client[cid] = reply.sums
            out.bytes_down += reply.bytes_down
            for variant, sums in reply.personal.items():
                out.personal.setdefault(variant, {})[cid] = sums
    out.pooled = sum(out.per_client.values(), EvalSums())
    return out


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


def aggregate_round(
    strategy: Strategy, state: ServerState, updates: Iterator[Reply], summer: Summer
) -> tuple[ServerState, dict]:
    """The round's aggregation step, owned by the loop: a strategy without a sum plan folds the updates
    itself; for one with a plan the loop forms that sum (``summer``: in the clear or by SecAgg) and hands the
    strategy the result, or the reason it could not be formed."""
    plan = strategy.sum_plan(state)
    if plan is None:
        return strategy.aggregate(state, in_the_clear(updates))
    try:
        total = summer(updates, plan)
    except SecAggAbort as err:
        total = LinearSum.abort(plan, str(err))
    return strategy.apply_sum(state, total)


def in_the_clear(updates: Iterator[Reply]) -> Iterator[ClientUpdate]:
    """The updates of a strategy that folds each one; a HeldUpdate here means SecAgg was started for a
    strategy that reads individual updates (the config rules refuse that combination at load)."""
    for update in updates:
        if isinstance(update, HeldUpdate):
            raise PrivacyError(f"client {update.client_id} keeps its update for SecAgg; the strategy folds each one")
        yield update
        del update  # not alive while the transport produces the next one


def _log_stop(state: ServerState, reason: str) -> None:
    logging.getLogger("fedtune").warning("stopping after round %d: %s", state.round, reason)


def run_round(
    config: Config,
    strategy: Strategy,
    transport: Transport,
    state: ServerState,
    *,
    summer: Summer = plain_sum,
    begun: bool = False,
    events: EventListener = ignore,
) -> tuple[ServerState, RoundReport]:
    """One communication round; returns the new state and what happened. ``begun``: the caller has already
    called ``strategy.begin_round`` for it (``run_rounds`` does, to ask ``should_stop`` first). ``events``
    hears whom the round instructed and who answered (``fedtune.core.events``)."""
    started = time.perf_counter()
    round_idx = state.round + 1
    population = transport.client_ids()
    if not begun:
        state = strategy.begin_round(state, population=len(population))
    sampled = sample_round(config, population, round_idx)

    def instruction(at: ServerState, cid: str) -> FitInstruction:
        """``cid``'s instruction, its payload from ``at`` (``state``, or what the strategy makes of it for a
        client that lost its client state)."""
        arrays, options = strategy.fit_payload(at, cid)
        return FitInstruction(
            client_id=cid,
            round=round_idx,
            params=state.params,
            spec_digest=state.spec.digest,
            seed=config.seed,
            train=config.client,
            extras=arrays,
            options={**options, ROUNDS_OPTION: config.federation.rounds},  # the local lr schedule's span
        )

    def retry(lost: list[str]) -> Iterator[Reply | ClientFailure]:
        again = [instruction(strategy.client_state_lost(state, cid), cid) for cid in lost]
        return observed(events, "train", round_idx, lost, transport.fit(again))

    report = RoundReport(round=round_idx, sampled=sampled)
    bounds = Bounds.for_round(config, state)
    fitted = observed(events, "train", round_idx, sampled, transport.fit([instruction(state, c) for c in sampled]))
    replies = _accepted(fitted, state, report, bounds, retry)
    new_state, report.aggregate = aggregate_round(strategy, state, replies, summer)
    new_state = _checked(config, state, new_state, report)
    folded = {c["client_id"] for c in report.clients}
    for lost in report.recovered:  # a retry that failed too: the next instruction sends what it lost
        if lost.client_id not in folded:
            new_state = strategy.client_state_lost(new_state, lost.client_id)
    if round_idx % config.eval.every == 0 or round_idx == config.federation.rounds:
        # a client that failed this round (a straggler still training, a rejected update) is not asked to
        # evaluate: its evaluation task would queue behind the training it has not finished
        failed = {f.client_id for f in report.failures}
        askees = [cid for cid in eval_clients(config, population) if cid not in failed]
        evaluation = evaluate_models(config, strategy, transport, new_state, askees, events=events)
        report.eval_clients, report.eval_pooled = evaluation.per_client, evaluation.pooled
        report.eval_personal, report.eval_bytes_down = evaluation.personal, evaluation.bytes_down
        report.failures += evaluation.failures
        report.recovered += evaluation.recovered
        for lost in evaluation.recovered:  # its next fit gets the dense residual at once, not after a failure
            new_state = strategy.client_state_lost(new_state, lost.client_id)
    report.seconds = time.perf_counter() - started
    return new_state, report


def _checked(config: Config, old: ServerState, new: ServerState, report: RoundReport) -> ServerState:
    """``new``, unless the round must be rejected: then ``old``'s model and arrays with the round advanced
    (sampling moves on) and ``new``'s extras (a privacy ledger keeps what the round spent)."""
    if not report.clients:
        report.rejected = f"no client update was accepted ({len(report.failures)} of {len(report.sampled)} failed)"
    elif report.aggregate.get("aggregated") == 0:  # e.g. secure aggregation aborted: too few masked inputs
        why = report.aggregate.get("secagg_abort")
        report.rejected = "no update could be aggregated" + (f": {why}" if why else "")
    else:
        report.rejected = rejection(config, old, new)
    if report.rejected is not None:
        logging.getLogger("fedtune").warning("round %d rejected: %s", report.round, report.rejected)
        new = new.evolve(params=old.params, arrays=old.arrays)
    return with_round_median(config, new, report.norms, report.counts)


def run_rounds(
    config: Config,
    strategy: Strategy,
    transport: Transport,
    state: ServerState,
    *,
    on_round: Callable[[ServerState, RoundReport], None] = lambda s, r: None,
    on_stop: Callable[[ServerState, str], None] | None = None,
    summer: Summer = plain_sum,
    events: EventListener = ignore,
) -> ServerState:
    """Run from ``state.round + 1`` to ``config.federation.rounds``; ``on_round`` persists each round and
    ``events`` hears each client being instructed and answering (the progress bars, the client board).

    A strategy may stop the run early (``should_stop(state) -> reason``, e.g. an exhausted privacy
    budget): ``on_stop(state, reason)`` reports it (default: a warning on the ``fedtune`` logger).
    ``summer`` forms a sum strategy's sum (``fedtune.server.summing.summer_for``: SecAgg when configured).
    """
    on_stop = on_stop or _log_stop
    while state.round < config.federation.rounds:
        # once a round: the strategy records the population (DP-FedAvg), then may stop cleanly before a
        # round that would overspend the privacy budget
        state = strategy.begin_round(state, population=len(transport.client_ids()))
        reason = strategy.should_stop(state)
        if reason is not None:
            on_stop(state, reason)
            break
        state, report = run_round(config, strategy, transport, state, summer=summer, begun=True, events=events)
        on_round(state, report)
    return state
