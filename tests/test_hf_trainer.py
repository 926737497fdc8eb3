"""client.trainer: hf (transformers.Trainer runs the local round) and fedtune.federate(trainer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedtune.client.hf_trainer import hf_local_train
from fedtune.client.train import LocalHooks, LocalRun, local_train
from fedtune.config import parse_config
from fedtune.config.schema import ClientConfig
from fedtune.errors import ConfigError
from fedtune.tasks.python import PythonTask

CACHE = Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))


def _trained(train, **client: object) -> tuple[torch.Tensor, object]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, generator=g), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(1)
    task = PythonTask(torch.nn.Linear(3, 3))
    cfg = ClientConfig(**{"local_steps": 5, "lr": 0.2, "lr_scheduler_type": "cosine", "warmup_steps": 3, **client})
    examples = task.encode(list(zip(x, y, strict=True)), train=True)
    result = train(task, examples, cfg, LocalRun(0, 2, "a", rounds=3), hooks=LocalHooks())
    return torch.cat([p.detach().flatten() for p in task.module.parameters()]), result


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_trainer_round_equals_the_builtin_loop_on_full_batches(optimizer: str) -> None:
    # full batches make the data order irrelevant: what is left is the optimizer, schedule position and clipping
    ours, a = _trained(local_train, full_batch=True, optimizer=optimizer, max_grad_norm=0.5)
    hf, b = _trained(hf_local_train, full_batch=True, optimizer=optimizer, max_grad_norm=0.5)
    assert torch.allclose(ours, hf, atol=1e-5) and a.steps == b.steps == 5
    assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
    other, _ = _trained(
        hf_local_train, full_batch=True, optimizer=optimizer, max_grad_norm=0.5, lr_scheduler_type="linear"
    )
    assert not torch.allclose(other, hf, atol=1e-4)  # the schedule is applied


def test_trainer_accumulates_like_the_builtin_loop() -> None:
    _, result = _trained(hf_local_train, batch_size=4, gradient_accumulation_steps=3)
    assert result.steps == 5


def test_what_needs_the_builtin_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="FedProx"):
        parse_config({"client": {"trainer": "hf"}, "server": {"proximal_mu": 0.1}})
    with pytest.raises(ConfigError, match=r"server\.scaffold"):
        parse_config({"client": {"trainer": "hf"}, "server": {"scaffold": True}})
    with pytest.raises(ConfigError, match="one process"):
        parse_config({"client": {"trainer": "hf"}, "simulation": {"client_nproc": 2}})


@pytest.mark.slow  # a Trainer per client per round on a tiny Llama: tens of seconds on a loaded CPU
def test_config_driven_run_with_the_hf_trainer(tmp_path: Path) -> None:
    from rich.console import Console

    from fedtune.run.session import simulate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for c in range(3):
        (corpus / f"s{c}.txt").write_text("\n\n".join(["the cat sat on the mat and looked at the dog"] * 12))
    config = parse_config(
        {
            "model": {"name": "tiny-llama", "max_length": 16, "lora": {"r": 2, "alpha": 4}},
            "data": {"source": "text", "path": str(corpus)},
            "federation": {"rounds": 2, "clients_per_round": 2},
            "client": {
                "trainer": "hf",
                "local_steps": 4,
                "batch_size": 4,
                "lr": 0.05,
                "lr_scheduler_type": "linear",
                "warmup_ratio": 0.25,
                "gradient_accumulation_steps": 2,
            },
            "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
        }
    )
    result = simulate(config, console=Console(quiet=True), show_progress=False)
    final = result.rounds[-1]
    assert final["clients_ok"] == 2 and final["eval_perplexity"] < result.baseline["eval_perplexity"]


def _peft_tiny_llama() -> tuple[torch.nn.Module, object]:
    from peft import LoraConfig, get_peft_model

    from fedtune.models.hub import load_causal_lm

    model, tokenizer = load_causal_lm("tiny-llama", CACHE)
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])), tokenizer


def test_federate_a_trainer_exchanges_its_adapter_and_learns(tmp_path: Path) -> None:
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    import fedtune

    model, tokenizer = _peft_tiny_llama()

    def site(text: str, n: int) -> datasets.Dataset:
        ids = tokenizer(text)["input_ids"][:12]
        ids = ids + [tokenizer.eos_token_id] * (12 - len(ids))
        return datasets.Dataset.from_dict(
            {"input_ids": [ids] * n, "attention_mask": [[1] * 12] * n, "labels": [ids] * n}
        )

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, data_collator=default_data_collator)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    sites = {
        "a": {"train": site("the cat sat on the mat", 8), "test": site("the cat sat on the mat", 4)},
        "b": {"train": site("a dog ran in the park", 6), "test": site("a dog ran in the park", 4)},
    }
    config = {"federation": {"rounds": 2, "clients_per_round": 2}, "run": {"out_dir": str(tmp_path), "plot": False}}
    result = fedtune.federate(trainer, config, datasets=sites, quiet=True)
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert result.state.spec.numel == adapter and all("lora_" in n for n in result.state.spec.names)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    assert [r["clients_ok"] for r in result.metrics[1:]] == [2, 2]
    assert result.final["eval_loss"] < result.metrics[0]["eval_loss"]  # the trainers' own evaluation, pooled
    with pytest.raises(ConfigError, match="naive"):
        fedtune.federate(trainer, {**config, "server": {"lora_aggregation": "fedex"}}, datasets=sites, quiet=True)
    with pytest.raises(ConfigError, match="FedProx"):
        fedtune.federate(trainer, {**config, "server": {"proximal_mu": 0.1}}, datasets=sites, quiet=True)


@pytest.mark.slow  # TRL's trainer setup takes seconds per round on a CPU
@pytest.mark.timeout(600)
def test_federate_one_trl_sft_trainer_per_client(tmp_path: Path) -> None:
    import datasets
    from trl import SFTConfig, SFTTrainer

    import fedtune

    model, tokenizer = _peft_tiny_llama()

    def trainer(rows: list[tuple[str, str]]) -> SFTTrainer:
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]
        args = SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=0.05,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            max_length=32,
        )
        ds = datasets.Dataset.from_dict({"messages": chats})
        return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)

    trainers = {"a": trainer([("hi", "hello there")] * 6), "b": trainer([("2+2?", "four")] * 4)}
    config = {"federation": {"rounds": 2, "clients_per_round": 2}, "run": {"out_dir": str(tmp_path), "plot": False}}
    result = fedtune.federate(trainers, config, quiet=True)
    assert [r["clients_ok"] for r in result.metrics[1:]] == [2, 2]
    clients = [r for r in rundir_records(result.run_dir) if r["kind"] == "client"]
    assert {c["client_id"] for c in clients} == {"a", "b"} and all(c["num_examples"] in (6, 4) for c in clients)


def rundir_records(run_dir: Path) -> list[dict]:
    from fedtune.run import rundir

    return rundir.MetricsLog(run_dir).read()
