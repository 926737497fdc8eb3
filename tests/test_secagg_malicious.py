"""SecAgg against a malicious server (Bonawitz et al. 2017, malicious variant, with the SecAgg+ graph).

The attack of issue 14: a server that proposes threshold 0.01 and shows different survivor sets to
different clients collects shares of both of a victim's secrets (s_u from the clients told "u dropped",
b_u from those told "u survived") and strips both masks. On the code before this change it recovered the
victim's exact input. Here clients refuse the parameters, a split view fails the consistency round, forged
or substituted advertisements and small-order keys are dropped, and nothing crashes an honest client.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.config.privacy import SecAggConfig
from fedtune.core.messages import ClientUpdate
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg import crypto, shamir
from fedtune.privacy.secagg.client import SecAggClient, pair_mask_seed, roster_index
from fedtune.privacy.secagg.driver import SecureSummer, run_protocol
from fedtune.privacy.secagg.identity import Ed25519Signer, Registry, advert_data
from fedtune.privacy.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    PublicParams,
    Roster,
    UnmaskRequest,
    decode,
    encode,
    params_digest,
)
from fedtune.privacy.secagg.peer import SecAggPeer
from fedtune.privacy.secagg.policy import ClientPolicy, graph_seed
from fedtune.privacy.secagg.quantize import field_for
from fedtune.privacy.secagg.server import SecAggServer
from fedtune.privacy.sums import SumPlan, plain_sum

IDS = ["a", "b", "c", "d", "e"]
D = 8
# small-order X25519 u-coordinates: 0 (order 2... the all-zero key), 1, and a point of order 8
SMALL_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


def params(
    threshold: float = 2 / 3, *, n: int = len(IDS), neighbours: int = 0, num_values: int = D, **kw
) -> PublicParams:
    spec = field_for(n, value_bits=None)
    fields = {"bound": 1.0, "l2_bound": 0.0, "graph_seed": b"graph", **kw}
    return PublicParams(
        1,
        num_values,
        False,
        (),
        fields["bound"],
        fields["l2_bound"],
        fields.get("modulus_bits", spec.modulus_bits),
        fields.get("levels", spec.levels),
        threshold,
        neighbours,
        fields["graph_seed"],
    )


def honest_clients(p: PublicParams, ids=IDS) -> tuple[dict[str, SecAggClient], Registry]:
    identities = {cid: Ed25519Signer.generate() for cid in ids}
    registry = Registry.of(identities)
    rng = np.random.default_rng(0)
    clients = {
        cid: SecAggClient(cid, rng.uniform(-1, 1, D).astype(np.float32), p, identity=identities[cid], trust=registry)
        for cid in ids
    }
    return clients, registry


def split_view_attack(
    clients: dict[str, SecAggClient], server: SecAggServer, victim: str = "a", revealed: list | None = None
) -> np.ndarray | None:
    """The malicious server of issue 14: it runs rounds 0-2 honestly, then tells half of the victim's
    neighbours that the victim dropped (to get shares of s_victim) and the other half that it survived
    (to get shares of b_victim). Returns the victim's unmasked field vector, or None when the clients
    refused to hand over enough shares; ``revealed`` collects who answered an unmasking request. Every
    client's refusal is a SecAggAbort (never another error)."""
    peers = {cid: SecAggPeer.of(c) for cid, c in clients.items()}
    try:
        adverts = [decode(peers[cid].respond(encode(server.params))) for cid in IDS]
    except SecAggAbort:
        return None  # the clients refused the invitation
    roster = server.roster(adverts)
    forwarded = server.forward([decode(peers[cid].respond(encode(roster))) for cid in IDS])
    masked = {cid: decode(peers[cid].respond(encode(forwarded[cid]))) for cid in IDS}
    others = [cid for cid in IDS if cid != victim]
    told_dropped, told_survived = others[: len(others) // 2], others[len(others) // 2 :]
    views = {cid: tuple(sorted(set(IDS) - {victim})) for cid in told_dropped}
    views |= {cid: tuple(IDS) for cid in [victim, *told_survived]}
    signatures: dict[tuple[str, ...], dict[str, bytes]] = {}
    for cid, view in views.items():
        try:
            sig = decode(peers[cid].respond(encode(ConsistencyCheck(view))))
        except SecAggAbort:
            continue
        signatures.setdefault(view, {})[cid] = sig.signature
    s_shares, b_shares, index = {}, {}, roster_index(IDS)
    for cid in others:
        view = views[cid]
        try:
            reply = decode(peers[cid].respond(encode(UnmaskRequest(view, signatures.get(view, {})))))
        except SecAggAbort:
            continue
        if revealed is not None:
            revealed.append(cid)
        if victim in reply.s_shares:
            s_shares[index[cid]] = shamir.decode_share(reply.s_shares[victim])
        if victim in reply.b_shares:
            b_shares[index[cid]] = shamir.decode_share(reply.b_shares[victim])
    t = server.t[victim]
    if len(s_shares) < t or len(b_shares) < t:
        return None
    s_key = crypto.private_from_bytes(shamir.reconstruct(s_shares))
    p = server.params
    y = masked[victim].masked.astype(np.uint32) - crypto.mask(shamir.reconstruct(b_shares), p.length, p.modulus_bits)
    for v in others:
        m = crypto.mask(pair_mask_seed(s_key, roster.keys[v][1], p.round, victim, v), p.length, p.modulus_bits)
        y = y - m if victim < v else y + m
    return y


def test_the_low_threshold_split_view_attack_no_longer_recovers_an_input() -> None:
    """Threshold 0.01: every client refuses the invitation (the attack of the issue, which recovered
    client a's exact input before), with a reason that names the threshold."""
    p = params(threshold=0.01)
    with pytest.raises(SecAggAbort, match=r"threshold 0\.01 is below"):
        honest_clients(p)
    peer = SecAggPeer("a", lambda q: SecAggClient("a", np.zeros(D, np.float32), q))  # over the wire, likewise
    with pytest.raises(SecAggAbort, match=r"threshold 0\.01 is below"):
        peer.respond(encode(p))


def test_a_split_view_at_a_legal_threshold_fails_the_consistency_round() -> None:
    """At threshold 2/3 the same split view gets each client fewer than t neighbour signatures over the
    set it was shown: no client reveals a share, so nothing is recovered. The honest run completes."""
    p = params()
    clients, registry = honest_clients(p)
    revealed: list[str] = []
    assert split_view_attack(clients, SecAggServer(p, IDS, trust=registry), revealed=revealed) is None
    assert revealed == []  # not one share was revealed (without the consistency round all four answered)
    for cid in IDS[1:]:
        assert clients[cid]._held and clients[cid]._signed is not None  # they got that far, then refused
    clients, registry = honest_clients(p)
    result = run_protocol(clients, SecAggServer(p, IDS, trust=registry))
    assert np.array_equal(result.total, sum(c.plain.astype(np.int64) for c in clients.values()))


def test_unmasking_is_refused_for_a_set_the_client_did_not_sign_or_with_forged_signatures() -> None:
    p = params()
    clients, registry = honest_clients(p)
    server = SecAggServer(p, IDS, trust=registry)
    roster = server.roster([c.advertise() for c in clients.values()])
    forwarded = server.forward([c.share_keys(roster) for c in clients.values()])
    check = server.collect([c.masked_input(forwarded[cid]) for cid, c in clients.items()])
    request = server.consistency([c.consistency(check) for c in clients.values()])
    with pytest.raises(SecAggAbort, match="did not sign"):
        clients["b"].unmask(UnmaskRequest(tuple(IDS[1:]), request.signatures))
    forged = {**request.signatures, "c": Ed25519Signer.generate().sign(b"anything")}
    with pytest.raises(SecAggAbort, match="does not verify"):
        clients["b"].unmask(UnmaskRequest(request.survivors, forged))
    with pytest.raises(SecAggAbort, match="second survivor set"):
        clients["b"].consistency(ConsistencyCheck(tuple(IDS[1:])))
    assert clients["b"].unmask(request).b_shares  # the genuine request is answered


def _rewrite_roster(change):
    """An intercept that rewrites the roster every client receives (a malicious server or network)."""

    def intercept(stage: str, sender: str, recipient: str, data: bytes) -> bytes:
        if stage == "advertise" and sender == "server":
            roster = decode(data)
            assert isinstance(roster, Roster)
            return encode(change(roster))
        return data

    return intercept


def test_a_substituted_key_advertisement_is_dropped_and_the_round_completes() -> None:
    """The server swaps client e's keys for its own (a man in the middle on the masking keys): the
    signature no longer verifies, so the honest clients drop e, e drops itself, and the other four sum."""
    p = params()
    clients, registry = honest_clients(p)

    def swap(roster: Roster) -> Roster:
        mine = tuple(crypto.public_bytes(crypto.new_private_key()) for _ in range(2))
        return Roster(roster.params, {**roster.keys, "e": mine}, roster.signed)

    result = run_protocol(clients, SecAggServer(p, IDS, trust=registry), intercept=_rewrite_roster(swap))
    assert result.survivors == ("a", "b", "c", "d") and result.dropped == {"e": "share"}
    assert np.array_equal(result.total, sum(clients[c].plain.astype(np.int64) for c in result.survivors))
    assert all(clients[c].rejected == {"e": "a key advertisement whose signature does not verify"} for c in "abcd")


class _TrustAll:
    def verify(self, client_id: str, credential: bytes, data: bytes, signature: bytes) -> bool:
        return True


def test_a_fabricated_identity_is_dropped_by_every_honest_client() -> None:
    """A Sybil the server makes up (not in the registry the clients trust) gets no shares and no masks."""
    p = params(n=6)
    clients, _ = honest_clients(p)
    mallory = Ed25519Signer.generate()
    c_pk, s_pk = (crypto.public_bytes(crypto.new_private_key()) for _ in range(2))

    class SybilServer(SecAggServer):
        def roster(self, messages):
            return super().roster([*messages, AdvertiseKeys("m", c_pk, s_pk, mallory.credential, b"forged")])

    server = SybilServer(p, [*IDS, "m"], trust=_TrustAll())  # it checks nothing: it is the attacker
    result = run_protocol(clients, server, drop_before={"m": "advertise"})
    assert "m" in server.keys and result.survivors == tuple(IDS)
    assert all(c.rejected == {"m": "a key advertisement whose signature does not verify"} for c in clients.values())
    assert np.array_equal(result.total, sum(c.plain.astype(np.int64) for c in clients.values()))


@pytest.mark.parametrize("bad", SMALL_ORDER, ids=["zero", "one", "order8"])
def test_a_small_order_key_is_refused_by_the_server_and_dropped_by_clients(bad: bytes) -> None:
    """A client advertising a small-order X25519 key: the server leaves it out of the roster; a server
    that passes it on anyway only gets the offender dropped by the honest clients, who never crash."""
    with pytest.raises(ValueError):  # what used to escape from crypto.agree and crash honest clients
        crypto.agree(crypto.new_private_key(), bad, info=b"x")
    p = params()
    clients, registry = honest_clients(p)
    evil = clients["e"].advertise()
    server = SecAggServer(p, IDS, trust=registry)
    roster = server.roster([c.advertise() for c in list(clients.values())[:4]] + [AdvertiseKeys("e", bad, evil.s_pk)])
    assert "e" not in roster.keys and server.refused == {"e": "an invalid or small-order X25519 key"}

    clients, registry = honest_clients(p)

    def poison(roster: Roster) -> Roster:  # e (in league with the server) signs the bad key: only the key is bad
        s_pk = roster.keys["e"][1]
        signature = clients["e"].identity.sign(advert_data(p.round, "e", bad, s_pk, params_digest(p)))
        signed = {**roster.signed, "e": (clients["e"].identity.credential, signature)}
        return Roster(roster.params, {**roster.keys, "e": (bad, s_pk)}, signed)

    result = run_protocol(clients, SecAggServer(p, IDS, trust=registry), intercept=_rewrite_roster(poison))
    assert result.survivors == ("a", "b", "c", "d")
    assert np.array_equal(result.total, sum(clients[c].plain.astype(np.int64) for c in result.survivors))
    assert clients["a"].rejected == {"e": "an invalid or small-order X25519 key"}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_no_message_a_server_can_send_crashes_an_honest_client(data) -> None:
    """Random corruption of the roster a client receives: it answers or refuses (SecAggAbort), nothing else."""
    p = params()
    clients, _ = honest_clients(p)
    server = SecAggServer(p, IDS)
    raw = bytearray(encode(server.roster([c.advertise() for c in clients.values()])))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    peer = SecAggPeer.of(clients["a"])
    peer.respond(encode(p))  # the invitation
    with contextlib.suppress(SecAggAbort):  # refusing is fine; any other exception fails the test
        peer.respond(bytes(raw))


def test_a_server_holding_the_ca_key_learns_an_input_through_t_sybils() -> None:
    """The trust model's limit (docs/PRIVACY.md): identities the simulation (the CA) trusts but the server
    controls. With t = 3 of client a's 4 neighbours being Sybils, their shares alone rebuild both of a's
    secrets, and a's input falls out of its masked vector: signatures cannot help against fake identities."""
    p = params()
    clients, registry = honest_clients(p)
    server = SecAggServer(p, IDS, trust=registry)
    roster = server.roster([c.advertise() for c in clients.values()])
    forwarded = server.forward([c.share_keys(roster) for c in clients.values()])
    masked = {cid: c.masked_input(forwarded[cid]) for cid, c in clients.items()}
    sybils, index = ["c", "d", "e"], roster_index(IDS)
    assert len(sybils) == server.t["a"]
    s_a = shamir.reconstruct({index[v]: clients[v]._held["a"][0] for v in sybils})
    b_a = shamir.reconstruct({index[v]: clients[v]._held["a"][1] for v in sybils})
    y = masked["a"].masked.astype(np.uint32) - crypto.mask(b_a, p.length, p.modulus_bits)
    for v in IDS[1:]:
        m = crypto.mask(
            pair_mask_seed(crypto.private_from_bytes(s_a), roster.keys[v][1], p.round, "a", v), p.length, p.modulus_bits
        )
        y = y - m if v > "a" else y + m
    assert np.array_equal(y, clients["a"].plain)


# ----- the client's floors ----------------------------------------------------------------------------------

POLICY = ClientPolicy(min_threshold=0.6, min_neighbours=4, min_clients=4, clip_range=1.0, seed=3, round=1)
GOOD = {"graph_seed": graph_seed(3, 1)}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (params(0.55, neighbours=4, **GOOD), "threshold 0.55 is below"),
        (params(0.01, neighbours=4, **GOOD), "threshold 0.01 is below"),
        (params(float("nan"), neighbours=4, **GOOD), "threshold nan"),
        (params(neighbours=2, **GOOD), "2 neighbours is below"),
        (params(neighbours=4, modulus_bits=40, **GOOD), "not a valid field"),
        (params(neighbours=4, bound=float("inf"), **GOOD), "not a finite"),
        (params(neighbours=4, bound=5.0, **GOOD), "clip range 5 differs"),
        (params(neighbours=4, graph_seed=b"chosen by the server"), "graph seed"),
    ],
)
def test_the_client_refuses_parameters_below_its_own_floors(bad: PublicParams, reason: str) -> None:
    with pytest.raises(SecAggAbort, match=reason):
        POLICY.check_params(bad, "a")
    POLICY.check_params(params(neighbours=4, **GOOD), "a")  # the same client accepts a fair invitation


def test_the_client_refuses_a_roster_too_small_or_too_large_for_the_field() -> None:
    p = params(neighbours=4, **GOOD)
    with pytest.raises(SecAggAbort, match="3 clients in the roster"):
        POLICY.check_roster(p, 3, "a")
    with pytest.raises(SecAggAbort, match="would wrap"):
        POLICY.check_roster(p, 1000, "a")
    ClientPolicy().check_params(params(neighbours=0), "a")  # the complete graph passes any minimum


def test_the_config_sets_the_floors() -> None:
    cfg = SecAggConfig(threshold=0.7, neighbours=6, min_clients=5)
    policy = ClientPolicy.from_config(cfg, seed=1, round_idx=2)
    assert (policy.min_threshold, policy.min_neighbours, policy.min_clients) == (0.7, 6, 5)
    cfg = SecAggConfig(threshold=0.9, min_threshold=0.6, min_neighbours=4)
    assert ClientPolicy.from_config(cfg, seed=1).min_threshold == 0.6
    with pytest.raises(ValueError, match="min_threshold"):
        SecAggConfig(min_threshold=0.5)


# ----- quantisation ---------------------------------------------------------------------------------------


def _updates(n: int, scale: float, d: int = 300) -> list[ClientUpdate]:
    rng = np.random.default_rng(7)
    return [ClientUpdate(f"c{i}", 1, 5, rng.uniform(-scale, scale, d).astype(np.float32), "s") for i in range(n)]


def test_a_nan_update_is_refused_before_quantisation_not_summed() -> None:
    ups = _updates(6, 0.3)
    ups[2] = ClientUpdate("c2", 1, 5, np.where(np.arange(300) == 7, np.nan, ups[2].delta).astype(np.float32), "s")
    plan = SumPlan(round=1, numel=300, coord_bound=1.0)
    with np.errstate(all="raise"):  # a NumPy warning would be an error here
        secure = SecureSummer(SecAggConfig(), seed=0)(ups, plan)
    assert secure.count == 5 and secure.metrics["secagg_dropouts"] == "c2@advertise"
    expected = plain_sum([u for u in ups if u.client_id != "c2"], plan)
    np.testing.assert_allclose(secure.total, expected.total, atol=5 * 2 / ((2**32 - 1) // 6))
    p = params()
    with pytest.raises(SecAggAbort, match="non-finite"):
        SecAggClient("x", np.full(D, np.inf, np.float32), p)


def test_values_outside_the_clip_range_are_counted_in_the_rounds_metrics() -> None:
    ups = _updates(8, 0.3)
    plan = SumPlan(round=1, numel=300, coord_bound=0.2)
    secure = SecureSummer(SecAggConfig(clip_range=0.2), seed=0)(ups, plan)
    clipped = sum(int(np.count_nonzero(np.abs(u.delta) > 0.2)) for u in ups)
    assert clipped > 0 and abs(secure.metrics["secagg_clipped_values"] - clipped) <= 1
    inside = SecureSummer(SecAggConfig(), seed=0)(ups, SumPlan(round=1, numel=300, coord_bound=1.0))
    assert inside.metrics["secagg_clipped_values"] == 0


def test_rounding_randomness_is_private_to_each_client() -> None:
    """The same update, parameters and public seed quantise differently on every run (the server cannot
    replay a client's rounding from the config's seed), and the sum stays within the quantisation bound.
    512 values: two private roundings of one value agree with probability f^2 + (1 - f)^2 (f its fractional
    part), so two runs of 8 values agreed by chance in about 4% of runs (seen once); of 512, about 1e-90."""
    n = 512
    p = params(bound=1.0, num_values=n)
    x = np.random.default_rng(1).uniform(-1, 1, n).astype(np.float32)
    a, b = (SecAggClient("a", x, p).plain for _ in range(2))
    assert not np.array_equal(a, b)
    assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= 1  # each is floor or ceil
    ups = _updates(6, 0.3)
    plan = SumPlan(round=1, numel=300, coord_bound=1.0)
    one, two = (SecureSummer(SecAggConfig(), seed=0)(ups, plan).total for _ in range(2))
    assert not np.array_equal(one, two)
    bound = 6 * 2 / ((2**32 - 1) // 6)
    np.testing.assert_allclose(one, plain_sum(ups, plan).total, atol=bound)
