"""One client's side of a SecAgg round as a message handler: encoded bytes in, encoded bytes out.

Both carriers use it: the in-process driver (simulation) calls ``respond`` directly, the gRPC participant
calls it for each SecAgg task it pulls. The message type says the stage (PublicParams -> AdvertiseKeys,
Roster -> ShareKeys, Forwarded -> MaskedInput, UnmaskRequest -> UnmaskShares), and each stage may be
answered once, in order. A client whose own check refuses raises SecAggAbort (it drops out of the
round); a bad ciphertext raises TamperingDetected.

The client's update is quantised only once the invitation (PublicParams) arrives, in the process that
holds the update: over the network the plaintext never leaves the participant.
"""

from __future__ import annotations

from collections.abc import Callable

from fedtune.core.messages import ClientUpdate
from fedtune.core.rng import derive_rng
from fedtune.privacy.ddp_client import DDP_KEY
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.messages import Forwarded, Message, PublicParams, Roster, UnmaskRequest, decode, encode
from fedtune.privacy.sums import channel_value

# The order of the stages, by the type of the message that opens each one.
_OPENS = (PublicParams, Roster, Forwarded, UnmaskRequest)


def client_for(update: ClientUpdate, params: PublicParams, *, seed: int) -> SecAggClient:
    """The protocol object for ``update`` in the round ``params`` describes.

    Quantisation draws from ``derive_rng(seed, "secagg-quantise", round, client)``, so a client quantises
    identically whichever process runs it: the simulation and a deployment give the same sum.
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
        rng=derive_rng(seed, "secagg-quantise", params.round, update.client_id),
        integers=update.extras.get(DDP_KEY),  # distributed DP: already noised on the client (h14dp)
    )


class SecAggPeer:
    """Answers the four stages of one round for one client; ``make`` builds its SecAggClient from the
    invitation (``client_for`` over the network; a ready object, checked against it, in tests)."""

    def __init__(self, client_id: str, make: Callable[[PublicParams], SecAggClient]) -> None:
        self.client_id, self._make = client_id, make
        self.client: SecAggClient | None = None
        self._next = 0  # index into _OPENS of the stage this peer answers next

    @classmethod
    def holding(cls, update: ClientUpdate, *, seed: int) -> SecAggPeer:
        return cls(update.client_id, lambda params: client_for(update, params, seed=seed))

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
        return encode(self.answer(decode(data)))

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
        assert isinstance(msg, UnmaskRequest)
        return self.client.unmask(msg)
