"""The client API over gRPC gives what the in-process simulation gives, for what the server does around the
user's loop: the exact LoRA modes (fedex, svd: the residual must reach every participant's base weights), and
DP-FedAvg with adaptive clipping (the participant clips its update and reports its clipping bit). Also
``fedtune.federate(trainer, server=...)``: a real ``transformers.Trainer`` joined to a ``fedtune server``.

The oracle is the simulation of the same loop (``fedtune.participate(config, clients=...)``), which the
other tests check against FedAvg and the modes' formulas; here the networked run must match it to the
tolerance of the other gRPC-vs-simulation tests. The server runs in this process (``run_server`` in a
thread), the participants in threads, all on 127.0.0.1 with mutual TLS."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import fedtune
from _grpc_support import DP_ADAPTIVE_SECAGG as SECAGG_DP
from _grpc_support import deployment_section, free_port
from _models import DIGITS_CNN
from fedtune.client.hooks import base_weight
from fedtune.client.weights import TrainableView
from fedtune.config import parse_config
from fedtune.core.state import load_state
from fedtune.run import rundir
from fedtune.run.artifacts import global_extras

NAMES = ["client_000", "client_001"]
SHIFT = {"client_000": 0.03, "client_001": -0.01, "client_002": 0.02}  # unequal: the exact modes' residual is not 0
COUNT = {"client_000": 30, "client_001": 10, "client_002": 20}  # unequal: a misweighted fold fails the comparison
TRAINING = threading.Lock()
TINY_LORA = {"name": "tiny-llama", "max_length": 16, "lora": {"r": 2, "alpha": 4}}


def _pattern(name: str, shape: torch.Size) -> torch.Tensor:
    """A fixed direction per parameter and client, the same in every process (client-specific, so that the
    clients' adapter products span more than rank r and svd's truncation leaves a residual too)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def own_loop(job: fedtune.Job, seen: dict) -> None:
    """A deterministic 'training': every trainable parameter moves along its own direction, by a client-
    and round-dependent amount. Records the base weight of the first LoRA layer (W0, or W0 + s R with the
    residual of the exact modes) as the participant saw it."""
    layer = next((m for m in job.model.modules() if hasattr(m, "base_layer")), None)
    if layer is not None:
        seen[(job.round, job.client_id)] = base_weight(layer).detach().clone()
    with torch.no_grad():
        for name, p in job.model.named_parameters():
            if p.requires_grad:
                p.add_(SHIFT[job.client_id] * job.round * _pattern(f"{job.client_id}/{name}", p.shape))
    job.send(COUNT[job.client_id])


def federation(tmp: Path, pki: Path, port: int, rounds: int, clients: int = 2, **sections: object) -> dict:
    # the server loads no data (the participants hold it); the section only has to suit the model
    data = {"source": "digits", "partition": {"kind": "iid", "num_clients": 2}}
    if sections["model"] != DIGITS_CNN:
        data = {"source": "text", "path": str(tmp / "unused")}
    return {
        "seed": 7,
        "data": data,
        "federation": {"rounds": rounds, "clients_per_round": clients},
        "eval": {"baseline": False},
        "run": {"out_dir": str(tmp / "runs"), "plot": False, "threads": 1},
        "deployment": deployment_section(pki, port, min_clients=clients),
        **sections,
    }


def served(cfg: dict, tmp: Path, pki: Path, port: int, participant: Callable[[str], None], names=NAMES) -> Path:
    """Run ``fedtune server`` (in a thread) and one ``participant(name)`` thread per client; the run directory."""
    from fedtune.deploy.serve import run_server

    outcome: dict = {}
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            outcome["result"] = run_server(parse_config(cfg), console=Console(quiet=True), show_progress=False)
        except BaseException as err:  # reported below
            outcome["error"] = err

    def join(name: str) -> None:
        try:
            participant(name)
        except BaseException as err:
            errors.append(err)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    threads = [threading.Thread(target=join, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    server.join(300)
    for t in threads:
        t.join(60)
    assert not errors, errors  # first: a participant that failed leaves the server without its quorum
    assert not server.is_alive(), "the server did not finish"
    assert "error" not in outcome, outcome.get("error")
    return outcome["result"].run_dir


def tls(pki: Path, name: str) -> dict:
    return {"ca": pki / "ca.pem", "cert": pki / "clients" / f"{name}.pem", "key": pki / "clients" / f"{name}.key"}


def participate_over_grpc(cfg: dict, tmp: Path, pki: Path, port: int, names=NAMES) -> tuple[Path, dict]:
    from fedtune.data.cache import default_cache_dir
    from fedtune.tasks.build import build_run_task

    # the model built once here first: the participants' threads build theirs at the same time, and
    # transformers' lazy imports are not thread-safe (one process per participant, as deployed, has no race)
    config = parse_config(cfg)
    build_run_task(config, num_labels=None, cache_dir=default_cache_dir(config.data.cache_dir))
    seen: dict = {}

    def participant(name: str) -> None:
        run = fedtune.participate(
            server=f"127.0.0.1:{port}", reconnect_timeout_s=120, quiet=True, **tls(pki, name)
        )  # the model comes from the server's config (tiny Llama with its LoRA adapter, or the digits CNN)
        for job in run:
            own_loop(job, seen)
        assert run.result == 0

    return served(cfg, tmp, pki, port, participant, names), seen


def participate_in_simulation(cfg: dict, tmp: Path, names=NAMES) -> tuple[fedtune.SimulationResult, dict]:
    seen: dict = {}
    sim = {k: v for k, v in cfg.items() if k not in ("deployment", "data")}
    sim["run"] = {**cfg["run"], "out_dir": str(tmp / "sim")}
    run = fedtune.participate(sim, clients=names, quiet=True)
    for job in run:
        own_loop(job, seen)
    return run.result, seen


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=2e-5)  # as tests/test_grpc_e2e.py


@pytest.mark.slow  # ~40 s each on an idle machine (the default suite keeps the DP test of this file)
@pytest.mark.parametrize("mode", ["fedex", "svd"])
def test_exact_lora_modes_over_grpc_equal_the_simulation(mode: str, tmp_path: Path, pki: Path) -> None:
    port, rounds = free_port(), 3
    cfg = federation(tmp_path, pki, port, rounds, model=TINY_LORA, server={"lora_aggregation": mode})
    run_dir, seen_net = participate_over_grpc(cfg, tmp_path, pki, port)
    result, seen_sim = participate_in_simulation(cfg, tmp_path)

    state = load_state(run_dir / rundir.CHECKPOINT)
    assert state.round == rounds
    assert_same(state.params, result.state.params)
    net_extras, sim_extras = global_extras(parse_config(cfg), state), global_extras(result.config, result.state)
    assert sorted(net_extras) == sorted(sim_extras) and net_extras, "the residual of the exact mode"
    for key in sim_extras:
        assert_same(net_extras[key], sim_extras[key])
    # every participant's layer held what the simulated one held: W0 in round 1, W0 + s R afterwards
    assert sorted(seen_net) == sorted(seen_sim) == [(r, c) for r in range(1, rounds + 1) for c in NAMES]
    for key, weight in seen_sim.items():
        assert_same(seen_net[key].numpy(), weight.numpy())
    w0, w2 = seen_net[(1, NAMES[0])], seen_net[(2, NAMES[0])]
    assert not torch.allclose(w0, w2, atol=1e-6), "the residual did not reach the participant"
    assert torch.equal(seen_net[(2, NAMES[0])], seen_net[(2, NAMES[1])])  # both got the same global model
    # rounds 2 and 3 sent each participant the increments since the version it held, not the dense residual
    # (fedtune.server.strategies.lora_wire): the download falls by more than half the dense matrices
    dense = sum(v.nbytes for v in net_extras.values())
    sent = [r["bytes_down"] for r in rundir.MetricsLog(run_dir).rounds() if r["round"] > 0]
    assert len(sent) == rounds and all(sent[0] - later > len(NAMES) * dense / 2 for later in sent[1:]), (sent, dense)


DP_ADAPTIVE = {  # the DP-FedAvg of the SecAgg deployment test, with and without SecAgg
    "server": SECAGG_DP["server"],
    "privacy": {"dp": SECAGG_DP["privacy"]["dp"]},
}


@pytest.mark.parametrize(
    "secagg",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # with SecAgg the clipping bits are summed securely too
    ids=["dp-adaptive", "dp-adaptive+secagg"],
)
def test_dp_fedavg_with_adaptive_clipping_over_grpc_equals_the_simulation(
    secagg: bool, tmp_path: Path, pki: Path
) -> None:
    port, rounds = free_port(), 3
    privacy, names = DP_ADAPTIVE["privacy"], NAMES
    if secagg:  # SecAgg needs at least 3 clients
        privacy, names = {**privacy, "secure_aggregation": {"threshold": 0.6}}, [*NAMES, "client_002"]
    cfg = federation(
        tmp_path, pki, port, rounds, len(names), model=DIGITS_CNN, server=DP_ADAPTIVE["server"], privacy=privacy
    )
    run_dir, _ = participate_over_grpc(cfg, tmp_path, pki, port, names)
    result, _ = participate_in_simulation(cfg, tmp_path, names)
    state = load_state(run_dir / rundir.CHECKPOINT)
    assert state.round == rounds
    assert_same(state.params, result.state.params)
    net = [r for r in rundir.MetricsLog(run_dir).rounds() if r["round"] > 0]
    sim = [r for r in result.metrics if r["round"] > 0]
    clip_keys = sorted(k for k in sim[0] if k.startswith("agg_") and "clip" in k)
    assert clip_keys, sim[0]  # the adaptive clip norm and the share of clipped updates are reported
    for a, b in zip(net, sim, strict=True):
        for key in [*clip_keys, "agg_epsilon"]:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    clips = [r[clip_keys[0]] for r in sim]
    assert len(set(clips)) > 1, f"{clip_keys[0]} never adapted: {clips}"


# --------------------------------------------------------------------------------------------- federate


def peft_model():
    from peft import LoraConfig, get_peft_model

    from fedtune.models.hub import load_causal_lm

    base, tokenizer = load_causal_lm("tiny-llama", Path.home() / ".cache" / "fedtune")
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])), tokenizer


def trainer_for(name: str, tmp: Path, model, tokenizer):
    """A peft tiny Llama in a transformers.Trainer, on a one-sentence dataset (identical rows: the minibatch
    order cannot matter, so the networked and simulated runs train on the same batches)."""
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    class OneAtATime(Trainer):
        """Trainers in one process share accelerate's global state (AcceleratorState, GradientState): two
        training at once in threads corrupt each other's steps. Deployed participants are separate processes;
        here the two participants' threads take turns to train."""

        def train(self, *args, **kwargs):
            with TRAINING:
                return super().train(*args, **kwargs)

    text = {"client_000": "the cat sat on the mat", "client_001": "a dog ran in the park"}[name]
    ids = tokenizer(text)["input_ids"][:12]
    ids += [tokenizer.eos_token_id] * (12 - len(ids))
    n = COUNT[name] // 5
    data = datasets.Dataset.from_dict({"input_ids": [ids] * n, "attention_mask": [[1] * 12] * n, "labels": [ids] * n})
    args = TrainingArguments(
        output_dir=str(tmp / f"trainer-{name}"), max_steps=2, per_device_train_batch_size=2, learning_rate=0.05,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    return OneAtATime(model=model, args=args, train_dataset=data, data_collator=default_data_collator)


@pytest.mark.slow  # two Trainers per round on a tiny Llama, twice (networked, then simulated)
def test_federate_a_trainer_over_grpc_equals_the_simulation(tmp_path: Path, pki: Path) -> None:
    port, rounds = free_port(), 2
    model = {**TINY_LORA, "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
    cfg = federation(tmp_path, pki, port, rounds, model=model)

    # built here, not in the participants' threads: transformers' lazy imports are not thread-safe
    own = {name: trainer_for(name, tmp_path, *peft_model()) for name in NAMES}  # each participant its own model

    def participant(name: str) -> None:
        trainer = own[name]
        assert fedtune.federate(trainer, server=f"127.0.0.1:{port}", reconnect_timeout_s=120, quiet=True,
                                **tls(pki, name)) == 0  # fmt: skip

    run_dir = served(cfg, tmp_path, pki, port, participant)
    state = load_state(run_dir / rundir.CHECKPOINT)
    assert state.round == rounds
    # the same trainers in simulation, from the server's initial adapter
    shared, tokenizer = peft_model()  # one model object for every client's trainer, as federate() asks
    TrainableView(shared).write(load_state(run_dir / "initial.safetensors").params)
    trainers = {name: trainer_for(name, tmp_path, shared, tokenizer) for name in NAMES}
    sim = {k: v for k, v in cfg.items() if k not in ("deployment", "data", "model")}
    sim["run"] = {**cfg["run"], "out_dir": str(tmp_path / "sim")}
    result = fedtune.federate(trainers, sim, quiet=True)
    assert state.spec.digest == result.state.spec.digest  # the same adapter parameters were exchanged
    assert_same(state.params, result.state.params)
    initial = load_state(run_dir / "initial.safetensors").params
    assert not np.allclose(state.params, initial, atol=1e-4)  # the trainers did train
    train_losses = [r["train_loss"] for r in rundir.MetricsLog(run_dir).rounds() if r["round"] > 0]
    assert len(train_losses) == rounds and all(np.isfinite(train_losses))


@pytest.mark.slow  # as above
def test_federate_a_trainer_over_grpc_in_the_exact_fedex_mode(tmp_path: Path, pki: Path) -> None:
    """The server's fedex applies to Trainers too: the residual lands in the trainer's peft model. Oracle: the
    same Trainer rounds as a plain ``participate`` loop in simulation (fedtune's own LoRA model of the config)."""
    port, rounds = free_port(), 2
    model = {**TINY_LORA, "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
    cfg = federation(tmp_path, pki, port, rounds, model=model, server={"lora_aggregation": "fedex"})
    own = {name: trainer_for(name, tmp_path, *peft_model()) for name in NAMES}

    def participant(name: str) -> None:
        assert fedtune.federate(own[name], server=f"127.0.0.1:{port}", reconnect_timeout_s=120, quiet=True,
                                **tls(pki, name)) == 0  # fmt: skip

    state = load_state(served(cfg, tmp_path, pki, port, participant) / rundir.CHECKPOINT)
    _, tokenizer = peft_model()
    sim = {k: v for k, v in cfg.items() if k not in ("deployment", "data")}
    sim["run"] = {**cfg["run"], "out_dir": str(tmp_path / "sim")}
    run = fedtune.participate(sim, clients=NAMES, quiet=True)
    for job in run:  # a fresh Trainer each round, as federate's fresh optimizer and schedule
        trainer = trainer_for(job.client_id, tmp_path, job.model, tokenizer)
        trainer.train()
        job.send(len(trainer.train_dataset))
    result = run.result
    assert state.round == rounds and state.spec.digest == result.state.spec.digest
    assert_same(state.params, result.state.params)
    net_extras, sim_extras = global_extras(parse_config(cfg), state), global_extras(result.config, result.state)
    assert sorted(net_extras) == sorted(sim_extras) and net_extras
    for key in sim_extras:
        assert_same(net_extras[key], sim_extras[key])


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"model": DIGITS_CNN, "privacy": {"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}}, "privacy.dpsgd"),
        (
            {"model": {**TINY_LORA, "lora": {"r": 4, "alpha": 8.0}}, "server": {"lora_aggregation": "hetlora"}},
            "'hetlora'",
        ),
    ],
    ids=["dpsgd", "hetlora"],
)
def test_your_own_loop_refuses_a_server_that_asks_for_the_built_in_loop(
    sections: dict, named: str, tmp_path: Path, pki: Path, caplog
) -> None:
    """A real mTLS server whose config needs fedtune's own local loop: the participant with its own loop
    refuses at once, naming what it cannot do (the user's loop gets the error, no job, no hang), and leaves
    with that reason, which the server logs and gives the client's open tasks."""
    import logging

    import yaml

    from _grpc_support import server_starter
    from fedtune.errors import ConfigError

    cfg = federation(tmp_path, pki, free_port(), rounds=2, **sections)
    parse_config(cfg)  # a valid federation: only a loop that is not fedtune's cannot run it
    with server_starter(pki, config_yaml=yaml.safe_dump(cfg), min_clients=1, poll_s=0.3) as start:
        server = start()
        run = fedtune.participate(
            server=f"127.0.0.1:{server.port}", reconnect_timeout_s=60, quiet=True, **tls(pki, "client_000")
        )
        outcome: dict = {}

        def loop() -> None:
            try:
                for job in run:
                    outcome.setdefault("jobs", []).append(job)
                    job.send(1)
            except BaseException as err:  # the user's loop sees it
                outcome["error"] = err

        with caplog.at_level(logging.INFO, logger="fedtune.server"):
            user = threading.Thread(target=loop, daemon=True)
            user.start()
            user.join(120)  # a hang guard: it ends as soon as the participant has refused
            assert not user.is_alive(), "the participant did not stop"
        # the participant stopped after the server answered its Leave, which the server logs before answering
        left = [r.getMessage() for r in caplog.records if "left:" in r.getMessage()]
        assert "jobs" not in outcome
        assert isinstance(outcome.get("error"), ConfigError) and named in str(outcome["error"])
        assert "your own training loop cannot apply" in str(outcome["error"])
        assert len(left) == 1 and left[0].startswith("client client_000 left: ") and named in left[0]
        assert "client_000" not in server.registry.live()
