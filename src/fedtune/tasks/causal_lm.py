"""``CausalLMTask``: next-token prediction on plain text (chunked) or instructions (loss on the response).

Plain-text records of a client are concatenated, each followed by EOS, and cut into blocks of
``max_length`` tokens, as in nanoGPT/run_clm. Instruction records are rendered with the tokenizer's chat
template (an Alpaca-style prompt when it has none) and the prompt's labels are -100, so only the response
is learnt. Loss and evaluation are token-weighted: perplexity pools exactly over batches and clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.data.types import Instruction
from fedtune.errors import DataError
from fedtune.tasks.base import Batch, EvalSums, Example
from fedtune.tasks.module import compute_context, eval_mode

IGNORE = -100  # label value cross-entropy skips (prompt and padding positions)
MIN_TAIL_FRACTION = 4  # in training, a final block shorter than max_length / 4 is dropped
SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # used when generate() is given a seed


class CausalLMTask:
    kind = "causal_lm"
    reports_accuracy = False

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, compute_dtype: str = "float32") -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        compute_context(compute_dtype)  # validates the name early
        self.module = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.compute_dtype = compute_dtype

    # ----- encoding -------------------------------------------------------------------------------------

    def encode(self, records: Sequence[str | Instruction], *, train: bool) -> list[Example]:
        texts = [r for r in records if isinstance(r, str)]
        instructions = [r for r in records if isinstance(r, Instruction)]
        if len(texts) + len(instructions) != len(records):
            bad = next(r for r in records if not isinstance(r, str | Instruction))
            raise DataError(f"a causal_lm task encodes str or Instruction records, got {type(bad).__name__}")
        examples = self._encode_texts(texts, train=train) if texts else []
        examples += [ex for ex in (self._encode_instruction(r) for r in instructions) if ex is not None]
        return examples

    def _separator(self) -> list[int]:
        if self.tokenizer.eos_token_id is not None:
            return [int(self.tokenizer.eos_token_id)]
        return list(self.tokenizer("\n", add_special_tokens=False)["input_ids"])

    def _encode_texts(self, texts: list[str], *, train: bool) -> list[Example]:
        separator = self._separator()
        stream: list[int] = []
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += list(ids) + separator
        # a block needs two tokens to predict anything; training also skips a stub tail (noisy, tiny)
        min_tail = max(2, self.max_length // MIN_TAIL_FRACTION) if train else 2
        blocks = [stream[i : i + self.max_length] for i in range(0, len(stream), self.max_length)]
        return [_lm_example(block, block) for block in blocks if len(block) >= min_tail]

    def _encode_instruction(self, record: Instruction) -> Example | None:
        prompt, response = self._render(record)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=not self.has_chat_template)["input_ids"]
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if not self.has_chat_template and self.tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, int(self.tokenizer.eos_token_id)]
        input_ids = (list(prompt_ids) + list(response_ids))[: self.max_length]
        labels = ([IGNORE] * len(prompt_ids) + list(response_ids))[: self.max_length]
        if all(label == IGNORE for label in labels[1:]):
            return None  # the prompt fills max_length: nothing of the response is left to learn or score
        return _lm_example(input_ids, labels)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _render(self, record: Instruction) -> tuple[str, str]:
        """(prompt text, response text); tokenised separately so the prompt/response boundary is exact."""
        user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
        if not self.has_chat_template:
            return _alpaca_prompt(record), record.output
        user_msg = {"role": "user", "content": user}
        prompt = self.tokenizer.apply_chat_template([user_msg], tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            [user_msg, {"role": "assistant", "content": record.output}], tokenize=False
        )
        if not full.startswith(prompt):
            raise DataError("the tokenizer's chat template renders the prompt differently inside a dialogue")
        return prompt, full[len(prompt) :]

    # ----- batches, loss, evaluation ---------------------------------------------------------------------

    def collate(self, examples: Sequence[Example]) -> Batch:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(ex["input_ids"]) for ex in examples)
        return {
            "input_ids": _pad([ex["input_ids"] for ex in examples], width, pad_id),
            "labels": _pad([ex["labels"] for ex in examples], width, IGNORE),
            "attention_mask": _pad([ex["attention_mask"] for ex in examples], width, 0),
        }

    def _summed_loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        with compute_context(self.compute_dtype):
            out = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        # the logits at position t predict token t+1; the CE itself is taken in float32
        logits = out.logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return loss_sum, int((targets != IGNORE).sum())

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        loss_sum, count = self._summed_loss(batch)
        return loss_sum / max(count, 1), count

    def eval_batch(self, batch: Batch) -> EvalSums:
        with eval_mode(self.module):
            loss_sum, count = self._summed_loss(batch)
        return EvalSums(loss_sum=float(loss_sum), count=count, examples=int(batch["input_ids"].shape[0]))

    # ----- generation ------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 40,
        seed: int | None = None,
        *,
        chat: bool | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> str:
        """Continue ``prompt``: greedy when ``seed`` is None, else seeded sampling (same seed, same text).

        ``chat`` (default: whether the tokenizer has a chat template) wraps the prompt as a user turn.
        ``sampling``: ``GenerationConfig`` fields (do_sample, temperature, top_p, ...) that replace the
        defaults above (``fedtune.run.generate.sampling_settings`` builds them).
        """
        from transformers import GenerationConfig

        chat = self.has_chat_template if chat is None else chat
        if chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
        if sampling is None:
            sampling = {"do_sample": True, **SAMPLING} if seed is not None else {"do_sample": False}
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **sampling,
        )
        with torch.random.fork_rng(devices=[]), eval_mode(self.module), compute_context(self.compute_dtype):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.module.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=gen_cfg
            )
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _alpaca_prompt(record: Instruction) -> str:
    if record.input:
        return f"### Instruction:\n{record.instruction}\n\n### Input:\n{record.input}\n\n### Response:\n"
    return f"### Instruction:\n{record.instruction}\n\n### Response:\n"


def _lm_example(input_ids: Sequence[int], labels: Sequence[int]) -> Example:
    ids = torch.tensor(list(input_ids), dtype=torch.long)
    return {
        "input_ids": ids,
        "labels": torch.tensor(list(labels), dtype=torch.long),
        "attention_mask": torch.ones_like(ids),
    }


def _pad(rows: Sequence[torch.Tensor], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
