"""The ``personalization`` section: what each client keeps for itself besides the global model.

    none    one global model (the default)
    fedsa   FedSA-LoRA (Guo et al. 2025): LoRA A matrices are shared and averaged, every B stays on its client
    fedper  FedPer (Arivazhagan et al. 2019): the parameters ``local_params`` names stay on each client
    ditto   Ditto (Li et al. 2021): each client also trains a personal model v_k, regularised toward the
            global model w by lambda/2 ||v_k - w||^2; the global model is trained as usual

``finetune_steps`` (any method): after the last round each evaluated client fine-tunes its model (the final
global model, with its own local parameters under fedsa/fedper) for that many local steps on its own
training data and reports the result beside the global and the personalised metrics.

Local parameters (fedsa's B, fedper's ``local_params``) are frozen when the model is built, so they are not
part of the exchanged vector at all: they never travel, in either direction. Each client's values (and
Ditto's personal model) live in the client state store (``simulation.client_state``; a participant's own
cache over gRPC), versioned by round, so a resumed run continues them exactly.

Privacy: nothing local ever leaves the client, so secure aggregation (which sums the shared part) and
DP-FedAvg (which clips and noises the shared part; its guarantee covers the released global model) apply
unchanged. Local DP-SGD is refused: the local parameters and Ditto's personal model would be trained
outside its accounting, and the shared update is computed through them.

Heterogeneous client ranks (lora_aggregation flora / hetlora / flexlora) are refused with every method (the
methods' compatible modes are listed below). ``finetune_steps`` runs with them: each client fine-tunes at its
own rank r_k (the server sends it with the evaluation after the last round), through the rank hook of its
fits (``fedtune.client.lora_ranks.LoraRanks.at_rank``): the first r_k components, scaling alpha / r_k, the
components beyond r_k masked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from fedtune.config.base import PositiveInt, Section

if TYPE_CHECKING:
    from fedtune.config.schema import Config

# lora_aggregation modes each method can run with: the exact modes need every client's A and B
DITTO_LAMBDA = 0.1
COMPATIBLE_LORA_MODES = {"fedsa": ("naive",), "fedper": ("naive", "ffa"), "ditto": ("naive", "ffa")}


class PersonalizationConfig(Section):
    method: Literal["none", "fedsa", "fedper", "ditto"] = "none"
    # fedper (and, added to B, fedsa): exchanged parameter names that stay on each client. Shell-style
    # globs ("*classifier*") or "re:<regex>" (re.search), over the names ParamSpec shows, e.g.
    # "base_model.model.classifier.modules_to_save.weight"
    local_params: list[str] = Field(default_factory=list)
    ditto_lambda: Annotated[float, Field(ge=0)] = DITTO_LAMBDA  # ditto: the pull of the personal model toward w
    # ditto: local steps of the personal model per round (default: the client section's local_steps/epochs)
    ditto_steps: PositiveInt | None = None
    finetune_steps: Annotated[int, Field(ge=0)] = 0  # after the last round: local fine-tuning steps per client

    @model_validator(mode="after")
    def _check(self) -> PersonalizationConfig:
        if self.method == "fedper" and not self.local_params:
            raise ValueError("personalization.method 'fedper' needs personalization.local_params (names kept local)")
        if self.local_params and self.method not in ("fedper", "fedsa"):
            raise ValueError("personalization.local_params only applies to method 'fedper' or 'fedsa'")
        # (compared with the defaults, not "was it given": a saved run config spells out every default)
        for key, default in (("ditto_lambda", DITTO_LAMBDA), ("ditto_steps", None)):
            if getattr(self, key) != default and self.method != "ditto":
                raise ValueError(f"personalization.{key} only applies to method 'ditto'")
        return self

    @property
    def active(self) -> bool:
        """Whether clients keep anything or do any work beyond the plain federation."""
        return self.method != "none" or self.finetune_steps > 0


def check_personalization_rules(config: Config) -> None:
    """Cross-section rules, called from ``Config._check`` (a ValueError names the keys)."""
    p = config.personalization
    if not p.active:
        return
    what = f"personalization.method {p.method!r}" if p.method != "none" else "personalization.finetune_steps"
    if p.method == "fedsa" and config.model.lora is None:
        raise ValueError("personalization.method 'fedsa' keeps LoRA's B matrices local: it needs model.lora")
    mode = config.server.lora_aggregation
    if p.method in COMPATIBLE_LORA_MODES and mode not in COMPATIBLE_LORA_MODES[p.method]:
        raise ValueError(
            f"{what} runs with server.lora_aggregation {' or '.join(map(repr, COMPATIBLE_LORA_MODES[p.method]))}, "
            f"not {mode!r} (fedsa keeps B local, so nothing pairs A with B on the server; ffa freezes A, leaving "
            "fedsa nothing to share; the exact modes need every client's adapter)"
        )
    if config.privacy.dpsgd is not None:
        raise ValueError(
            f"{what} trains parameters that privacy.dpsgd would not account for (local parameters, the personal "
            "model): local DP-SGD and personalisation cannot be combined"
        )
    if config.client.trainer != "builtin":
        raise ValueError(f"{what} trains inside fedtune's built-in loop: set client.trainer 'builtin'")
    if config.simulation.client_nproc > 1:
        raise ValueError(f"{what} keeps per-client state written by one process: simulation.client_nproc must be 1")
    if config.client.straggler_fraction > 0:
        raise ValueError(
            f"{what} with client.straggler_fraction: a straggler's shared part stops early while its local part "
            "would train on; set client.straggler_fraction 0"
        )
