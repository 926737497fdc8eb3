"""``build_task``: a model configuration to a ready Task (model loaded, LoRA applied, in training mode).

Every random initialisation (LoRA's A matrices, a fresh classifier head, a factory module's weights)
happens under one torch seed derived from the run seed, inside ``fork_rng`` so the caller's global stream
is untouched: two builds with the same seed are identical, which is what lets server and clients start
from the same model without shipping it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedtune.config.schema import Config, ModelConfig
from fedtune.core.rng import derive_seed
from fedtune.errors import ConfigError, ModelError
from fedtune.models.hub import BUILTIN_MODELS, load_causal_lm, load_sequence_classifier, resolve_model
from fedtune.models.lora import apply_lora
from fedtune.models.personal import freeze_local_params
from fedtune.tasks.base import Task
from fedtune.tasks.causal_lm import CausalLMTask
from fedtune.tasks.classification import ClassificationTask
from fedtune.tasks.module import ModuleTask

# model.factory values that name code shipped inside fedtune: a participant accepts these from a server
# (like a built-in model name); any other factory runs only from the participant's own configuration.
BUILTIN_FACTORIES = ("fedtune.models.cnn:digits_cnn",)


def build_run_task(config: Config, *, num_labels: int | None, cache_dir: Path, builtin_only: bool = False) -> Task:
    """The task a run's config describes: ``build_task`` of its model section, seeded with the run seed,
    with LoRA's A frozen under FFA-LoRA (``server.lora_aggregation: ffa``). Server, clients, Ray actors and
    export all build through here, so they agree on the exchanged parameters. ``builtin_only``: the model
    section came from someone else (a server), so only built-in model names and factories are accepted."""
    task = build_task(
        config.model,
        num_labels=num_labels,
        cache_dir=cache_dir,
        seed=config.seed,
        freeze_lora_a=config.server.lora_aggregation == "ffa",
        builtin_only=builtin_only,
    )
    freeze_local_params(task.module, config.personalization)  # fedsa's B / fedper's local_params: never exchanged
    if config.client.gradient_checkpointing:
        enable_gradient_checkpointing(task.module)
    return task


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing (client.gradient_checkpointing): activations are recomputed in
    backward instead of kept. Non-reentrant, so it works with frozen embeddings under LoRA."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, PreTrainedModel):
        raise ModelError(f"client.gradient_checkpointing needs a Hugging Face model, not a {type(base).__name__}")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_builtin_model(model_cfg: ModelConfig) -> None:
    """Raise ModelError unless ``model_cfg`` names only what ships with fedtune: a built-in model name, or a
    built-in factory. What a participant accepts from a server without its own ``--config``: anything else
    (a ``module:callable``, a local path, a hub id) would run or load what the server chose."""
    if model_cfg.kind == "module":
        if model_cfg.factory not in BUILTIN_FACTORIES:
            raise ModelError(
                f"the server asks this participant to run model.factory {model_cfg.factory!r}; a participant runs "
                f"no code named by the server (built-in factories: {', '.join(BUILTIN_FACTORIES)}). To train it, "
                "start the participant with --config naming that factory in its own model section"
            )
    elif model_cfg.name not in BUILTIN_MODELS:
        raise ModelError(
            f"the server asks for model.name {model_cfg.name!r}, which is not a built-in model "
            f"({', '.join(BUILTIN_MODELS)}); start the participant with --config naming it in its own model section"
        )


def build_task(
    model_cfg: ModelConfig,
    *,
    num_labels: int | None,
    cache_dir: Path,
    seed: int,
    freeze_lora_a: bool = False,
    builtin_only: bool = False,
) -> Task:
    """Load and adapt the model ``model_cfg`` describes. ``num_labels`` is used when the config has none;
    ``freeze_lora_a`` keeps LoRA's A matrices at their seeded init and out of the trainable set (FFA-LoRA);
    ``builtin_only`` refuses (check_builtin_model) before anything is imported or loaded."""
    if builtin_only:
        check_builtin_model(model_cfg)
    if freeze_lora_a and model_cfg.lora is None:
        raise ModelError("freezing LoRA's A matrices (FFA-LoRA) needs model.lora")
    if model_cfg.kind != "module":
        # Convert or build a cached model folder first, outside the seeded block: a first (cold-cache) run
        # must draw the same classifier head and LoRA init as every later one.
        resolve_model(model_cfg.name, Path(cache_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init"))
        task = _build(model_cfg, num_labels=num_labels, cache_dir=Path(cache_dir), freeze_a=freeze_lora_a)
    task.module.train()  # like a fresh nn.Module; from_pretrained hands back eval mode
    return task


def _build(model_cfg: ModelConfig, *, num_labels: int | None, cache_dir: Path, freeze_a: bool) -> Task:
    if model_cfg.kind == "module":
        return ModuleTask(build_module(model_cfg.factory or "", dict(model_cfg.factory_kwargs)))
    if model_cfg.kind == "classification":
        labels = model_cfg.num_labels or num_labels
        if labels is None:
            raise ModelError("a classification model needs model.num_labels (or labelled data to infer it)")
        model, tokenizer = load_sequence_classifier(model_cfg.name, cache_dir, labels)
        if model_cfg.lora is not None:
            model = apply_lora(model, model_cfg.lora, task_type="classification", freeze_a=freeze_a)
        return ClassificationTask(model, tokenizer, model_cfg.max_length, model_cfg.compute_dtype)
    model, tokenizer = load_causal_lm(model_cfg.name, cache_dir)
    if model_cfg.lora is not None:
        model = apply_lora(model, model_cfg.lora, task_type="causal_lm", freeze_a=freeze_a)
    return CausalLMTask(model, tokenizer, model_cfg.max_length, model_cfg.compute_dtype)


def import_factory(spec: str) -> Callable[..., Any]:
    """``"package.module:callable"`` to the callable, with errors that say which part failed.

    The module is looked up on ``sys.path`` and in the current directory (``python -m`` puts the current
    directory first; the ``fedtune`` console script does not, and a ``mymodel.py`` next to the config is the
    usual first try). An exception raised while importing the user's module is wrapped in a ModelError that
    names the config key."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model.factory must look like 'package.module:callable', got {spec!r}")
    module = _import_user_module(spec, module_name)
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"model.factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelError(f"model.factory {spec!r} is not callable")
    return factory


def _import_user_module(spec: str, module_name: str) -> Any:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)  # last: a user's file never shadows an installed package
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        missing_itself = err.name is None or module_name == err.name or module_name.startswith(err.name + ".")
        if not missing_itself:
            # the user's module was found, but something it imports is missing
            raise ModelError(f"model.factory {spec!r}: importing {module_name!r} failed: {err}") from err
        raise ModelError(
            f"model.factory {spec!r}: cannot import module {module_name!r}: {err}. fedtune looks in the current "
            f"directory ({cwd}) and on sys.path: put {top.replace('.', '/')}.py (or the package folder) there, "
            "add its folder to PYTHONPATH, or pip install it"
        ) from err
    except Exception as err:  # any error in the user's module, named with the config key
        raise ModelError(
            f"model.factory {spec!r}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    finally:
        if added:
            sys.path.remove(cwd)


def build_module(spec: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """Call a factory and check it returned an ``nn.Module``; an error raised inside it is a ModelError
    that names the config key."""
    factory = import_factory(spec)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise ModelError(f"model.factory {spec!r} rejected model.factory_kwargs {kwargs}: {err}") from err
    except ValueError:  # no signature to check (some builtins): let the call say
        pass
    try:
        module = factory(**kwargs)
    except Exception as err:  # the user's code: name the config key, keep the cause chained
        raise ModelError(f"model.factory {spec!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"model.factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module
