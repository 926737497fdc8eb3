"""Models: built-in and Hub checkpoints, the cached GGUF conversion, LoRA, and small test models.

Submodules import transformers/peft lazily where they can, so ``import fedtune.models`` stays cheap.
"""

from fedtune.models.cnn import DigitsCNN, digits_cnn
from fedtune.models.hub import BUILTIN_MODELS, load_causal_lm, load_sequence_classifier, resolve_model
from fedtune.models.lora import apply_lora, load_trainable, trainable_state

__all__ = [
    "BUILTIN_MODELS",
    "DigitsCNN",
    "apply_lora",
    "digits_cnn",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_trainable",
    "resolve_model",
    "trainable_state",
]
