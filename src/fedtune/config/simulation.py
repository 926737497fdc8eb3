"""The ``simulation`` section: which backend runs simulated clients, and how wide.

``inprocess`` serves every simulated client from one resident model in this process, one after another.
``ray`` serves them from a pool of Ray actors, each holding ONE resident model (and the clients' data) and
swapping the trainable vector per request, so memory grows with the number of workers, not of clients.
Both give the same result for the same seed (see ``fedtune.transport.ray_backend`` for the conditions).

Whatever a simulated client must remember between rounds (DP-SGD's privacy ledger) lives off-worker, in the
store ``client_state`` names (``fedtune.core.state_store``): workers are shared by all clients and a client
may be served by a different Ray actor every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from fedtune.config.asynchronous import ClientSpeedConfig
from fedtune.config.base import PositiveFloat, PositiveInt, Section

if TYPE_CHECKING:
    from fedtune.config.schema import Config

# Keys that only mean something for the Ray backend: setting one with backend=inprocess is a mistake.
_RAY_ONLY = ("num_workers", "num_cpus", "ray_address", "temp_dir", "object_store_mb")


class SimulationConfig(Section):
    backend: Literal["inprocess", "ray"] = "inprocess"  # inprocess: one model, clients in turn; ray: actor pool
    # ray: actors in the pool (default: the CPUs Ray sees // cpus_per_worker, at least 1)
    num_workers: PositiveInt | None = None
    # ray: CPUs reserved per actor; Ray also sets the actor's OMP/torch thread count to it (rounded down, >= 1)
    cpus_per_worker: PositiveFloat = 1.0
    num_cpus: PositiveInt | None = None  # ray, local start only: CPUs given to ray.init (default: all cores)
    # ray: address of a running cluster ("auto", "ray://head:10001"); null starts a private local Ray
    ray_address: str | None = None
    temp_dir: str | None = None  # ray, local start only: Ray's session folder (default /tmp/fedtune-ray)
    object_store_mb: PositiveInt | None = None  # ray, local start only: object store size (default: Ray's)
    # ray: requests queued per actor; >1 hides the driver's dispatch latency behind the actor's work
    max_in_flight: PositiveInt = 2
    # ray: yield replies in instruction order, so the server folds them in the same order as inprocess and
    # the aggregate is bit-identical; false yields as completed (a straggler then blocks no one, but
    # float summation order, hence the last bits of the aggregate, may differ from run to run)
    ordered: bool = True
    log_to_driver: bool = False  # ray: echo actors' stdout/stderr here (errors reach the driver regardless)
    # processes that train EACH simulated client data-parallel (torch DDP; gloo on CPU, NCCL on GPU);
    # 1 trains in the worker itself. Same minibatches as 1 process; see fedtune.client.distributed
    client_nproc: PositiveInt = 1
    # where each simulated client's state between rounds (DP-SGD's privacy ledger) is kept, off-worker.
    # "disk": <run dir>/client_state, resumed with the run (every worker must see that folder: one machine or
    # a shared filesystem); "ray" (backend ray): Ray's object store under a detached actor named after the run,
    # for clusters without a shared filesystem (it lives as long as the Ray cluster: a private local Ray ends
    # with the run, so resuming needs "disk"); or an explicit "disk:<dir>", "ray:<name>", "memory:<name>"
    # (memory: this process only, backend inprocess with client_nproc 1)
    client_state: str = "disk"
    # server.mode async: the simulated clock's client speeds (lognormal, a slow tail; null: the defaults)
    client_speed: ClientSpeedConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
        self._check_client_state()
        if self.backend != "ray":
            for key in _RAY_ONLY:
                if getattr(self, key) is not None:
                    raise ValueError(f"simulation.{key} only applies to simulation.backend 'ray'")
        if self.ray_address is not None:
            for key in ("num_cpus", "temp_dir", "object_store_mb"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"simulation.{key} configures a local Ray start; it cannot be set with "
                        "simulation.ray_address (the running cluster has its own)"
                    )
        if self.num_cpus and self.num_workers and self.num_workers * self.cpus_per_worker > self.num_cpus:
            raise ValueError(
                f"simulation.num_workers ({self.num_workers}) x simulation.cpus_per_worker "
                f"({self.cpus_per_worker}) exceeds simulation.num_cpus ({self.num_cpus}): "
                "the extra actors would never be scheduled"
            )
        return self

    def _check_client_state(self) -> None:
        kind, sep, where = self.client_state.partition(":")
        if kind not in ("disk", "ray", "memory") or (sep and not where) or (kind == "memory" and not sep):
            raise ValueError(
                f"simulation.client_state must be 'disk', 'ray', 'disk:<dir>', 'ray:<name>' or 'memory:<name>', "
                f"got {self.client_state!r}"
            )
        if kind == "ray" and self.backend != "ray":
            raise ValueError("simulation.client_state 'ray' keeps client state in Ray: needs simulation.backend 'ray'")
        if kind == "memory" and (self.backend != "inprocess" or self.client_nproc > 1):
            raise ValueError(
                "simulation.client_state 'memory:...' lives in one process: it needs simulation.backend 'inprocess' "
                "and simulation.client_nproc 1 (Ray actors and data-parallel ranks would each see their own)"
            )

    def client_state_address(self, run_dir: Path) -> str:
        """The store address for a run in ``run_dir``: 'disk' and 'ray' resolved, an explicit address as given.

        >>> SimulationConfig().client_state_address(Path("/runs/a-1"))
        'disk:/runs/a-1/client_state'
        >>> SimulationConfig(backend="ray", client_state="ray").client_state_address(Path("/runs/a-1"))
        'ray:a-1'
        """
        if self.client_state == "disk":
            # absolute: Ray actors and data-parallel ranks need not share this process's working directory
            return f"disk:{Path(run_dir).resolve() / 'client_state'}"
        if self.client_state == "ray":
            return f"ray:{Path(run_dir).resolve().name}"  # run directory names are unique (timestamped)
        return self.client_state


def with_client_state(config: Config, address: str) -> Config:
    """``config`` with ``simulation.client_state`` set to ``address`` (validated): what the workers are built
    from, so every process that builds one (Ray actors, data-parallel ranks) opens the same store."""
    sim = SimulationConfig.model_validate({**config.simulation.model_dump(), "client_state": address})
    return config.model_copy(update={"simulation": sim})
