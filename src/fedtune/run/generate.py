"""Text generation from a task's current model (a thin wrapper, so callers need not know the task type), and
the sampling settings ``fedtune generate`` uses: its flags, else the model's ``generation_config.json``, else
fedtune's defaults."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError, ModelError
from fedtune.tasks.base import Task

GENERATION_CONFIG = "generation_config.json"
# the generation_config.json fields fedtune takes over (others, e.g. token ids, come from the tokenizer)
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
FALLBACK = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}  # when the model says nothing
DEFAULT_MAX_NEW_TOKENS = 60


def generate_text(
    task: Task,
    prompt: str,
    max_new_tokens: int = 40,
    seed: int | None = None,
    *,
    chat: bool | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> str:
    """The model's continuation of ``prompt``: greedy when ``seed`` is None, else seeded sampling.

    ``chat``: wrap the prompt as a chat turn (right for instruction tuning); False continues plain text
    (right for a model fine-tuned on plain text); None lets the task decide from its tokenizer.
    ``sampling``: explicit ``GenerationConfig`` fields (see ``sampling_settings``).
    """
    generate = getattr(task, "generate", None)
    if generate is None:
        raise ModelError(f"a {task.kind} model cannot generate text; generation needs model.kind causal_lm")
    return generate(prompt, max_new_tokens=max_new_tokens, seed=seed, chat=chat, sampling=sampling)


def model_generation_defaults(folder: Path | str) -> dict[str, Any]:
    """The sampling fields a model folder's ``generation_config.json`` sets, or {} (no file, a Hub id, or a
    file transformers derived from the model config, which holds no generation choices)."""
    path = Path(folder) / GENERATION_CONFIG
    if isinstance(folder, str) and not Path(folder).is_dir():
        return _hub_generation_defaults(folder)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    chosen = {k: data[k] for k in SAMPLING_KEYS if data.get(k) is not None}
    return chosen


def _hub_generation_defaults(hub_id: str) -> dict[str, Any]:
    """A Hub model's generation_config.json (from the local Hugging Face cache when offline), or {}."""
    try:
        from transformers import GenerationConfig

        diff = GenerationConfig.from_pretrained(hub_id).to_diff_dict()  # only what the file sets
    except (OSError, ValueError):
        return {}
    return {k: diff[k] for k in SAMPLING_KEYS if diff.get(k) is not None}


def sampling_settings(
    model_defaults: Mapping[str, Any],
    *,
    greedy: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
) -> tuple[dict[str, Any], int]:
    """(GenerationConfig sampling fields, max_new_tokens): the flags first, then the model's
    ``generation_config.json`` (``model_defaults``), then fedtune's fallback (temperature 0.8, top_p 0.95).

    >>> sampling_settings({}, greedy=True)
    ({'do_sample': False}, 60)
    >>> sampling_settings({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, top_p=0.5)
    ({'do_sample': True, 'temperature': 0.6, 'top_p': 0.5}, 60)
    """
    if greedy and (temperature is not None or top_p is not None):
        raise ConfigError("--greedy picks the most likely token; it cannot be combined with --temperature/--top-p")
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"--temperature must be > 0, got {temperature} (use --greedy for deterministic output)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    base = dict(model_defaults) if model_defaults else dict(FALLBACK)
    tokens = max_new_tokens or int(base.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    base.pop("max_new_tokens", None)
    if greedy:
        return {"do_sample": False}, tokens
    if temperature is not None or top_p is not None:
        base["do_sample"] = True
        if temperature is not None:
            base["temperature"] = temperature
        if top_p is not None:
            base["top_p"] = top_p
    base.setdefault("do_sample", False)  # transformers' default when a model's file does not say
    if not base["do_sample"]:
        return {"do_sample": False}, tokens
    return base, tokens
