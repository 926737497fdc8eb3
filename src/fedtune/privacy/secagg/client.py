"""One client's side of the protocol: a small state machine that holds its secrets across the rounds.

It quantises its own update before round 0 (it knows the public parameters), and from then on only
ever sends public keys, ciphertexts for its neighbours, its masked vector, and the shares the protocol
allows: for each neighbour, the share of b_v if v survived or of s_v if v dropped, never both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from fedtune.privacy.errors import SecAggAbort, TamperingDetected
from fedtune.privacy.secagg import crypto, shamir
from fedtune.privacy.secagg.graph import neighbour_graph
from fedtune.privacy.secagg.messages import (
    AdvertiseKeys,
    Forwarded,
    MaskedInput,
    PublicParams,
    Roster,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedtune.privacy.secagg.quantize import container, quantize, shrink_for_rounding, step


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
    """The client's plaintext field vector: quantised values, then its weight, then its channels."""
    if values.shape != (params.num_values,):
        raise SecAggAbort(f"update has {values.shape} values, the round expects {params.num_values}")
    if integers is not None:  # h14dp: distributed DP, the client's noised integers replace its quantised values
        return _integer_input(integers, params, channels)
    b, levels = params.bound, params.levels
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
    if scalars:
        parts.append(quantize(np.asarray(scalars, np.float64), lo=0.0, hi=1.0, levels=levels, rng=rng))
    return np.concatenate(parts)


def _integer_input(integers: np.ndarray, params: PublicParams, channels: Sequence[float]) -> np.ndarray:
    """Distributed DP (fedtune.privacy.distributed): int64 values taken mod 2^32, unweighted, no channels."""
    if integers.shape != (params.num_values,) or integers.dtype != np.int64:
        raise SecAggAbort(f"distributed DP input has {integers.shape} {integers.dtype}, expected int64 values")
    if params.modulus_bits != 32 or params.weighted or params.channels or channels:
        raise SecAggAbort("distributed DP needs the 32-bit field, no weighting and no channels")
    return (integers & np.int64(0xFFFFFFFF)).astype(np.uint32)


class SecAggClient:
    def __init__(
        self,
        client_id: str,
        values: np.ndarray,
        params: PublicParams,
        *,
        weight: float = 1.0,
        channels: Sequence[float] = (),
        rng: np.random.Generator,
        integers: np.ndarray | None = None,  # distributed DP's noised integers (h14dp)
    ) -> None:
        self.id, self.params = client_id, params
        self.plain = encode_input(values, params, weight=weight, channels=channels, rng=rng, integers=integers)
        self._c_key, self._s_key = crypto.new_private_key(), crypto.new_private_key()
        self._b = os.urandom(crypto.KEY_BYTES)  # self-mask seed: hides y_u even if s_u is reconstructed
        self._roster: dict[str, tuple[bytes, bytes]] = {}
        self._neighbours: frozenset[str] = frozenset()
        self._t = 0
        self._held: dict[str, tuple[int, int]] = {}  # neighbour -> (my share of s_v, my share of b_v)

    # round 0 ---------------------------------------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        return AdvertiseKeys(self.id, crypto.public_bytes(self._c_key), crypto.public_bytes(self._s_key))

    # round 1 ---------------------------------------------------------------------------------------------
    def share_keys(self, roster: Roster) -> ShareKeys:
        if roster.params != self.params:
            raise SecAggAbort(f"client {self.id}: the roster's public parameters differ from the invitation's")
        if roster.keys.get(self.id) != (self.advertise().c_pk, self.advertise().s_pk):
            raise SecAggAbort(f"client {self.id}: the roster does not carry this client's keys")
        if len({pk for pair in roster.keys.values() for pk in pair}) != 2 * len(roster.keys):
            raise SecAggAbort(f"client {self.id}: the roster repeats a public key")
        self._roster = dict(roster.keys)
        graph = neighbour_graph(list(roster.keys), k=self.params.neighbours or None, seed=self.params.graph_seed)
        self._neighbours = graph[self.id]
        self._t = share_threshold(self.params, len(self._neighbours))
        if self._t > len(self._neighbours):
            raise SecAggAbort(f"client {self.id}: {len(self._neighbours)} neighbours cannot meet threshold {self._t}")
        index = roster_index(list(roster.keys))
        xs = [index[v] for v in sorted(self._neighbours)]
        s_shares = shamir.split(crypto.private_bytes(self._s_key), threshold=self._t, xs=xs)
        b_shares = shamir.split(self._b, threshold=self._t, xs=xs)
        round_idx, ciphertexts = self.params.round, {}
        for v in sorted(self._neighbours):
            key = crypto.agree(self._c_key, roster.keys[v][0], info=_info("enc", round_idx, self.id, v))
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
        if not senders <= self._neighbours:
            raise SecAggAbort(f"client {self.id}: shares from non-neighbours {sorted(senders - self._neighbours)}")
        if len(senders) < self._t:
            raise SecAggAbort(f"client {self.id}: only {len(senders)} neighbours shared keys (threshold {self._t})")
        for v in sorted(senders):
            self._held[v] = self._open_share(v, forwarded.ciphertexts[v])
        p = self.params
        y = self.plain.astype(np.uint32)  # uint32 arithmetic wraps mod 2^32, and R divides 2^32
        y += crypto.mask(self._b, p.length, p.modulus_bits)
        for v in sorted(senders):
            m = crypto.mask(
                pair_mask_seed(self._s_key, self._roster[v][1], p.round, self.id, v), p.length, p.modulus_bits
            )
            if self.id < v:
                y += m
            else:
                y -= m
        if p.modulus_bits < 32:
            y &= np.uint32((1 << p.modulus_bits) - 1)
        return MaskedInput(self.id, y.astype(container(p.modulus_bits)), p.modulus_bits)

    def _open_share(self, sender: str, blob: bytes) -> tuple[int, int]:
        key = crypto.agree(self._c_key, self._roster[sender][0], info=_info("enc", self.params.round, sender, self.id))
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

    # round 3 ---------------------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        survivors = set(request.survivors)
        if self.id not in survivors:
            raise SecAggAbort(f"client {self.id}: not in the survivor list it is asked to unmask for")
        alive = len(survivors & self._neighbours)
        if alive < self._t:
            # Revealing s-shares of most neighbours would strip this client's pairwise masks.
            raise SecAggAbort(f"client {self.id}: only {alive} neighbours survived (threshold {self._t}); refusing")
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
