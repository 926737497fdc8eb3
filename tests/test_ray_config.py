"""The ``simulation`` section: Ray-only keys need the Ray backend, and contradictions name the key."""

from __future__ import annotations

import pytest

from fedtune.config.load import parse_config
from fedtune.config.simulation import SimulationConfig
from fedtune.errors import ConfigError


def test_defaults_are_in_process_and_one_process_per_client() -> None:
    sim = SimulationConfig()
    assert (sim.backend, sim.client_nproc, sim.ordered) == ("inprocess", 1, True)


def test_ray_settings_load() -> None:
    cfg = parse_config(
        {"simulation": {"backend": "ray", "num_workers": 2, "num_cpus": 2, "cpus_per_worker": 1, "max_in_flight": 4}}
    )
    assert cfg.simulation.num_workers == 2


@pytest.mark.parametrize(
    "section, message",
    [
        ({"num_workers": 2}, "simulation.num_workers only applies to simulation.backend 'ray'"),
        ({"ray_address": "auto"}, "simulation.ray_address only applies"),
        ({"backend": "ray", "ray_address": "auto", "num_cpus": 2}, "simulation.num_cpus configures a local Ray"),
        ({"backend": "ray", "num_workers": 3, "num_cpus": 2}, "exceeds simulation.num_cpus"),
        ({"backend": "dask"}, "simulation.backend"),
        ({"client_nproc": 0}, "simulation.client_nproc"),
        ({"num_worker": 2}, "simulation.num_worker: unknown key"),
        ({"client_state": "s3://bucket"}, "simulation.client_state must be"),
        ({"client_state": "disk:"}, "simulation.client_state must be"),
        ({"client_state": "memory"}, "simulation.client_state must be"),
        ({"client_state": "ray"}, "simulation.client_state 'ray' .* needs simulation.backend 'ray'"),
        ({"client_state": "ray:run-1"}, "needs simulation.backend 'ray'"),
        ({"backend": "ray", "client_state": "memory:x"}, "'memory:...' lives in one process"),
        ({"client_nproc": 2, "client_state": "memory:x"}, "'memory:...' lives in one process"),
    ],
)
def test_contradictions_are_errors_that_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"simulation": section})


def test_client_state_addresses_resolve_against_the_run_directory(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "demo-20250101-000000"
    assert SimulationConfig().client_state_address(run_dir) == f"disk:{run_dir.resolve()}/client_state"
    on_ray = SimulationConfig(backend="ray", client_state="ray")
    assert on_ray.client_state_address(run_dir) == "ray:demo-20250101-000000"
    for explicit in ("disk:/shared/state", "memory:t"):
        assert SimulationConfig(client_state=explicit).client_state_address(run_dir) == explicit
