"""SecAgg (Bonawitz et al. 2017 + SecAgg+ graph): exact sums under dropouts, a server view independent of
any one input, clean aborts, tamper detection, and the parts (Shamir, quantisation, graph, wire format)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedtune.privacy.errors import SecAggAbort, TamperingDetected
from fedtune.privacy.secagg import crypto, shamir
from fedtune.privacy.secagg.client import SecAggClient, pair_mask_seed
from fedtune.privacy.secagg.driver import STAGES, run_protocol
from fedtune.privacy.secagg.graph import neighbour_graph
from fedtune.privacy.secagg.identity import Ed25519Signer, Registry
from fedtune.privacy.secagg.messages import PublicParams, UnmaskShares, decode, encode
from fedtune.privacy.secagg.quantize import dequantize_sum, field_for, quantize
from fedtune.privacy.secagg.server import SecAggServer


def params(n: int, d: int, *, k: int | None = None, value_bits: int | None = None, bound: float = 1.0) -> PublicParams:
    spec = field_for(n, value_bits=value_bits)
    return PublicParams(1, d, False, (), bound, 0.0, spec.modulus_bits, spec.levels, 2 / 3, k or 0, b"graph")


def setup(n: int, d: int, *, seed: int = 0, inputs: dict | None = None, **kw):
    p = params(n, d, **kw)
    rng = np.random.default_rng(seed)
    ids = [f"c{i:02d}" for i in range(n)]
    xs = inputs or {cid: rng.uniform(-1, 1, d).astype(np.float32) for cid in ids}
    identities = {cid: Ed25519Signer.generate() for cid in ids}
    registry = Registry.of(identities)
    clients = {
        cid: SecAggClient(
            cid, xs[cid], p, rng=np.random.default_rng([seed, i]), identity=identities[cid], trust=registry
        )
        for i, cid in enumerate(ids)
    }
    return p, clients, SecAggServer(p, ids, trust=registry)


def plaintext_sum(clients: dict, survivors) -> np.ndarray:
    return sum(clients[c].plain.astype(np.int64) for c in survivors)


# ----- the protocol ---------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data(), k=st.sampled_from([None, 4]), seed=st.integers(0, 2**16))
def test_unmasked_sum_equals_plaintext_sum_under_dropouts(data, k: int | None, seed: int) -> None:
    n = 10
    _, clients, server = setup(n, 50, seed=seed, k=k)
    # below the threshold: complete graph t = 6 of 9 neighbours -> up to 3 drops; SecAgg+ k=4, t=3 -> 1 drop
    max_drops = 3 if k is None else 1
    dropped = data.draw(st.lists(st.sampled_from(sorted(clients)), max_size=max_drops, unique=True))
    drops = {cid: data.draw(st.sampled_from(STAGES)) for cid in dropped}
    result = run_protocol(clients, server, drop_before=drops)
    expected_survivors = sorted(c for c in clients if drops.get(c) not in ("advertise", "share", "masked"))
    assert list(result.survivors) == expected_survivors
    assert np.array_equal(result.total, plaintext_sum(clients, result.survivors))
    assert result.dropped == drops
    # the server never holds both secrets of anyone: one recovered secret per client at most
    assert set(server.recovered) <= set(clients)


def test_sum_is_exact_in_a_16_bit_container_and_dequantises() -> None:
    p, clients, server = setup(10, 200, value_bits=8)
    assert p.modulus_bits == 12
    result = run_protocol(clients, server, drop_before={"c03": "masked"})
    assert np.array_equal(result.total, plaintext_sum(clients, result.survivors))
    assert result.total.max() < 2**12


@pytest.mark.parametrize(("stage", "drops"), [("advertise", 4), ("share", 3), ("masked", 3), ("unmask", 3)])
def test_aborts_cleanly_when_too_many_drop(stage: str, drops: int) -> None:
    _, clients, server = setup(6, 20)  # complete graph: k = 5, t = 4
    with pytest.raises(SecAggAbort, match="aborted"):
        run_protocol(clients, server, drop_before={f"c{i:02d}": stage for i in range(drops)})


def _server_view(x: np.ndarray, runs: int, *, late: bool = False) -> np.ndarray:
    """What the server sees of client c00's input over fresh protocol runs (the others fixed)."""
    views = []
    for r in range(runs):
        inputs = {f"c{i:02d}": np.full(x.shape, 0.3, np.float32) for i in range(6)}
        inputs["c00"] = x
        _, clients, server = setup(6, x.shape[0], seed=r, inputs=inputs, value_bits=8)
        server.seen_masked = {}
        if not late:
            run_protocol(clients, server)
            views.append(server.seen_masked["c00"].astype(np.int64))
            continue
        views.append(_late_client_view(clients, server))
    return np.concatenate(views)


def _late_client_view(clients: dict, server: SecAggServer) -> np.ndarray:
    """c00 shares keys, then is too slow: the server declares it dropped and reconstructs its mask key
    s_u. Its masked input then arrives anyway; the server strips every pairwise mask from it. The
    self-mask b_u still hides the input (Bonawitz et al.'s reason for double masking)."""
    roster = server.roster([c.advertise() for c in clients.values()])
    forwarded = server.forward([c.share_keys(roster) for c in clients.values()])
    late = clients["c00"].masked_input(forwarded["c00"])
    check = server.collect([clients[c].masked_input(forwarded[c]) for c in sorted(clients) if c != "c00"])
    request = server.consistency([clients[c].consistency(check) for c in check.survivors])
    server.finish([clients[c].unmask(request) for c in request.survivors])
    s_u = crypto.private_from_bytes(server.recovered["c00"])  # the server learnt c00's mask key ...
    assert crypto.public_of(server.recovered["c00"]) == roster.keys["c00"][1]
    p = server.params
    y = late.masked.astype(np.uint32)
    for v in sorted(server.graph["c00"]):
        m = crypto.mask(pair_mask_seed(s_u, roster.keys[v][1], p.round, "c00", v), p.length, p.modulus_bits)
        y = y - m if v > "c00" else y + m
    return (y & np.uint32((1 << p.modulus_bits) - 1)).astype(np.int64)  # ... and still sees noise


@pytest.mark.parametrize("late", [False, True])
def test_server_view_of_one_client_is_independent_of_its_update(late: bool) -> None:
    d, runs, bins = 2000, 3, 32
    low = _server_view(np.full(d, -1.0, np.float32), runs, late=late)
    high = _server_view(np.full(d, 1.0, np.float32), runs, late=late)
    modulus = 2**11  # value_bits 8 with 6 clients
    counts = [np.bincount(v * bins // modulus, minlength=bins) for v in (low, high)]
    for c in counts:  # uniform over the field ...
        assert stats.chisquare(c).pvalue > 1e-4
    assert stats.chi2_contingency(np.array(counts)).pvalue > 1e-4  # ... and the same for both inputs
    # the plaintexts, by contrast, are constants 0 and 255: a test that could fail does fail on them
    assert stats.chisquare(np.bincount(np.zeros(d, np.int64), minlength=bins)).pvalue < 1e-10


def test_tampered_ciphertext_is_detected_by_the_recipient() -> None:
    _, clients, server = setup(6, 20)

    def flip(stage: str, sender: str, recipient: str, data: bytes) -> bytes:
        if stage == "share" and sender == "server" and recipient == "c02":
            return data[:-1] + bytes([data[-1] ^ 1])  # the last ciphertext's tag
        return data

    with pytest.raises(TamperingDetected) as info:
        run_protocol(clients, server, intercept=flip)
    assert info.value.suspect is not None


def _bad_share(target: str, sender: str):
    def tamper(stage: str, who: str, recipient: str, data: bytes) -> bytes:
        if stage == "unmask" and who == sender:
            msg = decode(data)
            assert isinstance(msg, UnmaskShares)
            bumped = shamir.encode_share((shamir.decode_share(msg.b_shares[target]) + 1) % shamir.PRIME)
            return encode(UnmaskShares(msg.client_id, {**msg.b_shares, target: bumped}, msg.s_shares))
        return data

    return tamper


def test_tampered_share_is_detected_and_its_sender_named() -> None:
    _, clients, server = setup(8, 20)  # complete graph: 7 holders of each secret, t = 5: spares exist
    result = run_protocol(clients, server, intercept=_bad_share("c01", "c00"))
    assert "c00" in result.suspects
    assert np.array_equal(result.total, plaintext_sum(clients, result.survivors))  # recovered from good shares


def test_tampered_share_without_spares_aborts() -> None:
    _, clients, server = setup(3, 20)  # 2 holders, t = 2: no spare share to route around the bad one
    with pytest.raises(TamperingDetected, match="do not reconstruct"):
        run_protocol(clients, server, intercept=_bad_share("c01", "c00"))


# ----- the parts ------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_shamir_any_t_shares_reconstruct(secret: bytes, n: int, data) -> None:
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, threshold=t, xs=list(range(1, n + 1)))
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=t, unique=True))
    assert shamir.reconstruct({x: shares[x] for x in subset}) == secret
    if t >= 2:  # t - 1 shares interpolate to something else (with overwhelming probability)
        fewer = {x: shares[x] for x in subset[: t - 1]}
        assert shamir.interpolate_at_zero(fewer) != int.from_bytes(secret, "big") or t == 1


def test_field_never_wraps_and_quantisation_is_unbiased() -> None:
    for n in (2, 10, 1000, 2**16):
        spec = field_for(n, value_bits=None)
        assert n * spec.levels < spec.modulus == 2**32
    assert field_for(1024, value_bits=16).modulus_bits == 26
    with pytest.raises(Exception, match="32"):
        field_for(2**20, value_bits=16)
    x = np.full(100_000, 0.123456, np.float32)
    q = quantize(x, lo=-1.0, hi=1.0, levels=255, rng=np.random.default_rng(0))
    back = dequantize_sum(q, lo=-1.0, hi=1.0, levels=255, count=1)
    assert back.mean() == pytest.approx(0.123456, abs=3 * (2 / 255) / np.sqrt(len(x)))
    assert set(np.unique(q)) <= {int(np.floor((0.123456 + 1) / 2 * 255)), int(np.ceil((0.123456 + 1) / 2 * 255))}


def test_neighbour_graph_is_regular_symmetric_and_public() -> None:
    ids = [f"c{i}" for i in range(50)]
    g = neighbour_graph(ids, k=8, seed=b"a")
    assert {len(v) for v in g.values()} == {8}
    assert all(u in g[v] for u in g for v in g[u]) and all(u not in g[u] for u in g)
    assert g == neighbour_graph(list(reversed(ids)), k=8, seed=b"a")  # same graph for every party
    assert g != neighbour_graph(ids, k=8, seed=b"b")
    assert neighbour_graph(ids[:5], k=8, seed=b"a")["c0"] == frozenset(ids[1:5])  # k >= n - 1: complete


def test_messages_round_trip_and_reject_garbage() -> None:
    p, clients, _ = setup(3, 10)
    msg = clients["c00"].advertise()
    assert decode(encode(msg)) == msg
    for bad in (b"", b"XXXX\x01\x01", encode(msg) + b"\x00", encode(msg)[:-3]):
        with pytest.raises(SecAggAbort):
            decode(bad)
    assert isinstance(p, PublicParams)
