"""The instruction formats as a tiny-llama task learns them (only assistant turns / completions), the
warnings for data encoding leaves out, and class names from the data into an exported model's id2label."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from rich.console import Console

from fedtune.config import parse_config
from fedtune.config.schema import LoraConfig, ModelConfig
from fedtune.data.screen import screen_clients
from fedtune.data.types import Completion, Conversation, Instruction
from fedtune.errors import DataError, DataWarning
from fedtune.run.export import export_run
from fedtune.run.session import simulate
from fedtune.tasks.build import build_task
from fedtune.tasks.causal_lm import IGNORE, CausalLMTask


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))


@pytest.fixture(scope="module")
def task(model_cache: Path) -> CausalLMTask:
    cfg = ModelConfig(name="tiny-llama", lora=LoraConfig(r=4), max_length=256)
    built = build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)
    assert isinstance(built, CausalLMTask) and built.has_chat_template
    return built


def learnt_text(task: CausalLMTask, example: dict) -> str:
    ids, labels = example["input_ids"], example["labels"]
    return task.tokenizer.decode(ids[labels != IGNORE])


def test_messages_learn_every_assistant_turn_and_nothing_else(task: CausalLMTask) -> None:
    turns = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Ciao."))
    (example,) = task.encode([Conversation(turns)], train=True)
    msgs = [{"role": r, "content": c} for r, c in turns]
    full = task.tokenizer.apply_chat_template(msgs, tokenize=False)
    assert task.tokenizer.decode(example["input_ids"]) == full
    learnt = learnt_text(task, example)
    assert "Hello!" in learnt and "Ciao." in learnt
    assert "Hi" not in learnt.replace("Hello", "") and "Bye" not in learnt and "Be brief" not in learnt
    assert "<|im_end|>" in learnt  # the model learns to end its turn
    assert "assistant" not in learnt  # the turn header is the prompt's


def test_instruction_renders_as_a_one_turn_chat(task: CausalLMTask) -> None:
    (a,) = task.encode([Instruction("Add", "2 and 3", "5")], train=True)
    (b,) = task.encode([Conversation((("user", "Add\n\n2 and 3"), ("assistant", "5")))], train=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_conversational_prompt_completion_learns_the_completion_only(task: CausalLMTask) -> None:
    turns = (("user", "a"), ("assistant", "EARLIER"), ("user", "c"), ("assistant", "LATER"))
    (example,) = task.encode([Conversation(turns, train_from=3)], train=True)
    learnt = learnt_text(task, example)
    assert "LATER" in learnt and "EARLIER" not in learnt


def test_standard_prompt_completion_is_plain_text_with_eos(task: CausalLMTask) -> None:
    (example,) = task.encode([Completion("The sky is", " blue.")], train=True)
    tok = task.tokenizer
    prompt_ids = tok("The sky is")["input_ids"]
    assert example["input_ids"].tolist()[: len(prompt_ids)] == prompt_ids
    assert (example["labels"][: len(prompt_ids)] == IGNORE).all()
    assert learnt_text(task, example) == " blue." + tok.eos_token


def test_prompts_filling_max_length_are_a_counted_warning(task: CausalLMTask) -> None:
    short = CausalLMTask(task.module, task.tokenizer, 16)
    records = [Instruction("Repeat. " * 50, "", "ok"), Completion("Hi", " there"), Completion("x " * 40, "y")]
    with pytest.warns(DataWarning, match=r"2 of 3 training instruction examples dropped: .*max_length=16"):
        examples = short.encode(records, train=True)
    assert len(examples) == 1


class FakeWorker:
    """Encoded example counts per client, as ClientWorker.examples would give them."""

    def __init__(self, counts: dict[str, tuple[int, int]]) -> None:
        self.counts = counts
        self.records = {cid: (["r"] * tr, ["r"] * te) for cid, (tr, te) in counts.items()}
        self.encoded = {cid: (tr, max(te - 1, 0) if cid == "c" else te) for cid, (tr, te) in counts.items()}

    def examples(self, client_id: str, *, train: bool) -> list[dict]:
        return [{}] * self.encoded[client_id][0 if train else 1]


def test_screen_clients_warns_for_dropped_and_unscored_clients() -> None:
    worker = FakeWorker({"a": (5, 2), "b": (1, 1), "c": (4, 1)})
    with pytest.warns(DataWarning) as caught:
        kept = screen_clients(worker, min_train_examples=2, max_length=8)
    assert list(kept) == ["a", "c"]
    messages = [str(w.message) for w in caught]
    assert any(
        m.startswith("1 of 3 clients dropped: fewer than data.min_train_examples=2") and "b" in m for m in messages
    )
    assert any(m.startswith("1 of 2 clients have no held-out example left after encoding") for m in messages)
    with pytest.raises(DataError, match="no client has at least 9"):
        screen_clients(worker, min_train_examples=9, max_length=8)
    with pytest.raises(DataError, match="none of the 1 clients has a held-out example"):
        screen_clients(FakeWorker({"c": (3, 1)}), min_train_examples=1, max_length=8)


def test_label_names_reach_the_exported_id2label(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    for site, labels in (("clinic_a", ["flu", "cold"]), ("clinic_b", ["cold", "covid"])):
        rows = [{"note": f"{site} patient {i} has symptoms", "dx": labels[i % 2]} for i in range(6)]
        (sites / f"{site}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {
        "model": {"kind": "classification", "name": "all-minilm-l6-v2", "max_length": 16, "lora": {"r": 2}},
        "data": {"source": "classification", "path": str(sites), "columns": {"text": "note", "label": "dx"}},
        "federation": {"rounds": 1, "clients_per_round": 2},
        "client": {"local_steps": 1, "batch_size": 4},
        "eval": {"baseline": False},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }
    result = simulate(parse_config(cfg), console=Console(quiet=True), show_progress=False)
    assert result.state.extra["label_names"] == ["cold", "covid", "flu"]
    export_run(result.run_dir, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "cold", "1": "covid", "2": "flu"}
    assert config["label2id"] == {"cold": 0, "covid": 1, "flu": 2}


def test_without_a_chat_template_turns_get_role_headers(task: CausalLMTask) -> None:
    import copy

    tokenizer = copy.deepcopy(task.tokenizer)
    tokenizer.chat_template = None
    plain = CausalLMTask(task.module, tokenizer, 256)
    turns = (("user", "Question here"), ("assistant", "Answer here"))
    (example,) = plain.encode([Conversation(turns)], train=True)
    text = tokenizer.decode(example["input_ids"])
    assert "### User:\nQuestion here" in text and "### Assistant:\nAnswer here" in text
    learnt = learnt_text(plain, example)
    assert "Answer here" in learnt and "Question" not in learnt and "###" not in learnt
    assert learnt.endswith(tokenizer.eos_token)
    (alpaca,) = plain.encode([Instruction("Do it", "", "Done")], train=True)
    assert "### Instruction:\nDo it" in tokenizer.decode(alpaca["input_ids"])


def test_name_labels_checks_the_count(model_cache: Path) -> None:
    from fedtune.tasks.classification import ClassificationTask, name_labels

    cfg = ModelConfig(kind="classification", name="all-minilm-l6-v2", max_length=8)
    clf = build_task(cfg, num_labels=3, cache_dir=model_cache, seed=0)
    assert isinstance(clf, ClassificationTask)
    assert name_labels(clf, ["0", "1"]) == [] and clf.label_names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    with pytest.raises(DataError, match=r"2 classes \['a', 'b'\] but model.num_labels is 3"):
        name_labels(clf, ["a", "b"])
    assert name_labels(clf, ["a", "b", "c"]) == ["a", "b", "c"] and clf.module.config.label2id == {
        "a": 0,
        "b": 1,
        "c": 2,
    }


def test_sites_of_chats_with_held_out_files_run_and_warn_about_truncation(tmp_path: Path) -> None:
    sites, held = tmp_path / "sites", tmp_path / "held"
    sites.mkdir()
    held.mkdir()

    def chat(question: str, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    for site in ("north", "south"):
        rows = [chat(f"{site} question {i}?", f"answer {i}") for i in range(6)]
        rows.append(chat("long " * 80, "lost"))  # its prompt fills max_length: dropped, with a warning
        (sites / f"{site}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (held / f"{site}.jsonl").write_text(json.dumps(chat(f"{site} held out?", "yes")))
    cfg = {
        "model": {"name": "tiny-llama", "max_length": 48, "lora": {"r": 2}},
        "data": {"source": "instruct", "path": str(sites), "test_path": str(held)},
        "federation": {"rounds": 1, "clients_per_round": 2},
        "client": {"local_steps": 1, "batch_size": 4},
        "eval": {"baseline": False},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }
    with pytest.warns(DataWarning, match=r"1 of 7 training instruction examples dropped"):
        result = simulate(parse_config(cfg), console=Console(quiet=True), show_progress=False)
    assert sorted(result.prepared.worker.records) == ["north", "south"]
    assert len(result.prepared.worker.examples("north", train=True)) == 6
    evaluated = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["client_id"] for r in evaluated if r["kind"] == "eval_client"} == {"north", "south"}
