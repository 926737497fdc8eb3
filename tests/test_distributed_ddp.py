"""Data-parallel local training (2 gloo ranks on CPU) against the oracle: one process on the same batches.

DDP averages gradients over ranks; each rank's loss is weighted by its share of the global batch, so with
SGD the parameters after every step equal a single process's on the whole batch, up to float rounding.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from fedtune.client.distributed import DDPFitter, ProcessGroup, process_group, run_ddp_fit, shard_bounds
from fedtune.client.worker import ClientWorker
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import FitInstruction
from fedtune.data.types import ArrayExample
from fedtune.errors import FedtuneError
from fedtune.tasks.module import ModuleTask

ATOL = 2e-6  # float32 rounding: a two-term gradient average is not summed in the same order as one batch


def make_worker(num_examples: tuple[int, ...] = (13, 8)) -> ClientWorker:
    """A 64-16-10 MLP and synthetic clients; module-level so spawned ranks can unpickle it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    rng = np.random.default_rng(0)
    records = {
        f"c{i}": (
            [ArrayExample(rng.normal(size=64).astype(np.float32), int(rng.integers(10))) for _ in range(n)],
            [],
        )
        for i, n in enumerate(num_examples)
    }
    return ClientWorker(ModuleTask(module), records)


def instruction(worker: ClientWorker, client_id: str, **train) -> FitInstruction:
    cfg = {"optimizer": "sgd", "lr": 0.3, "max_grad_norm": None, "batch_size": 8, "local_steps": 3} | train
    return FitInstruction(
        client_id=client_id,
        round=1,
        params=worker.current_params(),
        spec_digest=worker.view.spec.digest,
        seed=7,
        train=ClientConfig(**cfg),
    )


def test_shard_bounds_cover_the_batch_contiguously() -> None:
    for n in range(0, 12):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    "device, nproc, gpus, backend, rank_devices",
    [
        ("auto", 2, 0, "gloo", ["cpu", "cpu"]),  # no CUDA: gloo on CPU
        ("auto", 2, 1, "gloo", ["cpu", "cpu"]),  # fewer GPUs than ranks: NCCL cannot put two ranks on one GPU
        ("auto", 2, 2, "nccl", ["cuda:0", "cuda:1"]),  # one GPU per rank, indexed by local rank
        ("auto", 3, 8, "nccl", ["cuda:0", "cuda:1", "cuda:2"]),
        ("cpu", 2, 8, "gloo", ["cpu", "cpu"]),  # asked for CPU: GPUs are not used
        ("cuda", 1, 1, "nccl", ["cuda:0"]),
    ],
)
def test_process_group_backend_and_rank_devices(device, nproc, gpus, backend, rank_devices) -> None:
    group = process_group(device, nproc, cuda_devices=gpus)
    assert group.backend == backend
    assert [str(group.rank_device(r)) for r in range(nproc)] == rank_devices
    assert [group.device_ids(r) for r in range(nproc)] == (
        [[r] for r in range(nproc)] if backend == "nccl" else [None] * nproc
    )


def test_process_group_refuses_missing_gpus_and_unknown_devices() -> None:
    with pytest.raises(FedtuneError, match="needs 2 GPUs, found 1"):
        process_group("cuda", 2, cuda_devices=1)
    with pytest.raises(ValueError, match="'tpu'"):
        process_group("tpu", 2, cuda_devices=0)


@pytest.fixture(scope="module")
def fitter():
    with DDPFitter(make_worker, nproc=2) as f:
        assert f.group == ProcessGroup("gloo", "cpu") or torch.cuda.device_count() >= 2
        yield f


@pytest.mark.parametrize(
    "client_id, train",
    [
        # one SGD step on one global batch of 8: each rank takes 4 (the check)
        ("c1", {"local_steps": 1, "full_batch": True}),
        # 13 examples in batches of 8: an uneven last batch (5 = 3 + 2), weights 3/5 and 2/5
        ("c0", {"local_epochs": 2, "local_steps": None}),
        # batches of 1 example: rank 1's shard is empty every step and must join the all-reduce with weight 0
        ("c1", {"batch_size": 1, "local_steps": 4}),
        # gradient clipping sees the all-reduced gradient, as a single process would
        ("c0", {"max_grad_norm": 0.05}),
    ],
)
def test_two_gloo_ranks_equal_one_process(fitter: DDPFitter, client_id: str, train: dict) -> None:
    oracle = make_worker()
    instr = instruction(oracle, client_id, **train)
    expected = oracle.fit(instr)  # plain local_train in this process
    got = fitter.fit(instr)
    assert np.abs(expected.delta).max() > 1e-3, "the oracle must actually move"
    np.testing.assert_allclose(got.delta, expected.delta, rtol=0, atol=ATOL)
    assert got.num_examples == expected.num_examples
    assert got.metrics["steps"] == expected.metrics["steps"]
    assert got.metrics["train_loss"] == pytest.approx(expected.metrics["train_loss"], abs=1e-6)
    assert got.metrics["nproc"] == 2.0


def test_same_instruction_twice_gives_the_same_update(fitter: DDPFitter) -> None:
    """The resident ranks carry nothing from one fit to the next (the vector is rewritten each time)."""
    worker = make_worker()
    instr = instruction(worker, "c0")
    first = fitter.fit(instr)
    fitter.fit(instruction(worker, "c1", lr=1.0))
    assert np.array_equal(fitter.fit(instr).delta, first.delta)


def test_worker_failure_is_reported_not_hung(fitter: DDPFitter) -> None:
    worker = make_worker()
    bad = instruction(worker, "c0")
    bad = FitInstruction(**{**bad.__dict__, "spec_digest": "0" * 16})
    with pytest.raises(ValueError, match="spec"):
        fitter.fit(bad)
    assert fitter.fit(instruction(worker, "c0")).num_examples == 13  # the ranks are still in step


@pytest.mark.slow  # a second pair of ranks: ~30 s of process start-up on the shared 2-core machine
def test_run_ddp_fit_one_shot() -> None:
    factory = functools.partial(make_worker, (6,))
    oracle = factory()
    instr = instruction(oracle, "c0", local_steps=2, batch_size=4)
    got = run_ddp_fit(factory, instr, 2)
    np.testing.assert_allclose(got.delta, oracle.fit(instr).delta, rtol=0, atol=ATOL)
