"""One client's side of a SecAgg round as a message handler: encoded bytes in, encoded bytes out.

Both carriers use it: the in-process driver (simulation) calls ``respond`` directly, the gRPC participant
calls it for each SecAgg task it pulls. The message type says the stage (PublicParams -> AdvertiseKeys,
Roster -> ShareKeys, Forwarded -> MaskedInput, ConsistencyCheck -> ConsistencySig, UnmaskRequest ->
UnmaskShares), and each stage may be answered once, in order. A client whose own check refuses raises
SecAggAbort (it drops out of the round); a bad ciphertext raises TamperingDetected. Whatever the server
sends, nothing else escapes: a malformed or malicious message is a SecAggAbort, never a crash.

The client's update is quantised only once the invitation (PublicParams) arrives, in the process that
holds the update: over the network the plaintext never leaves the participant.
"""

from __future__ import annotations

from collections.abc import Callable

from fedtune.core.messages import ClientUpdate
from fedtune.privacy.ddp_client import DDP_KEY
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.identity import Signer, Trust
from fedtune.privacy.secagg.messages import (
    ConsistencyCheck,
    Forwarded,
    Message,
    PublicParams,
    Roster,
    UnmaskRequest,
    decode,
    encode,
)
from fedtune.privacy.secagg.policy import ClientPolicy
from fedtune.privacy.sums import channel_value

# The order of the stages, by the type of the message that opens each one.
_OPENS = (PublicParams, Roster, Forwarded, ConsistencyCheck, UnmaskRequest)


def client_for(
    update: ClientUpdate,
    params: PublicParams,
    *,
    identity: Signer | None = None,
    trust: Trust | None = None,
    policy: ClientPolicy | None = None,
) -> SecAggClient:
    """The protocol object for ``update`` in the round ``params`` describes, checked against ``policy``.

    Quantisation draws from a stream private to this client (seeded by the OS, not by the run's public
    seed), so the server cannot know a client's rounding; a SecAgg run is therefore not bit-for-bit
    reproducible: its sum matches the plaintext sum within the quantisation bound (docs/PRIVACY.md).
    """
    try:
        channels = [channel_value(update, name) for name in params.channels]
    except ValueError as err:
        raise SecAggAbort(str(err)) from None
    return SecAggClient(
        update.client_id,
        update.delta,
        params,
        weight=min(update.num_examples, params.weight_cap) / params.weight_cap,
        channels=channels,
        identity=identity,
        trust=trust,
        policy=policy,
        integers=update.extras.get(DDP_KEY),  # distributed DP: already noised on the client
    )


class SecAggPeer:
    """Answers the four stages of one round for one client; ``make`` builds its SecAggClient from the
    invitation (``client_for`` over the network; a ready object, checked against it, in tests)."""

    def __init__(self, client_id: str, make: Callable[[PublicParams], SecAggClient]) -> None:
        self.client_id, self._make = client_id, make
        self.client: SecAggClient | None = None
        self._next = 0  # index into _OPENS of the stage this peer answers next

    @classmethod
    def holding(
        cls, update: ClientUpdate, *, identity: Signer, trust: Trust, policy: ClientPolicy | None = None
    ) -> SecAggPeer:
        def make(params: PublicParams) -> SecAggClient:
            return client_for(update, params, identity=identity, trust=trust, policy=policy)

        return cls(update.client_id, make)

    @classmethod
    def of(cls, client: SecAggClient) -> SecAggPeer:
        def make(params: PublicParams) -> SecAggClient:
            if params != client.params:
                raise SecAggAbort(f"client {client.id}: the invitation differs from the client's parameters")
            return client

        return cls(client.id, make)

    @property
    def finished(self) -> bool:
        return self._next == len(_OPENS)

    def respond(self, data: bytes) -> bytes:
        try:
            return encode(self.answer(decode(data)))
        except SecAggAbort:
            raise
        except (ValueError, TypeError, KeyError, OverflowError, ArithmeticError) as err:
            # e.g. a key cryptography refuses: a malicious message makes this client drop out, never crash
            why = f"{type(err).__name__}: {err}"
            raise SecAggAbort(f"client {self.client_id}: refused an invalid message ({why})") from None

    def answer(self, msg: Message) -> Message:
        if self._next >= len(_OPENS) or not isinstance(msg, _OPENS[self._next]):
            expected = _OPENS[self._next].__name__ if self._next < len(_OPENS) else "nothing (the round is over)"
            raise SecAggAbort(f"client {self.client_id}: got {type(msg).__name__}, expected {expected}")
        self._next += 1
        if isinstance(msg, PublicParams):
            self.client = self._make(msg)
            return self.client.advertise()
        assert self.client is not None
        if isinstance(msg, Roster):
            return self.client.share_keys(msg)
        if isinstance(msg, Forwarded):
            return self.client.masked_input(msg)
        if isinstance(msg, ConsistencyCheck):
            return self.client.consistency(msg)
        assert isinstance(msg, UnmaskRequest)
        return self.client.unmask(msg)
