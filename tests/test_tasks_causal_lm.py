"""CausalLMTask on tiny-llama: chunking, prompt masking, padding, token-weighted sums, bf16, generation."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from fedtune.config.schema import LoraConfig, ModelConfig
from fedtune.data.types import Instruction
from fedtune.errors import DataError
from fedtune.run.generate import generate_text
from fedtune.tasks.base import EvalSums, Task
from fedtune.tasks.build import build_task
from fedtune.tasks.causal_lm import IGNORE, CausalLMTask

SPEECHES = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Friends, Romans, countrymen, lend me your ears.",
]


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # Converted models depend only on the installed model packages, so they are shared across sessions.
    return Path(os.environ.get("FEDTUNE_TEST_MODEL_CACHE", Path.home() / ".cache" / "fedtune"))


@pytest.fixture(scope="module")
def task(model_cache: Path) -> CausalLMTask:
    cfg = ModelConfig(name="tiny-llama", lora=LoraConfig(r=4), max_length=16)
    built = build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)
    assert isinstance(built, CausalLMTask) and isinstance(built, Task)
    return built


def test_text_is_concatenated_and_chunked(task: CausalLMTask) -> None:
    tok = task.tokenizer
    stream: list[int] = []
    for text in SPEECHES:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    test = task.encode(SPEECHES, train=False)
    assert torch.equal(torch.cat([ex["input_ids"] for ex in test]), torch.tensor(stream))
    assert all(len(ex["input_ids"]) == 16 for ex in test[:-1])
    assert all(torch.equal(ex["labels"], ex["input_ids"]) for ex in test)
    tail = len(stream) % 16
    train = task.encode(SPEECHES, train=True)
    expected = len(test) if tail == 0 or tail >= 16 // 4 else len(test) - 1
    assert len(train) == expected


def test_short_tail_dropped_in_training_only(task: CausalLMTask) -> None:
    # find a text whose stream leaves a 2-3 token tail: kept for testing, dropped (< 16 / 4) in training
    tok = task.tokenizer
    for k in range(1, 200):
        text = "word " * k
        n = len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        if n > 16 and n % 16 in (2, 3):
            break
    else:
        pytest.fail("no text with a short tail found")
    assert len(task.encode([text], train=False)) == n // 16 + 1
    train = task.encode([text], train=True)
    assert len(train) == n // 16
    assert all(len(ex["input_ids"]) == 16 for ex in train)


def test_instruction_prompt_is_masked_exactly(model_cache: Path) -> None:
    cfg = ModelConfig(name="tiny-llama", lora=LoraConfig(r=4), max_length=256)
    task = build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)
    record = Instruction(instruction="Translate to French.", input="Good morning", output="Bonjour")
    (example,) = task.encode([record], train=True)
    tok = task.tokenizer
    user = {"role": "user", "content": "Translate to French.\n\nGood morning"}
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([user, {"role": "assistant", "content": "Bonjour"}], tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    labels, ids = example["labels"], example["input_ids"]
    assert tok.decode(ids) == full
    assert (labels[:n_prompt] == IGNORE).all()
    assert (labels[n_prompt:] != IGNORE).all()
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    assert "Bonjour" in tok.decode(ids[n_prompt:])


def test_instruction_truncated_to_max_length_or_dropped(task: CausalLMTask) -> None:
    long = Instruction(instruction="Repeat. " * 50, input="", output="ok")
    assert task.encode([long], train=True) == []  # the prompt alone fills max_length=16
    short = Instruction(instruction="Hi", input="", output="Hello there, friend, how are you today? " * 5)
    cfg_len = 64
    task64 = CausalLMTask(task.module, task.tokenizer, cfg_len)
    (ex,) = task64.encode([short], train=True)
    assert len(ex["input_ids"]) == cfg_len


def test_collate_pads_with_ignored_labels(task: CausalLMTask) -> None:
    examples = task.encode(SPEECHES, train=False)
    short = examples[-1]
    batch = task.collate([examples[0], short])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, 16)
    assert (batch["labels"][1, n:] == IGNORE).all()
    assert (batch["attention_mask"][1, n:] == 0).all() and (batch["attention_mask"][1, :n] == 1).all()


def _manual_sums(task: CausalLMTask, examples: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Per-sequence, unpadded forward passes and an explicit log-softmax sum."""
    total, count = 0.0, 0
    task.module.eval()
    with torch.no_grad():
        for ex in examples:
            logits = task.module(input_ids=ex["input_ids"][None]).logits[0]
            logp = F.log_softmax(logits.float(), dim=-1)
            for t in range(1, len(ex["labels"])):
                if ex["labels"][t] != IGNORE:
                    total -= float(logp[t - 1, ex["labels"][t]])
                    count += 1
    return total, count


def test_eval_sums_match_manual_cross_entropy(task: CausalLMTask) -> None:
    examples = task.encode(SPEECHES, train=False)
    instr = task.encode([Instruction("Say hi", "", "hi")], train=False)
    examples = examples[:2] + examples[-1:] + instr
    expected_loss, expected_count = _manual_sums(task, examples)
    sums = task.eval_batch(task.collate(examples))
    assert sums.count == expected_count
    assert sums.examples == len(examples)
    assert sums.loss_sum == pytest.approx(expected_loss, rel=1e-4)
    # pooled over two batches of different token counts: still the exact token-weighted mean
    split = task.eval_batch(task.collate(examples[:1])) + task.eval_batch(task.collate(examples[1:]))
    assert split.count == sums.count
    assert split.loss_sum == pytest.approx(sums.loss_sum, rel=1e-4)
    metrics = split.metrics(accuracy=False)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected_loss / expected_count), rel=1e-3)


def test_loss_is_token_mean_with_gradients_on_adapters(task: CausalLMTask) -> None:
    batch = task.collate(task.encode(SPEECHES, train=True)[:3])
    sums = task.eval_batch(batch)
    task.module.train()
    loss, count = task.loss(batch)
    assert count == sums.count
    assert float(loss) == pytest.approx(sums.loss_sum / sums.count, rel=1e-4)
    loss.backward()
    grads = [p.grad for p in task.module.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    task.module.zero_grad(set_to_none=True)


def test_eval_batch_restores_training_mode(task: CausalLMTask) -> None:
    batch = task.collate(task.encode(SPEECHES, train=False)[:1])
    task.module.train()
    task.eval_batch(batch)
    assert task.module.training
    task.module.eval()
    task.eval_batch(batch)
    assert not task.module.training


def test_bfloat16_autocast_is_close_and_keeps_float32_weights(task: CausalLMTask) -> None:
    bf16 = CausalLMTask(task.module, task.tokenizer, 16, compute_dtype="bfloat16")
    batch = task.collate(task.encode(SPEECHES, train=False))
    a, b = task.eval_batch(batch), bf16.eval_batch(batch)
    assert a.count == b.count
    assert b.loss_sum / b.count == pytest.approx(a.loss_sum / a.count, rel=2e-2)
    loss, _ = bf16.loss(batch)
    loss.backward()
    assert all(p.dtype == torch.float32 for p in task.module.parameters())
    task.module.zero_grad(set_to_none=True)


def test_generation_greedy_and_seeded(task: CausalLMTask) -> None:
    greedy = generate_text(task, "Hello", max_new_tokens=5, seed=None)
    assert greedy == generate_text(task, "Hello", max_new_tokens=5, seed=None)
    sampled = generate_text(task, "Hello", max_new_tokens=5, seed=3)
    assert sampled == generate_text(task, "Hello", max_new_tokens=5, seed=3)
    assert isinstance(task.generate("Hello", max_new_tokens=3, chat=False), str)


def test_unknown_record_type_is_a_data_error(task: CausalLMTask) -> None:
    with pytest.raises(DataError, match="int"):
        task.encode([3], train=True)  # type: ignore[list-item]


def test_empty_eval_sums_have_no_metrics() -> None:
    assert EvalSums().metrics(accuracy=False) == {}


@pytest.mark.slow
def test_smollm2_perplexity_on_english_is_sane(model_cache: Path) -> None:
    cfg = ModelConfig(name="smollm2-135m-instruct", lora=LoraConfig(r=8), max_length=64)
    task = build_task(cfg, num_labels=None, cache_dir=model_cache, seed=0)
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
    sums = task.eval_batch(task.collate(task.encode([text], train=False)))
    ppl = sums.metrics(accuracy=False)["perplexity"]
    assert math.isfinite(ppl) and ppl < 1000
