"""The ``simulation`` section: Ray-only keys need the Ray backend, and contradictions name the key."""

from __future__ import annotations

import pytest

from fedtune.config.load import parse_config
from fedtune.config.simulation import SimulationConfig
from fedtune.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


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
    ],
)
def test_contradictions_are_errors_that_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"simulation": section})
