"""Build the client-side extensions from the config: local-training hooks and update transforms.

Hooks change local training (a proximal term, a gradient correction, per-sample clipping); update
transforms change the reply after training (clip the whole update, quantise, mask). Both are plain
callables composed in order, so strategies and privacy mechanisms stack without subclassing the worker.

The strategy hooks (fedtune.client.hooks) are always registered: each one acts only when the server's
FitInstruction asks for it, so the server's config decides and a client cannot drift out of step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedtune.client import hooks, partial
from fedtune.client.lora_ranks import LoraRanks
from fedtune.client.personal import Personalizer
from fedtune.client.worker import HookFactory
from fedtune.config.schema import Config
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.privacy.build import client_privacy

UpdateTransform = Callable[[ClientUpdate, FitInstruction], ClientUpdate]


@dataclass
class ClientExtensions:
    hook_factories: list[HookFactory] = field(default_factory=list)
    update_transforms: list[UpdateTransform] = field(default_factory=list)
    personal: Personalizer | None = None  # what each client keeps for itself (config.personalization)
    residual_state: str | None = None  # the store of each client's LoRA residual copy (fedtune.client.residual_copy)
    ranks: LoraRanks | None = None  # the rank hook of the fits (fine-tuning after federation composes it too)


def strategy_extensions(*, own_rank: int | None = None, own_rslora: bool = False) -> ClientExtensions:
    """The client halves of FedProx, stragglers, SCAFFOLD and heterogeneous LoRA ranks, in a working order.

    ``own_rank``: a deployed participant's own LoRA rank (its ``model.lora.r``), when below the server's."""
    ranks = LoraRanks(own_rank=own_rank, own_rslora=own_rslora)
    # (the LoRA residual is part of the global model: ClientWorker loads it before any hook runs)
    return ClientExtensions(
        hook_factories=[
            ranks.hooks,  # first: it rewrites the received vector to the client's rank
            hooks.proximal_term,
            hooks.scaffold_correction,
            hooks.stragglers,
            partial.time_budget,  # deployment.partial_work: stop at the server's time budget, weight by steps
        ],
        ranks=ranks,
        # run after the fit's own finishes, so the straggler's partial delta and step count are final when
        # SCAFFOLD reads them
        update_transforms=[hooks.scaffold_control_delta],
    )


def build_client_extensions(config: Config, *, own_rank: int | None = None) -> ClientExtensions:
    rslora = config.model.lora is not None and config.model.lora.use_rslora
    ext = strategy_extensions(own_rank=own_rank, own_rslora=rslora)
    # --- privacy, separately: DP-SGD's hook runs first (later gradient hooks post-process the private
    # gradient); DP clipping runs last (what leaves the client is what is bounded) ---
    private_hooks, private_transforms = client_privacy(config)
    return ClientExtensions(
        hook_factories=private_hooks + ext.hook_factories,
        update_transforms=ext.update_transforms + private_transforms,
        personal=personalizer(config, ranks=ext.ranks),
        # an address the run resolved (``with_client_state``); a bare "disk"/"ray" was not: this worker's memory
        residual_state=config.simulation.client_state if ":" in config.simulation.client_state else None,
    )


def personalizer(config: Config, *, ranks: LoraRanks | None = None) -> Personalizer | None:
    """The client half of ``config.personalization``; its state goes where the DP-SGD ledger goes.
    ``ranks``: the fits' rank hook, which fine-tuning after federation composes (its own rank hook if None)."""
    if not config.personalization.active:
        return None
    return Personalizer(
        config.personalization,
        config.client,
        state=config.simulation.client_state,
        seed=config.seed,
        rounds=config.federation.rounds,
        ranks=ranks,
    )
