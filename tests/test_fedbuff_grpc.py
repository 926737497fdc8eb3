"""FedBuff over gRPC with real participants (threads of this process, mutual TLS on loopback): up to M clients
training at once, each on the version it was dispatched with (sent with the task and echoed in the result),
staleness recorded, a dropped participant replaced, and, with the arrival order forced (M = K = 1), the same model
bit for bit as the simulated run. Nothing here waits on a timer: the server blocks on replies, and the test on
the run's end or on events set by the participants."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from _grpc_support import server_starter
from fedtune.core.messages import ClientEval, EvalSums
from fedtune.core.state import load_state, save_state
from fedtune.server.async_loop import SCHEDULE_KEY, build_fedbuff, run_async
from fedtune.transport.grpc.client import ClientTLS, Participant
from test_fedbuff_loop import DIM, TargetClients, _spec, async_config

pytestmark = pytest.mark.timeout(600)  # a hang guard for a loaded machine, not a speed test

IDS = [f"client_{i:03d}" for i in range(4)]
LENIENT = {"heartbeat_s": 1.0, "missed_heartbeats": 600, "round_timeout_s": 600, "quorum_timeout_s": 600}


class TargetWorker:
    """One participant's worker: TargetClients' rule (move halfway to its own target), the version echoed.
    ``hold(dispatch)`` runs before each fit and may block it (a forced straggler); ``fail``: dispatch numbers
    whose fit raises (the participant reports the failure, the server frees the slot)."""

    def __init__(self, cid: str, clients: TargetClients, hold, fail: set[int]) -> None:
        self.cid, self.clients, self.hold, self.fail = cid, clients, hold, fail
        self.fits: list[tuple[int, int | None]] = []  # (dispatch, version) of every task received

    def fit(self, instr):
        self.fits.append((instr.round, instr.version))
        self.hold(instr.round)
        if instr.round in self.fail:
            raise RuntimeError(f"dispatch {instr.round} breaks down")
        (update,) = list(self.clients.fit([replace(instr, client_id=self.cid)]))
        return replace(update, version=instr.version)

    def evaluate(self, instr):
        return ClientEval(self.cid, instr.round, EvalSums(1.0, 1, 0, 1))


def _participants(pki, port, clients, hold, fail):
    workers, threads, parts = {}, [], {}
    for cid in IDS:
        workers[cid] = TargetWorker(cid, clients, hold, fail)
        tls = ClientTLS.from_paths(pki / "ca.pem", pki / f"clients/{cid}.pem", pki / f"clients/{cid}.key")
        parts[cid] = Participant(
            f"127.0.0.1:{port}", tls, make_worker=lambda joined, w=workers[cid]: w, reconnect_timeout_s=60
        )
        threads.append(threading.Thread(target=parts[cid].run, daemon=True))
    for t in threads:
        t.start()
    return workers, threads


def _grpc_config(**over):
    # the clients' ids are the certificates' names: the simulated population is the same sorted list
    return async_config(**{"federation": {"rounds": 6}, "eval": {"every": 3}, **over})


def _run_over_grpc(pki, config, state=None, hold=lambda dispatch: None, fail=(), on_round=None, watch=None):
    clients = TargetClients(0)
    clients.targets = {cid: t for cid, t in zip(IDS, TargetClients(len(IDS)).targets.values(), strict=True)}
    clients.sizes = {cid: 2 + i for i, cid in enumerate(IDS)}
    reports = []
    with server_starter(pki, min_clients=len(IDS), **LENIENT) as make:
        transport = make()
        workers, threads = _participants(pki, transport.port, clients, hold, set(fail))
        server = build_fedbuff(config)
        state = state or server.init_state(np.zeros(DIM, np.float32), _spec())

        def record(new, report):
            reports.append(report)
            if on_round is not None:
                on_round(new, report)

        try:
            dispatch = transport if watch is None else watch(transport)
            final = run_async(config, server, transport, state, on_round=record, dispatch=dispatch)
        finally:
            transport.close(reason="test over")
            for t in threads:
                t.join(60)
    return final, reports, workers


def _run_simulated(config):
    clients = TargetClients(0)
    clients.ids = list(IDS)
    clients.targets = {cid: t for cid, t in zip(IDS, TargetClients(len(IDS)).targets.values(), strict=True)}
    clients.sizes = {cid: 2 + i for i, cid in enumerate(IDS)}
    server = build_fedbuff(config)
    state = server.init_state(np.zeros(DIM, np.float32), _spec())
    return run_async(config, server, clients, state)


@pytest.mark.slow  # two short gRPC runs with four participants (~30 s on a loaded machine)
def test_a_forced_arrival_order_equals_the_simulated_run_and_resumes_exactly(pki, tmp_path):
    config = _grpc_config(server={"optimizer": "adam", "fedbuff": {"concurrency": 1, "buffer_size": 1}})
    simulated = _run_simulated(config)
    networked, reports, workers = _run_over_grpc(pki, config)
    assert networked.params.tobytes() == simulated.params.tobytes()
    # the same dispatches: each client trained on the version it was sent, and said so
    assert all(not r.failures and [c["staleness"] for c in r.clients] == [0] for r in reports)
    assert sorted(d for w in workers.values() for d, _ in w.fits) == list(range(1, 7))
    assert networked.extra[SCHEDULE_KEY]["dispatches"] == 6

    # a server stopped after step 3 and restarted from its checkpoint goes on to the same model
    path = tmp_path / "checkpoint.safetensors"

    class Stop(Exception):
        pass

    def stop_at_three(state, report):
        save_state(state, path, config_digest="t")
        if state.round == 3:
            raise Stop

    with pytest.raises(Stop):
        _run_over_grpc(pki, config, on_round=stop_at_three)
    resumed, _, _ = _run_over_grpc(pki, config, state=load_state(path, config_digest="t"))
    assert resumed.round == 6 and resumed.params.tobytes() == simulated.params.tobytes()


def test_m_clients_train_at_once_a_straggler_arrives_stale_and_a_failure_frees_its_slot(pki):
    """M = 3, K = 2: the first dispatch is held until step 2 has been taken, and every fit started after that
    waits until the server has dispatch 1's reply, so dispatch 1 is folded at least 2 versions stale (by step 4
    at the latest); dispatch 2 fails on its participant, and the step waits for another arrival instead."""
    released, first_in = threading.Event(), threading.Event()
    config = _grpc_config(server={"optimizer": "sgd", "lr": 1.0, "fedbuff": {"concurrency": 3, "buffer_size": 2}})

    def hold(dispatch):
        if dispatch == 1:
            released.wait()
        elif released.is_set():
            first_in.wait()

    class Watch:  # the transport's Dispatch, noting when dispatch 1's reply reaches the server
        def __init__(self, inner):
            self.inner = inner

        def connected(self):
            return self.inner.connected()

        def dispatch(self, instruction):
            self.inner.dispatch(instruction)

        def next_reply(self, timeout):
            reply = self.inner.next_reply(timeout)
            if reply is not None and reply.round == 1:
                first_in.set()
            return reply

        def abandon(self):
            self.inner.abandon()

    def release_after_two(state, report):
        if state.round == 2:
            released.set()

    final, reports, workers = _run_over_grpc(pki, config, hold=hold, fail={2}, on_round=release_after_two, watch=Watch)
    assert final.round == 6 and all(len(r.clients) == 2 for r in reports)
    staleness = {c["dispatch"]: c["staleness"] for r in reports for c in r.clients}
    assert staleness[1] >= 2 and 2 not in staleness
    (failed,) = [f for r in reports for f in r.failures]
    assert failed.round == 2 and "breaks down" in failed.reason
    # every fit was sent the version it trained on, never newer than the dispatch allows
    sent = {d: v for w in workers.values() for d, v in w.fits}
    assert sent[1] == 0 and all(v is not None and v <= d for d, v in sent.items())
    assert all(sent[d] == staleness_at - s for d, s, staleness_at in _steps_of(reports))
    assert reports[2].eval_pooled is not None and reports[2].eval_pooled.count == len(IDS)


def _steps_of(reports):
    """(dispatch, staleness, the server version it arrived at) of every folded arrival."""
    return [(c["dispatch"], c["staleness"], r.round - 1) for r in reports for c in r.clients]


@pytest.mark.slow  # `fedtune server` in a thread, three `fedtune.participate` threads, and the simulation (~40 s)
def test_fedtune_server_runs_async_with_participants_and_equals_the_simulation(tmp_path, pki):
    """The whole deployed path: run_server -> coordinate -> the transport's Dispatch, participants running their
    own loop (fedtune.participate), M = K = 1 so the order is forced; the simulated run of the same loop is the
    oracle, bit for bit, and the run directory records versions and staleness per step."""
    from _grpc_support import free_port
    from _models import DIGITS_CNN
    from fedtune.run import rundir
    from test_participate_grpc_modes import federation, participate_in_simulation, participate_over_grpc

    names, port, steps = ["client_000", "client_001", "client_002"], free_port(), 5
    server = {
        "mode": "async",
        "fedbuff": {"concurrency": 1, "buffer_size": 1},
        "optimizer": "momentum",
        "lr": 0.5,
        "update_norm_bound": "off",  # `fedtune server` would make "auto" adaptive; the simulation keeps it off
        "max_examples_per_client": "off",
    }
    cfg = federation(tmp_path, pki, port, steps, len(names), model=DIGITS_CNN, server=server)
    cfg["client"] = {"local_steps": 2}
    cfg["deployment"] = {**cfg["deployment"], **LENIENT}
    run_dir, _ = participate_over_grpc(cfg, tmp_path, pki, port, names)
    result, _ = participate_in_simulation(cfg, tmp_path, names)
    state = load_state(run_dir / rundir.CHECKPOINT)
    assert state.round == steps and state.params.tobytes() == result.state.params.tobytes()
    records = rundir.MetricsLog(run_dir).read()
    arrivals = [r for r in records if r["kind"] == "client"]
    assert [r["dispatch"] for r in arrivals] == list(range(1, steps + 1))
    assert all(r["staleness"] == 0 and r["seconds"] >= 0 for r in arrivals)
    steps_logged = [r for r in records if r["kind"] == "round" and r["round"] > 0]
    assert [r["agg_dispatches"] for r in steps_logged] == list(range(1, steps + 1))


def test_the_version_travels_with_the_task_and_the_result_and_a_wrong_echo_is_rejected():
    from fedtune.config.schema import ClientConfig
    from fedtune.core.messages import ClientUpdate, FitInstruction
    from fedtune.errors import UpdateRejected
    from fedtune.transport.codecs import build_codec
    from fedtune.transport.grpc import protocol

    spec = _spec()
    instr = FitInstruction("c", 7, np.zeros(DIM, np.float32), spec.digest, 0, ClientConfig(), version=3)
    assert protocol.fit_from_payload(protocol.fit_payload(instr, "t"), "c").version == 3
    sync = replace(instr, version=None)  # a synchronous round's task names no version
    assert "version" not in protocol.fit_payload(sync, "t").scalars
    update = ClientUpdate("c", 7, 5, np.ones(DIM, np.float32), spec.digest, version=3)
    payload, _ = protocol.update_payload(update, task_id="t", session="s", codec=build_codec("none"), residual=None)
    decoded = protocol.update_from_payload(payload, client_id="c", numel=DIM, spec_digest=spec.digest)
    assert decoded.version == 3
    payload.scalars["version"] = -1
    with pytest.raises(UpdateRejected, match="version -1 is negative"):
        protocol.update_from_payload(payload, client_id="c", numel=DIM, spec_digest=spec.digest)

    class WrongEcho(TargetClients):  # answers every dispatch claiming it trained on version 99
        def fit(self, instructions):
            return (replace(u, version=99) for u in super().fit(instructions))

    config = async_config(federation={"rounds": 2})
    server = build_fedbuff(config)
    reports = []
    run_async(
        config,
        server,
        WrongEcho(20),
        server.init_state(np.zeros(DIM, np.float32), _spec()),
        on_round=lambda s, r: reports.append(r),
    )
    assert all(r.rejected and not r.clients for r in reports)
    assert all("trained on model version 99" in f.reason for r in reports for f in r.failures)
