"""SecAgg's parameters for each round (``secagg_plan``), and a simulation that checks the availability bounds
they are chosen by (``fedtune.config.secagg_bounds``: Bell et al. 2020, Section 4) against the real neighbour
graph and the server's and clients' threshold checks (``simulate_aborts``, ``round_aborts``).
"""

from __future__ import annotations

import logging

import numpy as np

from fedtune.config.privacy import SecAggConfig
from fedtune.config.secagg_bounds import SecAggPlan, plan, shares_needed
from fedtune.privacy.secagg.graph import neighbour_graph

log = logging.getLogger("fedtune.secagg")
_WARNED: set[tuple[int, SecAggConfig]] = set()


NUM_STAGES = 5  # advertise, share, masked, consistency, unmask (driver.STAGES)


def simulate_aborts(
    num_clients: int, neighbours: int, threshold: float, dropout: float, rounds: int, rng: np.random.Generator
) -> float:
    """The share of ``rounds`` simulated rounds that abort: the real neighbour graph (graph.py), each client
    dropping with probability ``dropout`` before one of the five stages (driver.STAGES), and the server's
    and the clients' threshold checks (server.py, client.py) applied stage by stage."""
    ids = [f"c{i:05d}" for i in range(num_clients)]
    aborted = 0
    for r in range(rounds):
        stage = np.where(rng.random(num_clients) < dropout, rng.integers(0, NUM_STAGES, num_clients), NUM_STAGES)
        aborted += int(round_aborts(ids, stage, neighbours, threshold, seed=r.to_bytes(8, "little")))
    return aborted / rounds


def round_aborts(ids: list[str], stage: np.ndarray, neighbours: int, threshold: float, *, seed: bytes) -> bool:
    """stage[i]: the first stage client i does not answer (0 advertise, 1 share, 2 masked, 3 consistency,
    4 unmask; 5: none)."""
    roster = [c for c, s in zip(ids, stage, strict=True) if s > 0]
    if len(roster) < 3:
        return True
    graph = neighbour_graph(roster, k=neighbours or None, seed=seed)
    last = dict(zip(ids, stage.tolist(), strict=True))
    t = {c: shares_needed(threshold, len(graph[c])) for c in roster}
    if any(t[c] > len(graph[c]) for c in roster):
        return True
    u2 = {c for c in roster if last[c] > 1}  # shared keys
    u3 = {c for c in u2 if last[c] > 2}  # sent masked inputs
    if len(u2) < 3 or len(u3) < 3:
        return True
    if any(len(graph[c] & u2) < t[c] for c in u2) or any(len(graph[c] & u3) < t[c] for c in u3):
        return True  # server.forward / server.collect
    u4 = {c for c in u3 if last[c] > 3}  # signed U3 (each has >= t neighbours in U3: checked just above)
    if len(u4) < 3:
        return True  # server.consistency
    # a signer reveals shares only when >= t of its neighbours signed the same set (client.unmask)
    u5 = {c for c in u4 if last[c] > 4 and len(graph[c] & u4) >= t[c]}
    return any(len(graph[c] & u5) < t[c] for c in u2)  # b-shares of U3, s-shares of U2 \ U3


def secagg_plan(cfg: SecAggConfig, num_clients: int) -> SecAggPlan:
    """The plan for a round of ``num_clients`` under the ``privacy.secure_aggregation`` section; logs a
    warning when no choice meets the target (then the complete graph, the most available, is used)."""
    chosen = plan(
        num_clients,
        dropout=cfg.expected_dropout,
        failure_probability=cfg.failure_probability,
        threshold=cfg.threshold,
        neighbours=cfg.neighbours,
        corrupt=cfg.expected_corrupt,
    )
    if chosen.abort_bound > cfg.failure_probability and (num_clients, cfg) not in _WARNED:
        _WARNED.add((num_clients, cfg))  # once per round size, not every round
        log.warning(
            "secure aggregation with %d clients: rounds may abort with probability up to %.3g at expected_dropout "
            "%g (target failure_probability %g); sample more clients per round or lower the threshold",
            num_clients,
            chosen.abort_bound,
            cfg.expected_dropout,
            cfg.failure_probability,
        )
    return chosen
