"""Text generation from a task's current model (a thin wrapper, so callers need not know the task type)."""

from __future__ import annotations

from fedtune.errors import ModelError
from fedtune.tasks.base import Task


def generate_text(
    task: Task, prompt: str, max_new_tokens: int = 40, seed: int | None = None, *, chat: bool | None = None
) -> str:
    """The model's continuation of ``prompt``: greedy when ``seed`` is None, else seeded sampling.

    ``chat``: wrap the prompt as a chat turn (right for instruction tuning); False continues plain text
    (right for a model fine-tuned on plain text); None lets the task decide from its tokenizer.
    """
    generate = getattr(task, "generate", None)
    if generate is None:
        raise ModelError(f"a {task.kind} model cannot generate text; generation needs model.kind causal_lm")
    return generate(prompt, max_new_tokens=max_new_tokens, seed=seed, chat=chat)
