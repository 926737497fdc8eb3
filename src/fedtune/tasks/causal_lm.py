"""``CausalLMTask``: next-token prediction on plain text (chunked) or instructions (loss on the response).

Plain-text records of a client are concatenated, each followed by EOS, and cut into blocks of
``max_length`` tokens, as in nanoGPT/run_clm. Instruction records (Alpaca ``Instruction``s and chat
``Conversation``s) are rendered with the tokenizer's chat template (an Alpaca-style prompt when it has none)
and only the assistant's turns are learnt: every other token's label is -100. A ``Completion`` (TRL's
standard prompt-completion) is plain text: the prompt, then the completion and EOS, which alone is learnt.
Examples whose prompt fills ``max_length`` are dropped with a DataWarning that counts them.
Loss and evaluation are token-weighted: perplexity pools exactly over batches and clients.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.data.types import Completion, Conversation, Instruction
from fedtune.errors import DataError, DataWarning
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

    def encode(self, records: Sequence[str | Instruction | Completion | Conversation], *, train: bool) -> list[Example]:
        texts = [r for r in records if isinstance(r, str)]
        prompted = [r for r in records if isinstance(r, Instruction | Completion | Conversation)]
        if len(texts) + len(prompted) != len(records):
            bad = next(r for r in records if not isinstance(r, str | Instruction | Completion | Conversation))
            raise DataError(
                "a causal_lm task encodes str, Instruction, Completion or Conversation records, "
                f"got {type(bad).__name__}"
            )
        examples = self._encode_texts(texts, train=train) if texts else []
        encoded = [self._encode_prompted(r) for r in prompted]
        kept = [ex for ex in encoded if ex is not None]
        if len(kept) < len(encoded):
            warnings.warn(
                f"{len(encoded) - len(kept)} of {len(encoded)} {'training' if train else 'held-out'} instruction "
                f"examples dropped: the prompt fills model.max_length={self.max_length} tokens, leaving no "
                "response token; raise model.max_length or shorten the prompts",
                DataWarning,
                stacklevel=2,
            )
        return examples + kept

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

    def _encode_prompted(self, record: Instruction | Completion | Conversation) -> Example | None:
        """Tokens of the rendered segments, labels -100 outside the learnt ones; None when truncation to
        ``max_length`` leaves nothing to learn or score."""
        input_ids: list[int] = []
        labels: list[int] = []
        for text, learn, first in _merged(self._segments(record)):
            plain = isinstance(record, Completion) or not self.has_chat_template
            ids = list(self.tokenizer(text, add_special_tokens=plain and first)["input_ids"])
            input_ids += ids
            labels += ids if learn else [IGNORE] * len(ids)
        if (isinstance(record, Completion) or not self.has_chat_template) and self.tokenizer.eos_token_id is not None:
            input_ids.append(int(self.tokenizer.eos_token_id))
            labels.append(int(self.tokenizer.eos_token_id))
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE for label in labels[1:]):
            return None  # the prompt fills max_length: nothing of the response is left to learn or score
        return _lm_example(input_ids, labels)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _segments(self, record: Instruction | Completion | Conversation) -> list[tuple[str, bool]]:
        """(text, learnt) pieces in order; tokenised separately so the prompt/response boundary is exact."""
        if isinstance(record, Completion):
            return [(record.prompt, False), (record.completion, True)]
        if isinstance(record, Instruction):
            user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
            if not self.has_chat_template:
                return [(_alpaca_prompt(record), False), (record.output, True)]
            record = Conversation((("user", user), ("assistant", record.output)))
        if not self.has_chat_template:
            return _plain_chat(record)
        return self._chat_segments(record)

    def _chat_segments(self, record: Conversation) -> list[tuple[str, bool]]:
        """The chat template applied to ever longer prefixes: each turn is what its rendering adds; an
        assistant turn's header (the generation prompt) is not learnt, its content and end-of-turn are."""
        msgs = [{"role": role, "content": content} for role, content in record.messages]
        segments: list[tuple[str, bool]] = []
        done = ""

        def add(text: str, learn: bool) -> None:
            nonlocal done
            if not text.startswith(done):
                raise DataError("the tokenizer's chat template renders the prompt differently inside a dialogue")
            if text != done:
                segments.append((text[len(done) :], learn))
            done = text

        render = self.tokenizer.apply_chat_template
        for i, msg in enumerate(msgs):
            learn = msg["role"] == "assistant" and i >= record.train_from
            if msg["role"] == "assistant":
                add(render(msgs[:i], tokenize=False, add_generation_prompt=True) if i else "", False)
            add(render(msgs[: i + 1], tokenize=False), learn)
        return segments

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


def _merged(segments: list[tuple[str, bool]]) -> list[tuple[str, bool, bool]]:
    """Neighbouring segments with the same flag joined (tokenised as one text), each marked first or not."""
    out: list[tuple[str, bool]] = []
    for text, learn in segments:
        if out and out[-1][1] == learn:
            out[-1] = (out[-1][0] + text, learn)
        else:
            out.append((text, learn))
    return [(text, learn, i == 0) for i, (text, learn) in enumerate(out)]


def _plain_chat(record: Conversation) -> list[tuple[str, bool]]:
    """A conversation for a tokenizer without a chat template: Alpaca-like role headers."""
    segments = []
    for i, (role, content) in enumerate(record.messages):
        learn = role == "assistant" and i >= record.train_from
        segments.append((f"### {role.capitalize()}:\n", False))
        segments.append((content + "\n\n", learn))
    return segments


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
