"""The public Python API: fedtune.simulate with a user's own module, datasets, loss and evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import fedtune
from fedtune.client.weights import TrainableView
from fedtune.core.state import load_state
from fedtune.errors import ConfigError, DataError, ModelError
from fedtune.run import rundir


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def blobs(n: int = 240) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def config(tmp_path: Path, rounds: int = 3, **over: object) -> dict:
    return {
        "seed": 5,
        "data": {"partition": {"kind": "dirichlet_sizes", "num_clients": 4, "alpha": 2.0}},
        "federation": {"rounds": rounds, "clients_per_round": 2},
        "client": {"local_steps": 4, "batch_size": 16, "lr": 0.05},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
        **over,
    }


def test_own_module_and_dataset_train_and_write_a_truthful_config(tmp_path: Path) -> None:
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    result = fedtune.simulate(config(tmp_path), model=model, datasets=blobs(), quiet=True)
    written = yaml.safe_load((result.run_dir / rundir.CONFIG).read_text())
    assert written["data"]["source"] == "python" and written["model"]["name"] == "python:Net"
    assert written["model"]["kind"] == "module" and written["model"]["lora"] is None
    # the federated model is better than the initial one on held-out data
    assert result.metrics[0]["round"] == 0 and result.final["round"] == 3
    assert result.final["eval_accuracy"] > result.metrics[0]["eval_accuracy"]
    # the returned module is a copy holding the checkpoint's global weights; the user's object is untouched
    assert isinstance(result.model, Net) and result.model is not model
    assert np.array_equal(TrainableView(result.model).read(), load_state(result.run_dir / rundir.CHECKPOINT).params)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_resume_with_the_same_objects_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    full = fedtune.simulate(config(tmp_path / "a"), model=net(), datasets=blobs(), quiet=True)
    part = fedtune.simulate(config(tmp_path / "b", rounds=2), model=net(), datasets=blobs(), quiet=True)
    resumed = fedtune.simulate(config(tmp_path / "b"), model=net(), datasets=blobs(), resume=part.run_dir, quiet=True)
    assert resumed.run_dir == part.run_dir and resumed.state.round == 3
    assert np.array_equal(resumed.state.params, full.state.params)
    assert [r["eval_loss"] for r in resumed.metrics] == [r["eval_loss"] for r in full.metrics]
    # config=None with resume: the run's own config.yaml
    again = fedtune.simulate(model=net(), datasets=blobs(), resume=part.run_dir, quiet=True)
    assert again.state.round == 3


def test_cli_resume_of_a_python_run_says_how_to_resume(tmp_path: Path) -> None:
    from fedtune.cli import app

    result = fedtune.simulate(config(tmp_path, rounds=1), model=net(), datasets=blobs(), quiet=True)
    out = CliRunner().invoke(app, ["run", "--resume", str(result.run_dir)], env={"COLUMNS": "200"})
    assert out.exit_code == 2
    text = " ".join(out.output.split())
    assert "built in Python" in text and "fedtune.simulate(" in text and "resume=RUN_DIR" in text
    assert load_state(result.run_dir / rundir.CHECKPOINT).round == 1  # nothing lost
    out = CliRunner().invoke(app, ["export", str(result.run_dir), str(tmp_path / "export")], env={"COLUMNS": "200"})
    assert out.exit_code != 0 and "result.model" in " ".join(out.output.split())


def test_one_dataset_per_client_with_own_loss_and_evaluation(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    w = np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)

    def site(n: int) -> object:
        x = rng.normal(size=(n, 4)).astype(np.float32)
        return datasets.Dataset.from_dict({"features": x.tolist(), "target": (x @ w).tolist()})

    def mse(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(batch["features"].float())[:, 0], batch["target"].float())

    def evaluate(model: torch.nn.Module, batch: dict) -> dict:
        return {"loss": float(mse(model, batch)), "accuracy": 0.25}

    sites = {"north": site(60), "south": site(30), "east": {"train": site(40), "test": site(10)}}
    cfg = config(tmp_path, data={}, client={"local_steps": 8, "batch_size": 8, "lr": 0.05, "optimizer": "sgd"})
    result = fedtune.simulate(cfg, model=net(), datasets=sites, loss=mse, evaluate=evaluate, quiet=True)
    assert result.final["eval_loss"] < result.metrics[0]["eval_loss"]
    assert result.final["eval_accuracy"] == pytest.approx(0.25, abs=0.02)  # evaluate's figure, size-weighted
    clients = {r["client_id"] for r in rundir.MetricsLog(result.run_dir).read() if r["kind"] == "client"}
    assert clients <= {"north", "south", "east"} and clients


def test_bad_objects_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no natural clients"):
        fedtune.simulate(config(tmp_path, data={}), model=net(), datasets=blobs(), quiet=True)
    with pytest.raises(DataError, match="one dataset per client"):
        fedtune.simulate(config(tmp_path), model=net(), datasets={"train": blobs(), "test": blobs()}, quiet=True)
    with pytest.raises(ConfigError, match="in this process"):
        fedtune.simulate(config(tmp_path, simulation={"backend": "ray"}), model=net(), datasets=blobs(), quiet=True)
    done = fedtune.simulate(config(tmp_path, rounds=1), model=net(), datasets=blobs(), quiet=True)
    with pytest.raises(ModelError, match="pass the same model"):
        fedtune.simulate(datasets=blobs(), resume=done.run_dir, quiet=True)
    with pytest.raises(DataError, match="default loss"):
        fedtune.simulate(config(tmp_path), model=net(), datasets=[{"a": torch.zeros(4)}] * 40, quiet=True)
    assert not any(
        p.name.startswith("run-") and not (p / rundir.CHECKPOINT).exists() for p in (tmp_path / "runs").iterdir()
    )  # failed starts leave no run directory


@pytest.mark.slow  # docs/PYTHON_API.md's Hugging Face example runs by default (tests/test_python_api_docs.py)
def test_hugging_face_model_object_with_lora_on_a_datasets_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from fedtune.models.hub import load_causal_lm

    cache = Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))
    model, tokenizer = load_causal_lm("tiny-llama", cache)
    lines = ["the cat sat on the mat and looked at the door", "a dog ran in the park after the red ball"] * 30
    cfg = {
        "model": {"max_length": 16, "lora": {"r": 2, "alpha": 4}},
        "data": {"partition": {"kind": "iid", "num_clients": 3}},
        "federation": {"rounds": 2, "clients_per_round": 2},
        "client": {"local_steps": 3, "batch_size": 4, "lr": 0.05},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }
    result = fedtune.simulate(
        cfg, model=model, tokenizer=tokenizer, datasets=datasets.Dataset.from_dict({"text": lines}), quiet=True
    )
    written = yaml.safe_load((result.run_dir / rundir.CONFIG).read_text())
    assert written["model"]["name"] == "python:LlamaForCausalLM" and written["model"]["kind"] == "causal_lm"
    assert result.final["eval_perplexity"] < result.metrics[0]["eval_perplexity"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # the user's model is not wrapped
