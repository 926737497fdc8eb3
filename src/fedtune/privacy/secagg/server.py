"""The server's side: it routes ciphertexts it cannot read, folds masked vectors, and in the last round
reconstructs exactly the secrets needed to cancel the masks: b_u of every survivor (its self-mask) and
s_u of every client that shared keys but sent no masked input (its pairwise masks with survivors).

Advertisements are checked like the clients check them: a key that is not a valid X25519 point (small
order, all zeros) or, when the server has a ``trust``, a signature that does not verify drops that
client from the roster. Clients route shares only to peers they accepted; a pair masks only when shares
went both ways, and the server forwards and unmasks exactly those pairs. Before any share is revealed,
the survivors sign the survivor set (the consistency round) and the server passes the signatures on.

Every step checks that enough clients remain; when they do not, it raises SecAggAbort, which the caller
treats as a round without a result. Reconstructed secrets are verified (s_u against its advertised public
key, b_u against its round-1 commitment), so a tampered share is detected, and identified when spare
shares allow.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedtune.privacy.errors import SecAggAbort, TamperingDetected
from fedtune.privacy.secagg import crypto, shamir
from fedtune.privacy.secagg.client import pair_mask_seed, roster_index, share_threshold
from fedtune.privacy.secagg.graph import neighbour_graph
from fedtune.privacy.secagg.identity import Trust, advert_data, survivors_data
from fedtune.privacy.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySig,
    Forwarded,
    MaskedInput,
    PublicParams,
    Roster,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    params_digest,
)
from fedtune.privacy.secagg.quantize import container

MIN_CLIENTS = 3  # a sum over fewer would be (nearly) an individual update


@dataclass
class SecAggResult:
    total: np.ndarray  # int64, the exact integer sum of the survivors' field vectors
    survivors: tuple[str, ...]  # U3: whose inputs are in the sum
    dropped: dict[str, str] = field(default_factory=dict)  # client -> the stage it dropped at
    suspects: list[str] = field(default_factory=list)  # senders of shares that failed verification
    refused: dict[str, str] = field(default_factory=dict)  # client -> why its key advertisement was refused
    server_seconds: float = 0.0


class SecAggServer:
    def __init__(self, params: PublicParams, invited: Sequence[str], *, trust: Trust | None = None) -> None:
        self.params = params
        self.invited = frozenset(invited)
        self.trust = trust  # None: adverts are passed on unchecked (each client checks them itself)
        self._digest = params_digest(params)
        self.keys: dict[str, tuple[bytes, bytes]] = {}  # U1
        self.signed: dict[str, tuple[bytes, bytes]] = {}  # U1: (credential, signature)
        self.refused: dict[str, str] = {}  # client -> why its advertisement was refused
        self.pairs: dict[str, frozenset[str]] = {}  # U2: the neighbours each client exchanged shares with
        self.signatures: dict[str, bytes] = {}  # U4: the consistency signatures over U3
        self.graph: dict[str, frozenset[str]] = {}
        self.t: dict[str, int] = {}
        self.commitments: dict[str, bytes] = {}  # U2
        self.u3: tuple[str, ...] = ()
        self._sum: np.ndarray | None = None
        self.seen_masked: dict[str, np.ndarray] | None = None  # set to {} to record the server's view (tests)
        self.recovered: dict[str, bytes] = {}  # secrets the server learnt (tests: it never holds both of one u)
        self.suspects: list[str] = []
        self.seconds = 0.0

    def _abort(self, reason: str) -> SecAggAbort:
        return SecAggAbort(f"secure aggregation round {self.params.round} aborted: {reason}")

    # round 0 -> roster -----------------------------------------------------------------------------------
    def roster(self, messages: Iterable[AdvertiseKeys]) -> Roster:
        started = time.perf_counter()
        for msg in messages:
            if msg.client_id not in self.invited or msg.client_id in self.keys:
                continue
            problem = self._advert_problem(msg)
            if problem is not None:
                self.refused[msg.client_id] = problem
                continue
            self.keys[msg.client_id] = (msg.c_pk, msg.s_pk)
            self.signed[msg.client_id] = (msg.credential, msg.signature)
        if len(self.keys) < MIN_CLIENTS:
            raise self._abort(f"{len(self.keys)} clients advertised keys, at least {MIN_CLIENTS} are needed")
        p = self.params
        self.graph = neighbour_graph(list(self.keys), k=p.neighbours or None, seed=p.graph_seed)
        self.t = {cid: share_threshold(p, len(nbrs)) for cid, nbrs in self.graph.items()}
        short = [cid for cid, nbrs in self.graph.items() if self.t[cid] > len(nbrs)]
        if short:
            raise self._abort(f"client {short[0]} has too few neighbours for threshold {self.t[short[0]]}")
        self.seconds += time.perf_counter() - started
        return Roster(p, dict(sorted(self.keys.items())), dict(sorted(self.signed.items())))

    def _advert_problem(self, msg: AdvertiseKeys) -> str | None:
        if not (crypto.valid_public(msg.c_pk) and crypto.valid_public(msg.s_pk)):
            return "an invalid or small-order X25519 key"
        data = advert_data(self.params.round, msg.client_id, msg.c_pk, msg.s_pk, self._digest)
        if self.trust is not None and not self.trust.verify(msg.client_id, msg.credential, data, msg.signature):
            return "a key advertisement whose signature does not verify"
        return None

    # round 1 -> forwarded ciphertexts --------------------------------------------------------------------
    def forward(self, messages: Iterable[ShareKeys]) -> dict[str, Forwarded]:
        started = time.perf_counter()
        shared: dict[str, ShareKeys] = {}
        for msg in messages:  # a client sends shares to the neighbours whose advertisements it accepted
            if msg.client_id in self.keys and set(msg.ciphertexts) <= self.graph[msg.client_id]:
                shared[msg.client_id] = msg
        self.commitments = {cid: msg.commitment for cid, msg in shared.items()}
        self.pairs = {
            u: frozenset(v for v in msg.ciphertexts if v in shared and u in shared[v].ciphertexts)
            for u, msg in shared.items()
        }
        for cid in shared:  # every U2 secret must stay recoverable by its holders in U2
            holders = len(self.pairs[cid])
            if holders < self.t[cid]:
                raise self._abort(f"only {holders} of client {cid}'s neighbours shared keys (threshold {self.t[cid]})")
        if len(shared) < MIN_CLIENTS:
            raise self._abort(f"{len(shared)} clients shared keys, at least {MIN_CLIENTS} are needed")
        out = {v: Forwarded(v, {}) for v in shared}
        for u, msg in shared.items():
            for v in self.pairs[u]:
                out[v].ciphertexts[u] = msg.ciphertexts[v]
        self.seconds += time.perf_counter() - started
        return out

    # round 2 -> survivors --------------------------------------------------------------------------------
    def collect(self, messages: Iterable[MaskedInput]) -> ConsistencyCheck:
        started = time.perf_counter()
        p, received = self.params, []
        total = np.zeros(p.length, dtype=np.uint32)
        for msg in messages:
            y = msg.masked
            if msg.client_id not in self.commitments or msg.client_id in received:
                continue
            if msg.bits != p.modulus_bits or y.shape != (p.length,) or y.dtype != container(p.modulus_bits):
                continue  # malformed (another field width or length): treated as a dropout
            if p.modulus_bits < 32 and int(y.max(initial=0)) >= 1 << p.modulus_bits:
                continue
            if self.seen_masked is not None:
                self.seen_masked[msg.client_id] = y.copy()
            total += y.astype(np.uint32)  # a streaming fold: wraps mod 2^32, reduced mod R at the end
            received.append(msg.client_id)
        self.u3 = tuple(sorted(received))
        if len(self.u3) < MIN_CLIENTS:
            raise self._abort(f"{len(self.u3)} masked inputs arrived, at least {MIN_CLIENTS} are needed")
        for v in self.u3:
            alive = len(self.pairs[v] & set(self.u3))
            if alive < self.t[v]:
                raise self._abort(f"only {alive} of client {v}'s neighbours sent masked inputs (threshold {self.t[v]})")
        self._sum = total
        self.seconds += time.perf_counter() - started
        return ConsistencyCheck(self.u3)

    # round 3 -> the signatures over U3 ---------------------------------------------------------------------
    def consistency(self, messages: Iterable[ConsistencySig]) -> UnmaskRequest:
        started = time.perf_counter()
        data = survivors_data(self.params.round, self.u3, self._digest)
        for msg in messages:
            cid = msg.client_id
            if cid not in self.u3 or cid in self.signatures:
                continue
            credential = self.signed[cid][0]
            if self.trust is not None and not self.trust.verify(cid, credential, data, msg.signature):
                continue  # a bad signature: that client is treated as dropped
            self.signatures[cid] = msg.signature
        if len(self.signatures) < MIN_CLIENTS:
            signed = len(self.signatures)
            raise self._abort(f"{signed} survivors signed the survivor set, at least {MIN_CLIENTS} are needed")
        self.seconds += time.perf_counter() - started
        return UnmaskRequest(self.u3, dict(sorted(self.signatures.items())))

    def request_for(self, cid: str, request: UnmaskRequest) -> UnmaskRequest:
        """``request`` as client ``cid`` needs it: only its neighbours' signatures count for it (SecAgg+:
        k of them, not n)."""
        return UnmaskRequest(request.survivors, {v: s for v, s in request.signatures.items() if v in self.pairs[cid]})

    # round 4 -> the sum ----------------------------------------------------------------------------------
    def finish(self, messages: Iterable[UnmaskShares]) -> SecAggResult:
        started = time.perf_counter()
        if self._sum is None:
            raise self._abort("unmasking before masked inputs were collected")
        p, u3 = self.params, set(self.u3)
        index = roster_index(list(self.keys))
        b_shares: dict[str, dict[int, int]] = {u: {} for u in u3}
        s_shares: dict[str, dict[int, int]] = {u: {} for u in set(self.commitments) - u3}
        senders: dict[int, str] = {index[c]: c for c in self.keys}
        for msg in messages:
            w = msg.client_id
            if w not in self.signatures:  # only those who signed U3 are asked to unmask
                continue
            for owner_map, target in ((msg.b_shares, b_shares), (msg.s_shares, s_shares)):
                for u, raw in owner_map.items():
                    if u in target and w in self.pairs[u]:
                        try:
                            target[u][index[w]] = shamir.decode_share(raw)
                        except ValueError:
                            self.suspects.append(w)
        total = self._sum.copy()
        for u, shares in sorted(b_shares.items()):  # survivors: remove the self-mask
            b_u = self._recover(u, shares, senders, lambda s, u=u: self._b_ok(u, s), "self-mask seed")
            total -= crypto.mask(b_u, p.length, p.modulus_bits)
        for u, shares in sorted(s_shares.items()):  # dropped after sharing: remove pairwise masks
            s_sk = self._recover(u, shares, senders, lambda s, u=u: crypto.public_of(s) == self.keys[u][1], "mask key")
            key = crypto.private_from_bytes(s_sk)
            for v in sorted(self.pairs[u] & u3):
                m = crypto.mask(pair_mask_seed(key, self.keys[v][1], p.round, u, v), p.length, p.modulus_bits)
                if v < u:  # v added +PRG(s_uv) when v < u, and subtracted it otherwise
                    total -= m
                else:
                    total += m
        if p.modulus_bits < 32:
            total &= np.uint32((1 << p.modulus_bits) - 1)
        self.seconds += time.perf_counter() - started
        return SecAggResult(
            total.astype(np.int64),
            self.u3,
            suspects=list(self.suspects),
            refused=dict(self.refused),
            server_seconds=self.seconds,
        )

    def _b_ok(self, u: str, secret: bytes) -> bool:
        return crypto.commitment(f"{self.params.round}/{u}".encode(), secret) == self.commitments[u]

    def _recover(self, owner: str, shares: dict[int, int], senders: dict[int, str], ok, what: str) -> bytes:
        t = self.t[owner]
        if len(shares) < t:
            raise self._abort(f"{len(shares)} shares of client {owner}'s {what} arrived (threshold {t})")
        xs = sorted(shares)
        secret = _try(shares, xs[:t], ok)
        if secret is None:
            # Detected. Identify: a t-subset that verifies clears its members; the rest are suspects.
            for subset in itertools.islice(itertools.combinations(xs, t), 2000):
                secret = _try(shares, list(subset), ok)
                if secret is not None:
                    self.suspects += [senders[x] for x in xs if not _consistent(shares, list(subset), x)]
                    break
            if secret is None:
                raise TamperingDetected(
                    f"shares of client {owner}'s {what} do not reconstruct to its committed value "
                    "(a share was altered) and no consistent subset of them exists",
                    suspect=None,
                )
        if owner in self.recovered:
            raise SecAggAbort(f"the server would learn two secrets of client {owner}")
        self.recovered[owner] = secret
        return secret


def _try(shares: dict[int, int], xs: list[int], ok) -> bytes | None:
    try:
        secret = shamir.reconstruct({x: shares[x] for x in xs})
    except ValueError:
        return None
    return secret if ok(secret) else None


def _consistent(shares: dict[int, int], basis: list[int], x: int) -> bool:
    """Whether share x lies on the polynomial through the ``basis`` shares (Lagrange evaluation at x)."""
    if x in basis:
        return True
    value = 0
    for j in basis:
        num, den = 1, 1
        for m in basis:
            if m != j:
                num = num * (x - m) % shamir.PRIME
                den = den * (j - m) % shamir.PRIME
        value = (value + shares[j] * num * pow(den, -1, shamir.PRIME)) % shamir.PRIME
    return value == shares[x]
