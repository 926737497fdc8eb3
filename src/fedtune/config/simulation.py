"""The ``simulation`` section: which backend runs simulated clients, and how wide.

``inprocess`` serves every simulated client from one resident model in this process, one after another.
``ray`` serves them from a pool of Ray actors, each holding ONE resident model (and the clients' data) and
swapping the trainable vector per request, so memory grows with the number of workers, not of clients.
Both give the same result for the same seed (see ``fedtune.transport.ray_backend`` for the conditions).
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from fedtune.config.base import PositiveFloat, PositiveInt, Section

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

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
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
