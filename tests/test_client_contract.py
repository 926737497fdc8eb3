"""The client side of the round contract: the typed client config survives the wire and is refused there
when it is bad; a fit that fails leaves the worker as a fresh one would be."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from torch import nn

from fedtune.client import hooks
from fedtune.client.worker import ClientWorker
from fedtune.config.privacy import DpSgdConfig
from fedtune.config.schema import ClientConfig
from fedtune.core.fit import LocalHooks
from fedtune.core.messages import FitInstruction
from fedtune.data.types import ArrayExample
from fedtune.errors import UpdateRejected
from fedtune.privacy.dpsgd import DpSgd
from fedtune.tasks.module import ModuleTask
from fedtune.transport.grpc import protocol, wire

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _round_trip(instr: FitInstruction, tamper=None) -> FitInstruction:
    payload = protocol.fit_payload(instr, "task-1")
    if tamper is not None:
        tamper(payload.scalars["train"])
    limits = wire.Limits(max_payload_bytes=1 << 20)
    decoded = wire.decode(list(wire.encode(payload, chunk_bytes=4096)), limits)
    return protocol.fit_from_payload(decoded, instr.client_id)


def _instr(train: ClientConfig) -> FitInstruction:
    return FitInstruction("c1", 3, np.arange(4, dtype=np.float32), "d" * 16, 7, train, options={"proximal_mu": 0.5})


def test_the_typed_client_config_crosses_the_wire_intact() -> None:
    train = ClientConfig(local_steps=3, lr=0.25, optimizer="sgd", straggler_fraction=0.5, max_grad_norm=None)
    got = _round_trip(_instr(train))
    assert isinstance(got.train, ClientConfig) and got.train == train
    assert got.options == {"proximal_mu": 0.5} and got.seed == 7


@pytest.mark.parametrize(
    "tamper, named",
    [
        (lambda t: t.update(lr=-1.0), "lr"),
        (lambda t: t.update(surprise=1), "surprise"),  # unknown keys are errors naming the key
        (lambda t: t.update(straggler_fraction=0.5, local_steps=None, local_epochs=1), "straggler_fraction"),
    ],
)
def test_a_bad_client_config_is_refused_at_the_edge(tamper, named: str) -> None:
    with pytest.raises(UpdateRejected, match=named):
        _round_trip(_instr(ClientConfig(local_steps=2)), tamper)


# ------------------------------------------------------------------------------- a failed fit leaves nothing


class Boom(RuntimeError):
    pass


def _records() -> dict:
    rng = np.random.default_rng(0)
    return {
        cid: ([ArrayExample(rng.normal(size=8).astype(np.float32), int(rng.integers(0, 3))) for _ in range(12)], [])
        for cid in ("c1", "c2")
    }


def _worker(*, fail_on_call: int | None) -> ClientWorker:
    """A worker with DP-SGD (per-sample gradients on the parameters between backward and its hook) and the
    straggler hook (a snapshot kept for the reply); optionally, first, a gradient hook that raises on its n-th
    call: after a backward pass, before DP-SGD's hook has consumed the per-sample gradients."""
    torch.manual_seed(0)
    task = ModuleTask(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))
    dpsgd = DpSgd(DpSgdConfig(noise_multiplier=0.7, max_grad_norm=0.5), state=f"memory:{uuid.uuid4().hex}")
    factories = [dpsgd.hooks, hooks.stragglers]
    if fail_on_call is not None:
        calls = [0]

        def failing(task, instr, view) -> LocalHooks:
            def hook() -> None:
                calls[0] += 1
                if calls[0] == fail_on_call:
                    raise Boom("the client's process hiccuped mid-step")

            return LocalHooks(grad_hooks=[hook])

        factories.insert(0, failing)
    return ClientWorker(task, _records(), hook_factories=factories)


def test_a_fit_that_raises_midway_leaves_the_worker_as_a_fresh_one() -> None:
    # every client is a straggler (a budget of 1-3 of its 4 steps is drawn), so a snapshot is taken
    train = ClientConfig(local_steps=4, batch_size=4, lr=0.1, straggler_fraction=1.0)
    fresh = _worker(fail_on_call=None)
    params = fresh.current_params()
    instr = FitInstruction("c1", 1, params, fresh.view.spec.digest, 11, train)
    expected = fresh.fit(instr)
    assert expected.metrics["straggler"] == 1.0 and expected.metrics["dpsgd_steps"] == 4.0

    used = _worker(fail_on_call=4)  # step 4: after the straggler's snapshot
    with pytest.raises(Boom):
        used.fit(instr)
    for p in used.view.params:
        assert getattr(p, "grad_sample", None) is None and getattr(p, "summed_grad", None) is None
    got = used.fit(instr)  # the same round again (a retry), on the worker that failed
    np.testing.assert_array_equal(got.delta, expected.delta)
    assert _untimed(got.metrics) == _untimed(expected.metrics)


def _untimed(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that do not measure time (fit_seconds, examples_per_s, ...)."""
    return {k: v for k, v in metrics.items() if not k.endswith(("_seconds", "_per_s"))}


# ------------------------------------------------------------------------------- the dropout stream


def test_the_dropout_stream_is_the_one_torch_manual_seed_gives_on_the_cpu() -> None:
    """local_train seeds the device's generator directly (cheap at any stack depth): same draws as before."""
    from fedtune.core.rng import seed_device_stream

    x = torch.ones(64, 32)
    torch.manual_seed(123)
    expected = nn.functional.dropout(x, 0.5, training=True)
    seed_device_stream(123, torch.device("cpu"))
    np.testing.assert_array_equal(nn.functional.dropout(x, 0.5, training=True).numpy(), expected.numpy())
    seed_device_stream(124, torch.device("cpu"))
    assert not torch.equal(nn.functional.dropout(x, 0.5, training=True), expected)
