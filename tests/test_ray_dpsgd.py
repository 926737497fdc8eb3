"""DP-SGD's per-client ledger under Ray: two actors serve a client in turns, and each client's cumulative
epsilon still equals the in-process run's (the ledger lives in the client state store, not in an actor)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

ray = pytest.importorskip("ray")

from fedtune.config.simulation import SimulationConfig  # noqa: E402
from fedtune.run.session import simulate  # noqa: E402
from fedtune.transport.ray_backend import start_ray  # noqa: E402
from test_privacy_dpsgd_ledger import client_records, config  # noqa: E402  # digits CNN, 6 clients, DP-SGD

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


@pytest.fixture(scope="module")
def ray_session():
    assert start_ray(SimulationConfig(backend="ray", num_cpus=2, temp_dir="/tmp/fedtune-ray-tests"))
    yield
    ray.shutdown()


def test_two_ray_workers_report_the_in_process_epsilons(ray_session, tmp_path) -> None:
    quiet = {"show_progress": False, "console": Console(file=io.StringIO())}
    local = client_records(simulate(config(tmp_path, rounds=3), **quiet).run_dir)
    ray_sim = {"backend": "ray", "num_workers": 2, "client_state": "ray"}  # the ledgers in Ray's object store
    on_ray = client_records(simulate(config(tmp_path, rounds=3, **ray_sim), **quiet).run_dir)
    key = ("round", "client_id", "dpsgd_epsilon", "dpsgd_epsilon_round")
    assert [tuple(r[k] for k in key) for r in on_ray] == [tuple(r[k] for k in key) for r in local]
    # Not vacuous: with 2 actors and all 3 requests of a round in flight, the i-th request of a round goes to
    # actor i % 2 (replies come back in request order). Some client must come back on the other actor than
    # the one that trained it last, so its epsilon composes rounds that two actors ran; a ledger kept in an
    # actor would have restarted there.
    last_actor: dict[str, int] = {}
    switched = []
    for rnd in sorted({r["round"] for r in on_ray}):
        for i, r in enumerate(r for r in on_ray if r["round"] == rnd):
            if last_actor.get(r["client_id"], i % 2) != i % 2:
                switched.append(r)
            last_actor[r["client_id"]] = i % 2
    assert switched and all(r["dpsgd_epsilon"] > r["dpsgd_epsilon_round"] for r in switched)
