"""``tiny-llama``: a randomly initialised, very small Llama with the SmolLM2 tokenizer, for fast tests.

It behaves like a real checkpoint (a folder that ``from_pretrained`` loads, a chat template, LoRA target
modules named like Llama's) while a forward pass costs milliseconds. Its weights come from a fixed seed,
not the run's seed: like a pretrained model it is the same base for every run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.models.gguf_cache import is_complete, write_folder_atomically
from fedtune.models.loading import HF_LOADING

TINY_SEED = 1234
TINY_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def build_tiny_llama(tokenizer_dir: Path, target: Path) -> Path:
    """Write the tiny model and ``tokenizer_dir``'s tokenizer to ``target`` (cached, atomic)."""
    if is_complete(target):
        return target
    return write_folder_atomically(target, lambda tmp: _write_tiny(Path(tokenizer_dir), tmp))


def _write_tiny(tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,  # the embedding is most of the parameters; share it with the head
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **TINY_SHAPE,
    )
    # fork_rng: the fixed seed must not reset the caller's global random stream
    with HF_LOADING, torch.random.fork_rng(devices=[]):  # HF_LOADING: models/loading.py
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
