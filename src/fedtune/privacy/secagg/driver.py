"""The in-process SecAgg driver, and the Summer that plugs it into DP-FedAvg and SecureAggregation.

Transport.fit is one request and one reply per client; SecAgg needs four message rounds. In simulation
this driver carries them: every message is encoded to bytes, optionally intercepted (tests tamper here),
and decoded by its receiver, so byte counts are real and the server object only ever holds what a real
server would. A client may drop before any stage (``drop_before``); the protocol copes while enough
neighbours remain and aborts cleanly otherwise. The networked deployment must carry the same seven
messages (docs/PRIVACY.md lists them).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedtune.config.privacy import SecAggConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.rng import derive_rng, derive_seed
from fedtune.privacy.errors import SecAggAbort, TamperingDetected
from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.messages import Message, PublicParams, decode, encode
from fedtune.privacy.secagg.quantize import dequantize_sum, field_for
from fedtune.privacy.secagg.server import SecAggResult, SecAggServer
from fedtune.privacy.sums import LinearSum, SumPlan, channel_value

STAGES = ("advertise", "share", "masked", "unmask")
SERVER = "server"
Intercept = Callable[[str, str, str, bytes], bytes]  # (stage, sender, recipient, data) -> data


@dataclass
class Traffic:
    """Bytes and seconds per client, and the server's seconds, for one protocol run."""

    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)
    client_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, cid: str, *, up: int = 0, down: int = 0, seconds: float = 0.0) -> None:
        self.up[cid] = self.up.get(cid, 0) + up
        self.down[cid] = self.down.get(cid, 0) + down
        self.client_seconds[cid] = self.client_seconds.get(cid, 0.0) + seconds


def _send(msg: Message, stage: str, sender: str, recipient: str, intercept: Intercept | None) -> tuple[Message, int]:
    data = encode(msg)
    if intercept is not None:
        data = intercept(stage, sender, recipient, data)
    return decode(data), len(data)


def run_protocol(
    clients: Mapping[str, SecAggClient],
    server: SecAggServer,
    *,
    drop_before: Mapping[str, str] | None = None,
    intercept: Intercept | None = None,
    traffic: Traffic | None = None,
) -> SecAggResult:
    """All four rounds between ``clients`` and ``server``; raises SecAggAbort when the round cannot finish.

    ``drop_before[c] = stage``: client c goes silent from that stage on (it never sends that stage's
    message or any later one). A client whose own checks fail drops the same way; a client that detects
    tampering aborts the round (Bonawitz et al.: honest clients abort on a bad ciphertext).
    """
    drops = dict(drop_before or {})
    traffic = traffic if traffic is not None else Traffic()
    alive = {cid for cid in clients if drops.get(cid) != "advertise"}
    dropped = {cid: "advertise" for cid in clients if cid not in alive}

    def step(stage: str, cid: str, call: Callable[[], Message]) -> Message | None:
        if drops.get(cid) == stage:
            alive.discard(cid)
            dropped[cid] = stage
            return None
        started = time.perf_counter()
        try:
            msg = call()
        except TamperingDetected:
            raise
        except SecAggAbort:  # the client's own check refused: it drops out here
            alive.discard(cid)
            dropped[cid] = stage
            return None
        finally:
            traffic.add(cid, seconds=time.perf_counter() - started)
        decoded, size = _send(msg, stage, cid, SERVER, intercept)
        traffic.add(cid, up=size)
        return decoded

    def broadcast(msg: Message, stage: str, recipients: Iterable[str]) -> dict[str, Message]:
        out = {}
        for cid in recipients:
            out[cid], size = _send(msg, stage, SERVER, cid, intercept)
            traffic.add(cid, down=size)
        return out

    adverts = [m for cid in sorted(alive) if (m := step("advertise", cid, clients[cid].advertise))]
    rosters = broadcast(server.roster(adverts), "advertise", sorted(alive & server.keys.keys()))
    shares = [
        m
        for cid in sorted(rosters)
        if cid in alive and (m := step("share", cid, lambda c=cid: clients[c].share_keys(rosters[c])))
    ]
    forwarded = server.forward(shares)
    inputs = []
    for cid in sorted(forwarded):
        if cid not in alive:
            continue
        fwd, size = _send(forwarded[cid], "share", SERVER, cid, intercept)
        traffic.add(cid, down=size)
        if (m := step("masked", cid, lambda c=cid, f=fwd: clients[c].masked_input(f))) is not None:
            inputs.append(m)
    requests = broadcast(server.collect(inputs), "masked", [c for c in server.u3 if c in alive])
    replies = [
        m
        for cid in sorted(requests)
        if cid in alive and (m := step("unmask", cid, lambda c=cid: clients[c].unmask(requests[c])))
    ]
    result = server.finish(replies)
    result.dropped = dropped
    return result


def random_dropouts(ids: Iterable[str], rate: float, rng: np.random.Generator) -> dict[str, str]:
    """Each client drops with probability ``rate``, before a uniformly chosen stage."""
    out = {}
    for cid in sorted(ids):
        if rng.random() < rate:
            out[cid] = STAGES[int(rng.integers(len(STAGES)))]
    return out


class SecureSummer:
    """A Summer (see fedtune.privacy.sums) that forms the round's sum with SecAgg."""

    def __init__(self, cfg: SecAggConfig, *, seed: int) -> None:
        self.cfg, self.seed = cfg, seed

    def params(self, plan: SumPlan, num_clients: int) -> PublicParams:
        spec = field_for(num_clients, value_bits=self.cfg.value_bits)
        graph_seed = hashlib.sha256(f"secagg-graph/{derive_seed(self.seed, 'secagg-graph', plan.round)}".encode())
        return PublicParams(
            round=plan.round,
            num_values=plan.numel,
            weighted=plan.weighting == "examples",
            channels=tuple(plan.channels),
            bound=plan.coord_bound,
            l2_bound=plan.l2_bound or 0.0,
            modulus_bits=spec.modulus_bits,
            levels=spec.levels,
            threshold=self.cfg.threshold,
            neighbours=self.cfg.neighbours or 0,
            graph_seed=graph_seed.digest(),
        )

    def __call__(self, updates: Iterable[ClientUpdate], plan: SumPlan) -> LinearSum:
        updates = list(updates)  # the protocol's rounds need every participant before round 0
        inputs, rejected = {}, 0
        for u in updates:
            try:
                inputs[u.client_id] = (u, [channel_value(u, c) for c in plan.channels])
            except ValueError:
                rejected += 1
        if not inputs:
            return LinearSum(np.zeros(plan.numel), 0.0, 0, dict.fromkeys(plan.channels, 0.0), {"secagg_clients": 0})
        params = self.params(plan, len(inputs))
        clients = {
            cid: SecAggClient(
                cid,
                u.delta,
                params,
                weight=min(u.num_examples, plan.weight_cap) / plan.weight_cap,
                channels=chans,
                rng=derive_rng(self.seed, "secagg-quantise", plan.round, cid),
            )
            for cid, (u, chans) in inputs.items()
        }
        drops = random_dropouts(inputs, self.cfg.simulate_dropout, derive_rng(self.seed, "secagg-dropout", plan.round))
        traffic = Traffic()
        result = run_protocol(clients, SecAggServer(params, list(inputs)), drop_before=drops, traffic=traffic)
        return decode_sum(result, params, traffic=traffic, invited=len(inputs), rejected=rejected)


def decode_sum(
    result: SecAggResult, params: PublicParams, *, traffic: Traffic, invited: int, rejected: int = 0
) -> LinearSum:
    """Dequantise the integer sum into (sum of values, sum of weights, channel sums)."""
    count, d, b = len(result.survivors), params.num_values, params.bound
    total = dequantize_sum(result.total[:d], lo=-b, hi=b, levels=params.levels, count=count)
    scalars = dequantize_sum(result.total[d:], lo=0.0, hi=1.0, levels=params.levels, count=count)
    weight = float(scalars[0]) if params.weighted else float(count)
    channels = dict(zip(params.channels, scalars[int(params.weighted) :].tolist(), strict=True))
    n = max(len(traffic.up), 1)
    metrics = {
        "secagg_clients": invited,
        "secagg_survivors": count,
        "secagg_dropped": len(result.dropped),
        "secagg_field_bits": params.modulus_bits,
        "secagg_bytes_up_per_client": sum(traffic.up.values()) / n,
        "secagg_bytes_down_per_client": sum(traffic.down.values()) / n,
        "secagg_client_seconds": sum(traffic.client_seconds.values()) / n,
        "secagg_server_seconds": result.server_seconds,
    }
    if result.suspects:
        metrics["secagg_tampered_shares_from"] = ",".join(sorted(set(result.suspects)))
    if rejected:
        metrics["secagg_rejected"] = rejected
    return LinearSum(total=total, weight=weight, count=count, channels=channels, metrics=metrics)
