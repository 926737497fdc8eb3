"""One lock for building Hugging Face models in this process.

transformers 5 builds a model inside process-global contexts: ``from_pretrained`` sets torch's default dtype,
patches torch's init and creation functions and turns weight tying off while it constructs the model on the
meta device, then restores them. Two threads loading at once (a ``fedtune server`` thread and participant
threads in one process, or ``fedtune.participate`` threads beside the user's own loading through fedtune)
see each other's patches: a model comes out with a weight still on the meta device, or with uninitialised
values. Every place fedtune builds a transformers or peft model from a checkpoint or a config takes
``HF_LOADING`` (re-entrant: a load may build the cached folder it loads from)."""

from __future__ import annotations

import threading

HF_LOADING = threading.RLock()
