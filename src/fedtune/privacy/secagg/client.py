"""One client's side of the protocol: a small state machine that holds its secrets across the rounds.

It checks the public parameters against its own floors (policy.py) and quantises its own update before
round 0, and from then on only ever sends signed public keys, ciphertexts for its neighbours, its masked
vector, its signature over the survivor set it was shown, and the shares the protocol allows: for each
neighbour, the share of b_v if v survived or of s_v if v dropped, never both, and only once at least t
of its neighbours signed the same survivor set (Bonawitz et al. 2017, malicious-server variant).

A neighbour whose advertisement fails its signature check or carries an invalid (small-order) X25519
key is dropped from this client's view: it gets no shares and no pairwise mask, and never crashes it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from fedtune.privacy.errors import SecAggAbort, TamperingDetected
from fedtune.privacy.secagg import crypto, shamir
from fedtune.privacy.secagg.graph import neighbour_graph
from fedtune.privacy.secagg.identity import Ed25519Signer, Signer, Trust, advert_data, survivors_data
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
from fedtune.privacy.secagg.policy import ClientPolicy
from fedtune.privacy.secagg.quantize import container, count_clipped, private_rng, quantize, shrink_for_rounding, step

log = logging.getLogger("fedtune.secagg")


def share_threshold(params: PublicParams, degree: int) -> int:
    """t for a client with ``degree`` neighbours: at least 2, and above half of them."""
    return max(2, math.ceil(params.threshold * degree - 1e-9))


def roster_index(ids: Sequence[str]) -> dict[str, int]:
    """Shamir x-coordinates: 1-based positions in the sorted roster (public, the same for everyone)."""
    return {cid: i + 1 for i, cid in enumerate(sorted(ids))}


def _info(kind: str, round_idx: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return f"fedtune-secagg/{kind}/{round_idx}/{lo}/{hi}".encode()


def pair_mask_seed(key: crypto.X25519PrivateKey, peer_s_pk: bytes, round_idx: int, me: str, peer: str) -> bytes:
    return crypto.agree(key, peer_s_pk, info=_info("mask", round_idx, me, peer))


def share_aad(round_idx: int, sender: str, recipient: str) -> bytes:
    return f"fedtune-secagg/share/{round_idx}/{sender}/{recipient}".encode()


def encode_input(
    values: np.ndarray,
    params: PublicParams,
    *,
    weight: float,
    channels: Sequence[float],
    rng: np.random.Generator,
    integers: np.ndarray | None = None,
) -> np.ndarray:
    """The client's plaintext field vector: quantised values, then its weight, its channels, and the fraction
    of its values outside the clip range. A non-finite value refuses the update: quantising NaN would put
    garbage into everyone's sum."""
    if values.shape != (params.num_values,):
        raise SecAggAbort(f"update has {values.shape} values, the round expects {params.num_values}")
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad or not all(np.isfinite([weight, *channels])):
        raise SecAggAbort(
            f"the update has {bad} non-finite values (NaN or Inf) or a non-finite weight/channel; it is refused "
            "before quantisation (it would corrupt the secure sum)"
        )
    if integers is not None:  # distributed DP: the client's noised integers replace its quantised values
        return _integer_input(integers, params, channels)
    b, levels = params.bound, params.levels
    clipped = count_clipped(values, -b, b)
    if params.weighted:  # example weighting: the client sends w_k x_k and w_k, the server divides the sums
        if not 0.0 < weight <= 1.0:
            raise SecAggAbort(f"a client weight must be in (0, 1], got {weight}")
        values = (values.astype(np.float64) * weight).astype(np.float32)
    if params.l2_bound > 0:
        values = shrink_for_rounding(values, l2_bound=params.l2_bound, step_size=step(-b, b, levels))
    parts = [quantize(values, lo=-b, hi=b, levels=levels, rng=rng)]
    scalars = ([weight] if params.weighted else []) + list(channels)
    if len(scalars) != int(params.weighted) + len(params.channels):
        raise SecAggAbort("the client's channels do not match the round's public parameters")
    scalars.append(clipped / max(params.num_values, 1))  # summed securely: the server learns only the total
    parts.append(quantize(np.asarray(scalars, np.float64), lo=0.0, hi=1.0, levels=levels, rng=rng))
    return np.concatenate(parts)


def _integer_input(integers: np.ndarray, params: PublicParams, channels: Sequence[float]) -> np.ndarray:
    """Distributed DP (fedtune.privacy.distributed): int64 values taken mod 2^32, unweighted, no channels,
    then the clipped-value element as 0. The noised integers were clipped in L2 (never per coordinate), and
    a data-dependent count here would be a statistic summed without noise: the constant 0 reveals nothing."""
    if integers.shape != (params.num_values,) or integers.dtype != np.int64:
        raise SecAggAbort(f"distributed DP input has {integers.shape} {integers.dtype}, expected int64 values")
    if params.modulus_bits != 32 or params.weighted or params.channels or channels:
        raise SecAggAbort("distributed DP needs the 32-bit field, no weighting and no channels")
    out = np.zeros(params.length, np.uint32)
    out[: params.num_values] = (integers & np.int64(0xFFFFFFFF)).astype(np.uint32)
    return out


class SecAggClient:
    def __init__(
        self,
        client_id: str,
        values: np.ndarray,
        params: PublicParams,
        *,
        weight: float = 1.0,
        channels: Sequence[float] = (),
        rng: np.random.Generator | None = None,
        identity: Signer | None = None,
        trust: Trust | None = None,
        policy: ClientPolicy | None = None,
        integers: np.ndarray | None = None,  # distributed DP's noised integers (fedtune.privacy.distributed)
    ) -> None:
        """``rng``: the stochastic-rounding stream; by default a private one seeded from the OS (the server
        must not know it). ``identity`` signs this client's messages (a fresh Ed25519 key by default);
        ``trust`` checks the others' (it must be set before the roster arrives). ``policy``: the floors
        this client holds the server's parameters to (by default only the absolute ones)."""
        self.id, self.params = client_id, params
        self.policy = policy if policy is not None else ClientPolicy.permissive()
        self.policy.check_params(params, client_id)
        self.identity: Signer = identity if identity is not None else Ed25519Signer.generate()
        self.trust = trust
        rng = rng if rng is not None else private_rng()
        self.plain = encode_input(values, params, weight=weight, channels=channels, rng=rng, integers=integers)
        self._digest = params_digest(params)
        self._c_key, self._s_key = crypto.new_private_key(), crypto.new_private_key()
        self._b = os.urandom(crypto.KEY_BYTES)  # self-mask seed: hides y_u even if s_u is reconstructed
        self._roster: dict[str, tuple[bytes, bytes]] = {}
        self._credentials: dict[str, bytes] = {}  # accepted neighbour -> its credential
        self._enc_keys: dict[str, bytes] = {}  # accepted neighbour -> the AEAD key of the pair
        self._mask_seeds: dict[str, bytes] = {}  # accepted neighbour -> the pairwise mask seed
        self._neighbours: frozenset[str] = frozenset()
        self._sent_to: frozenset[str] = frozenset()  # neighbours whose advertisements were valid
        self._partners: frozenset[str] = frozenset()  # neighbours it masks with (shares went both ways)
        self.rejected: dict[str, str] = {}  # neighbour -> why its advertisement was refused
        self._signed: tuple[str, ...] | None = None  # the survivor set this client signed
        self._t = 0
        self._held: dict[str, tuple[int, int]] = {}  # neighbour -> (my share of s_v, my share of b_v)

    # round 0 ---------------------------------------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        c_pk, s_pk = crypto.public_bytes(self._c_key), crypto.public_bytes(self._s_key)
        signature = self.identity.sign(advert_data(self.params.round, self.id, c_pk, s_pk, self._digest))
        return AdvertiseKeys(self.id, c_pk, s_pk, self.identity.credential, signature)

    def _advert_problem(self, v: str, roster: Roster) -> str | None:
        """Why neighbour v's advertisement is refused, or None when it is good (then its encryption key and
        pairwise mask seed are derived here, once: the exchanges double as the small-order key check)."""
        c_pk, s_pk = roster.keys[v]
        credential, signature = roster.signed.get(v, (b"", b""))
        assert self.trust is not None
        if not self.trust.verify(v, credential, advert_data(self.params.round, v, c_pk, s_pk, self._digest), signature):
            return "a key advertisement whose signature does not verify"
        try:  # a small-order key gives the all-zero secret, which cryptography refuses with ValueError
            enc = crypto.agree(self._c_key, c_pk, info=_info("enc", self.params.round, self.id, v))
            seed = pair_mask_seed(self._s_key, s_pk, self.params.round, self.id, v)
        except ValueError:
            return "an invalid or small-order X25519 key"
        self._credentials[v], self._enc_keys[v], self._mask_seeds[v] = credential, enc, seed
        return None

    # round 1 ---------------------------------------------------------------------------------------------
    def share_keys(self, roster: Roster) -> ShareKeys:
        if roster.params != self.params:
            raise SecAggAbort(f"client {self.id}: the roster's public parameters differ from the invitation's")
        if roster.keys.get(self.id) != (self.advertise().c_pk, self.advertise().s_pk):
            raise SecAggAbort(f"client {self.id}: the roster does not carry this client's keys")
        if len({pk for pair in roster.keys.values() for pk in pair}) != 2 * len(roster.keys):
            raise SecAggAbort(f"client {self.id}: the roster repeats a public key")
        if self.trust is None:
            raise SecAggAbort(f"client {self.id}: no trusted identities to check the others' advertisements with")
        self.policy.check_roster(self.params, len(roster.keys), self.id)
        self._roster = dict(roster.keys)
        graph = neighbour_graph(list(roster.keys), k=self.params.neighbours or None, seed=self.params.graph_seed)
        self._neighbours = graph[self.id]
        self._t = share_threshold(self.params, len(self._neighbours))
        for v in sorted(self._neighbours):
            problem = self._advert_problem(v, roster)
            if problem is not None:
                self.rejected[v] = problem
                log.warning("secure aggregation: client %s drops peer %s: %s", self.id, v, problem)
        self._sent_to = self._neighbours - self.rejected.keys()
        if self._t > len(self._sent_to):
            raise SecAggAbort(
                f"client {self.id}: {len(self._sent_to)} neighbours with valid advertisements cannot meet "
                f"threshold {self._t}"
            )
        index = roster_index(list(roster.keys))
        xs = [index[v] for v in sorted(self._sent_to)]
        s_shares = shamir.split(crypto.private_bytes(self._s_key), threshold=self._t, xs=xs)
        b_shares = shamir.split(self._b, threshold=self._t, xs=xs)
        round_idx, ciphertexts = self.params.round, {}
        for v in sorted(self._sent_to):
            key = self._enc_keys[v]
            plaintext = (
                _ids(self.id, v) + shamir.encode_share(s_shares[index[v]]) + shamir.encode_share(b_shares[index[v]])
            )
            ciphertexts[v] = crypto.seal(key, plaintext, share_aad(round_idx, self.id, v))
        commit = crypto.commitment(f"{round_idx}/{self.id}".encode(), self._b)
        return ShareKeys(self.id, commit, ciphertexts)

    # round 2 ---------------------------------------------------------------------------------------------
    def masked_input(self, forwarded: Forwarded) -> MaskedInput:
        if forwarded.recipient != self.id:
            raise SecAggAbort(f"client {self.id}: received shares addressed to {forwarded.recipient}")
        senders = set(forwarded.ciphertexts)
        if not senders <= self._sent_to:
            extra = sorted(senders - self._sent_to)
            raise SecAggAbort(f"client {self.id}: shares from peers it did not accept {extra}")
        if len(senders) < self._t:
            raise SecAggAbort(f"client {self.id}: only {len(senders)} neighbours shared keys (threshold {self._t})")
        self._partners = frozenset(senders)
        for v in sorted(senders):
            self._held[v] = self._open_share(v, forwarded.ciphertexts[v])
        p = self.params
        y = self.plain.astype(np.uint32)  # uint32 arithmetic wraps mod 2^32, and R divides 2^32
        y += crypto.mask(self._b, p.length, p.modulus_bits)
        for v in sorted(senders):
            m = crypto.mask(self._mask_seeds[v], p.length, p.modulus_bits)
            if self.id < v:
                y += m
            else:
                y -= m
        if p.modulus_bits < 32:
            y &= np.uint32((1 << p.modulus_bits) - 1)
        return MaskedInput(self.id, y.astype(container(p.modulus_bits)), p.modulus_bits)

    def _open_share(self, sender: str, blob: bytes) -> tuple[int, int]:
        key = self._enc_keys[sender]  # the info is the sorted pair: the same key both ways
        plaintext = crypto.unseal(key, blob, share_aad(self.params.round, sender, self.id))
        if plaintext is None:
            raise TamperingDetected(
                f"client {self.id}: the shares from {sender} fail authentication (altered in transit)", suspect=sender
            )
        head = _ids(sender, self.id)
        if not plaintext.startswith(head) or len(plaintext) != len(head) + 2 * shamir.SHARE_BYTES:
            raise TamperingDetected(f"client {self.id}: shares from {sender} are for another pair", suspect=sender)
        body = plaintext[len(head) :]
        return shamir.decode_share(body[: shamir.SHARE_BYTES]), shamir.decode_share(body[shamir.SHARE_BYTES :])

    # round 3: consistency ----------------------------------------------------------------------------------
    def consistency(self, check: ConsistencyCheck) -> ConsistencySig:
        """Sign the survivor set U3 the server shows this client (once: a second set is refused)."""
        survivors = set(check.survivors)
        if self._signed is not None:
            raise SecAggAbort(f"client {self.id}: asked to sign a second survivor set")
        if self.id not in survivors or not survivors <= self._roster.keys():
            raise SecAggAbort(f"client {self.id}: the survivor set is not a subset of the roster containing it")
        alive = len(survivors & self._partners)
        if alive < self._t:
            # Revealing s-shares of most neighbours would strip this client's pairwise masks.
            raise SecAggAbort(f"client {self.id}: only {alive} neighbours survived (threshold {self._t}); refusing")
        self._signed = tuple(sorted(survivors))
        data = survivors_data(self.params.round, self._signed, self._digest)
        return ConsistencySig(self.id, self.identity.sign(data))

    # round 4: unmasking ------------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Reveal shares only for the survivor set this client signed, and only once at least t of its
        neighbours signed the same set: then no two clients can have been shown different sets with
        enough support to reveal both secrets of anyone (the consistency round of Bonawitz et al.)."""
        survivors = set(request.survivors)
        if self._signed is None or tuple(sorted(survivors)) != self._signed:
            raise SecAggAbort(f"client {self.id}: asked to unmask for a survivor set it did not sign; refusing")
        data = survivors_data(self.params.round, self._signed, self._digest)
        assert self.trust is not None
        if not request.signatures.keys() <= survivors:
            raise SecAggAbort(f"client {self.id}: consistency signatures from clients that are not survivors")
        signers = set()
        for v in sorted(request.signatures.keys() & self._partners):  # neighbours it exchanged shares with
            if len(signers) >= self._t:
                break  # t agreeing neighbours are all the guarantee needs
            if not self.trust.verify(v, self._credentials[v], data, request.signatures[v]):
                raise SecAggAbort(f"client {self.id}: {v}'s signature over the survivor set does not verify")
            signers.add(v)
        agreeing = len(signers)
        if agreeing < self._t:
            raise SecAggAbort(
                f"client {self.id}: only {agreeing} neighbours signed the same survivor set (threshold {self._t}); "
                "refusing to reveal any share"
            )
        b_shares, s_shares = {}, {}
        for v, (s_share, b_share) in sorted(self._held.items()):
            if v in survivors:
                b_shares[v] = shamir.encode_share(b_share)
            else:
                s_shares[v] = shamir.encode_share(s_share)
        return UnmaskShares(self.id, b_shares, s_shares)


def _ids(sender: str, recipient: str) -> bytes:
    a, b = sender.encode(), recipient.encode()
    return len(a).to_bytes(2, "little") + a + len(b).to_bytes(2, "little") + b
