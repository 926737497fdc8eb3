"""The SecAgg driver: the five message rounds between a SecAggServer and the clients, over any carrier.

``run_rounds`` is the server's side of one round (five message exchanges: advertise, share, masked,
consistency, unmask), written once: it encodes each stage's messages,
hands them to a ``SecAggNetwork`` (the transport seam), decodes whoever answered before the stage
ended, and treats everyone else as dropped. Two carriers implement the seam:

* ``LocalPeers`` (simulation): per-client ``SecAggPeer`` objects in this process. Every message is
  encoded to bytes, optionally intercepted (tests tamper here), and decoded by its receiver; a client may
  drop before any stage (``drop_before``).
* the gRPC server transport (deployment, ``GrpcServerTransport.secagg_exchange``): each message is a task
  for a remote participant, whose ``SecAggPeer`` holds its own update; a stage ends at its deadline.

``SecureSummer`` is the summer the round loop forms a sum strategy's sum with (``server.summing.summer_for``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fedtune.config.privacy import SecAggConfig
from fedtune.core.messages import ClientUpdate, HeldUpdate, Reply
from fedtune.core.rng import derive_rng
from fedtune.privacy.distributed import SkellamPlan, lift
from fedtune.privacy.errors import PrivacyError, SecAggAbort, TamperingDetected
from fedtune.privacy.secagg.availability import secagg_plan
from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.identity import CaTrust, Ed25519Signer, Registry, Trust
from fedtune.privacy.secagg.messages import (
    AdvertiseKeys,
    ConsistencySig,
    MaskedInput,
    Message,
    PublicParams,
    ShareKeys,
    UnmaskShares,
    decode,
    encode,
)
from fedtune.privacy.secagg.peer import SecAggPeer
from fedtune.privacy.secagg.policy import ClientPolicy, graph_seed
from fedtune.privacy.secagg.quantize import dequantize_sum, field_for
from fedtune.privacy.secagg.server import SecAggResult, SecAggServer
from fedtune.privacy.sums import LinearSum, SumPlan, channel_value

log = logging.getLogger("fedtune.secagg")

STAGES = ("advertise", "share", "masked", "consistency", "unmask")  # named by what the clients send in each
SERVER = "server"
# the name a downlink message was known by before it opened a stage: the roster ends "advertise", ...
_SENT_AFTER = dict(zip(STAGES, ("params", *STAGES[:-1]), strict=True))
_REPLY = {
    "advertise": AdvertiseKeys,
    "share": ShareKeys,
    "masked": MaskedInput,
    "consistency": ConsistencySig,
    "unmask": UnmaskShares,
}
Intercept = Callable[[str, str, str, bytes], bytes]  # (stage, sender, recipient, data) -> data


class SecAggNetwork(Protocol):
    """The transport seam: carry one stage of one SecAgg round.

    ``messages`` maps each recipient to the encoded message that opens ``stage`` for it; the result maps
    each client that answered, before the stage ended, to its encoded reply. A client that failed,
    timed out or is gone is simply absent (it dropped). The carrier must authenticate who answered.
    """

    def secagg_exchange(self, round_idx: int, stage: str, messages: Mapping[str, bytes]) -> dict[str, bytes]: ...


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


def run_rounds(server: SecAggServer, network: SecAggNetwork, *, traffic: Traffic | None = None) -> SecAggResult:
    """All five rounds between ``server`` and the clients it invited; raises SecAggAbort when the round
    cannot finish. A reply that is missing, undecodable, of the wrong type or in another client's name
    is a dropout at that stage."""
    traffic = traffic if traffic is not None else Traffic()
    p, dropped = server.params, {}  # dropped: client -> the stage it did not answer

    def stage(name: str, messages: Mapping[str, Message]) -> list:
        encoded: dict[int, bytes] = {}  # a broadcast is encoded once
        out = {}
        for cid, msg in messages.items():
            if id(msg) not in encoded:
                encoded[id(msg)] = encode(msg)
            out[cid] = encoded[id(msg)]
            traffic.add(cid, down=len(out[cid]))
        replies = network.secagg_exchange(p.round, name, out)
        received = []
        for cid in sorted(out):
            data = replies.get(cid)
            msg = _decoded(data) if data is not None else None
            if not isinstance(msg, _REPLY[name]) or msg.client_id != cid:
                dropped.setdefault(cid, name)
                continue
            traffic.add(cid, up=len(data))
            received.append(msg)
        return received

    adverts = stage("advertise", dict.fromkeys(sorted(server.invited), p))
    roster = server.roster(adverts)
    forwarded = server.forward(stage("share", dict.fromkeys(roster.keys, roster)))
    check = server.collect(stage("masked", forwarded))
    request = server.consistency(stage("consistency", dict.fromkeys(server.u3, check)))
    result = server.finish(stage("unmask", {cid: server.request_for(cid, request) for cid in request.signatures}))
    result.dropped = dropped
    return result


def _decoded(data: bytes) -> Message | None:
    try:
        return decode(data)
    except (SecAggAbort, UnicodeDecodeError):
        return None  # malformed: the sender is treated as dropped


class LocalPeers:
    """The in-process carrier (simulation): each client's SecAggPeer lives in this process.

    ``drop_before[c] = stage``: client c goes silent from that stage on (it never sends that stage's
    message or any later one). A client whose own checks fail drops the same way; a client that detects
    tampering aborts the round (Bonawitz et al.: honest clients abort on a bad ciphertext).
    """

    def __init__(
        self,
        peers: Mapping[str, SecAggPeer],
        *,
        drop_before: Mapping[str, str] | None = None,
        intercept: Intercept | None = None,
        traffic: Traffic | None = None,
    ) -> None:
        self.peers, self.drops = dict(peers), dict(drop_before or {})
        self.intercept, self.traffic = intercept, traffic if traffic is not None else Traffic()
        self.silent: set[str] = set()
        self.refusals: dict[str, str] = {}  # client -> why its own checks made it drop out

    def secagg_exchange(self, round_idx: int, stage: str, messages: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = {}
        for cid, data in sorted(messages.items()):
            if cid in self.silent or self.drops.get(cid) == stage:
                self.silent.add(cid)
                continue
            if self.intercept is not None:
                data = self.intercept(_SENT_AFTER[stage], SERVER, cid, data)
            started = time.perf_counter()
            try:
                reply = self.peers[cid].respond(data)
            except TamperingDetected:
                raise
            except SecAggAbort as err:  # the client's own check refused: it drops out here
                self.silent.add(cid)
                self.refusals[cid] = str(err)
                log.warning("secure aggregation round %d: %s", round_idx, err)
                continue
            finally:
                self.traffic.add(cid, seconds=time.perf_counter() - started)
            replies[cid] = reply if self.intercept is None else self.intercept(stage, cid, SERVER, reply)
        return replies


def run_protocol(
    clients: Mapping[str, SecAggClient],
    server: SecAggServer,
    *,
    drop_before: Mapping[str, str] | None = None,
    intercept: Intercept | None = None,
    traffic: Traffic | None = None,
) -> SecAggResult:
    """All rounds between in-process ``clients`` and ``server`` (see LocalPeers for the options). Clients
    and a server without a trust store are given the registry of the clients' identity keys."""
    traffic = traffic if traffic is not None else Traffic()
    registry = Registry.of({cid: client.identity for cid, client in clients.items()})
    for client in clients.values():
        client.trust = client.trust if client.trust is not None else registry
    server.trust = server.trust if server.trust is not None else registry
    peers = {cid: SecAggPeer.of(client) for cid, client in clients.items()}
    local = LocalPeers(peers, drop_before=drop_before, intercept=intercept, traffic=traffic)
    return run_rounds(server, local, traffic=traffic)


def random_dropouts(ids: Iterable[str], rate: float, rng: np.random.Generator) -> dict[str, str]:
    """Each client drops with probability ``rate``, before a uniformly chosen stage."""
    out = {}
    for cid in sorted(ids):
        if rng.random() < rate:
            out[cid] = STAGES[int(rng.integers(len(STAGES)))]
    return out


class SecureSummer:
    """A Summer (see fedtune.privacy.sums) that forms the round's sum with SecAgg.

    Without a ``network`` the clients' protocol objects run here, on the updates the (simulation)
    transport handed over. With one (``over(network)``), the replies are HeldUpdates: each client keeps its
    own update and answers the protocol's messages over the network. The loop, not a strategy, holds it.
    """

    def __init__(
        self,
        cfg: SecAggConfig,
        *,
        seed: int,
        network: SecAggNetwork | None = None,
        trust: Trust | None = None,
        ca_path: str | None = None,
    ) -> None:
        """``trust``: how the server checks the clients' signed advertisements over the network;
        ``ca_path``: the federation's CA certificate it is built from when the summer goes ``over`` one."""
        self.cfg, self.seed, self.network, self.trust, self.ca_path = cfg, seed, network, trust, ca_path

    def over(self, network: SecAggNetwork) -> SecureSummer:
        """The same summer, with the protocol's messages carried by ``network`` (and, given the CA, the
        server checking each advertisement's certificate and signature as the clients do)."""
        trust = self.trust if self.trust is not None or self.ca_path is None else _ca_trust(self.ca_path)
        return SecureSummer(self.cfg, seed=self.seed, network=network, trust=trust, ca_path=self.ca_path)

    def params(self, plan: SumPlan, num_clients: int) -> PublicParams:
        if plan.staleness is not None:  # the config refuses async SecAgg; this guards the sum itself
            raise PrivacyError("secure aggregation cannot discount each masked input by its staleness (FedBuff)")
        spec = field_for(num_clients, value_bits=self.cfg.value_bits)
        graph = secagg_plan(self.cfg, num_clients)  # k and t chosen for availability (availability.py)
        return PublicParams(
            round=plan.round,
            num_values=plan.numel,
            weighted=plan.weighting == "examples",
            channels=tuple(plan.channels),
            bound=plan.coord_bound,
            l2_bound=plan.l2_bound or 0.0,
            modulus_bits=spec.modulus_bits,
            levels=spec.levels,
            threshold=graph.threshold,
            neighbours=graph.neighbours,
            graph_seed=graph_seed(self.seed, plan.round),
            weight_cap=plan.weight_cap,
        )

    def __call__(self, updates: Iterable[Reply], plan: SumPlan) -> LinearSum:
        replies = list(updates)  # the protocol's rounds need every participant before round 0
        if self.network is not None:
            return self._remote(replies, plan, self.network)
        held = [u.client_id for u in replies if isinstance(u, HeldUpdate)]
        if held:
            raise PrivacyError(f"clients {held} keep their updates, but no SecAgg network carries the protocol")
        inputs, rejected = {}, 0
        for u in replies:
            assert isinstance(u, ClientUpdate)
            try:
                for name in plan.channels:
                    channel_value(u, name)  # a summand without its channel (e.g. DP's clip bit) is left out
            except ValueError:
                rejected += 1
                continue
            inputs[u.client_id] = u
        if not inputs:
            return _empty(plan)
        params = self.params(plan, len(inputs))
        # each simulated client draws its own identity key; the simulation trusts the registry of them
        identities = {cid: Ed25519Signer.generate() for cid in inputs}
        registry = Registry.of(identities)
        policy = ClientPolicy.from_config(self.cfg, seed=self.seed, round_idx=plan.round)
        peers = {
            cid: SecAggPeer.holding(u, identity=identities[cid], trust=registry, policy=policy)
            for cid, u in inputs.items()
        }
        drops = random_dropouts(inputs, self.cfg.simulate_dropout, derive_rng(self.seed, "secagg-dropout", plan.round))
        traffic = Traffic()
        local = LocalPeers(peers, drop_before=drops, traffic=traffic)
        result = _run(SecAggServer(params, list(inputs), trust=registry), local, traffic)
        return decode_sum(
            result, params, traffic=traffic, invited=len(inputs), rejected=rejected, integers=plan.integers
        )

    def _remote(self, updates: list[Reply], plan: SumPlan, network: SecAggNetwork) -> LinearSum:
        plain = [u.client_id for u in updates if not isinstance(u, HeldUpdate)]
        if plain:  # a transport bug, not a client's: a networked SecAgg round must never see a plaintext update
            raise PrivacyError(f"secure aggregation over the network received plaintext updates from {plain}")
        if not updates:
            return _empty(plan)
        ids = [u.client_id for u in updates]
        params = self.params(plan, len(ids))
        traffic = Traffic()
        result = _run(SecAggServer(params, ids, trust=self.trust), network, traffic)
        return decode_sum(result, params, traffic=traffic, invited=len(ids), integers=plan.integers)


def _ca_trust(path: str) -> Trust:
    from fedtune.errors import ConfigError

    try:
        return CaTrust(Path(path).expanduser().read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"deployment.tls_ca {path!r} cannot be read as a CA certificate: {err}") from None


def _run(server: SecAggServer, network: SecAggNetwork, traffic: Traffic) -> SecAggResult:
    try:
        result = run_rounds(server, network, traffic=traffic)
    except SecAggAbort as err:
        log.warning("%s", err)  # the strategy keeps the model and records the reason
        raise
    if result.dropped:
        log.warning(
            "secure aggregation round %d: %d of %d clients dropped out (%s); %d inputs summed",
            server.params.round,
            len(result.dropped),
            len(server.invited),
            ", ".join(f"{c} at {s}" for c, s in sorted(result.dropped.items())),
            len(result.survivors),
        )
    return result


def _empty(plan: SumPlan) -> LinearSum:
    return LinearSum(np.zeros(plan.numel), 0.0, 0, dict.fromkeys(plan.channels, 0.0), {"secagg_clients": 0})


def decode_sum(
    result: SecAggResult,
    params: PublicParams,
    *,
    traffic: Traffic,
    invited: int,
    rejected: int = 0,
    integers: SkellamPlan | None = None,
) -> LinearSum:
    """Dequantise the integer sum into (sum of values, sum of weights, channel sums)."""
    count, d, b = len(result.survivors), params.num_values, params.bound
    if integers is not None:  # distributed DP, a noised integer sum (fedtune.privacy.distributed)
        total = lift(result.total[:d], integers)
    else:
        total = dequantize_sum(result.total[:d], lo=-b, hi=b, levels=params.levels, count=count)
    scalars = dequantize_sum(result.total[d:], lo=0.0, hi=1.0, levels=params.levels, count=count)
    weight = float(scalars[0]) if params.weighted else float(count)
    channels = dict(zip(params.channels, scalars[int(params.weighted) : -1].tolist(), strict=True))
    # each client's fraction of values outside the clip range, summed securely (quantised: an estimate)
    clipped = max(0, round(float(scalars[-1]) * d))
    n = max(len(traffic.up), 1)
    metrics = {
        "secagg_clients": invited,
        "secagg_survivors": count,
        "secagg_dropped": len(result.dropped),
        "secagg_field_bits": params.modulus_bits,
        "secagg_neighbours": params.neighbours,  # 0: the complete graph
        "secagg_threshold": params.threshold,
        "secagg_bytes_up_per_client": sum(traffic.up.values()) / n,
        "secagg_bytes_down_per_client": sum(traffic.down.values()) / n,
        "secagg_client_seconds": sum(traffic.client_seconds.values()) / n,
        "secagg_server_seconds": result.server_seconds,
    }
    if integers is None:  # distributed DP clips in L2 only and sends 0 here (client._integer_input)
        metrics["secagg_clipped_values"] = clipped
    if result.dropped:
        metrics["secagg_dropouts"] = ",".join(f"{c}@{s}" for c, s in sorted(result.dropped.items()))
    if result.suspects:
        metrics["secagg_tampered_shares_from"] = ",".join(sorted(set(result.suspects)))
    if result.refused:
        metrics["secagg_refused_adverts"] = ",".join(f"{c}: {why}" for c, why in sorted(result.refused.items()))
    if rejected:
        metrics["secagg_rejected"] = rejected
    return LinearSum(total=total, weight=weight, count=count, channels=channels, metrics=metrics)
