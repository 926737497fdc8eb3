"""The asynchronous (FedBuff) keys: ``server.mode``/``server.fedbuff`` and ``simulation.client_speed``.

``server.mode: async`` replaces the round barrier by FedBuff (Nguyen et al. 2022): up to ``concurrency``
clients train at once, each on the model version it was dispatched with, and the server steps after every
``buffer_size`` arrivals. ``federation.rounds`` then counts buffered steps. In simulation the arrivals follow
a simulated clock: each client has a speed drawn once from ``simulation.client_speed`` (seeded), so a
1,000-client run is fast and deterministic; over gRPC (``fedtune server``) they are the real participants'.
``check_async_rules`` is the table of what async mode refuses, each with the reason; it runs when the config
is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from fedtune.config.base import PositiveFloat, PositiveInt, Section

if TYPE_CHECKING:
    from fedtune.config.schema import Config


class FedBuffConfig(Section):
    concurrency: PositiveInt = 8  # M: clients training at once
    buffer_size: PositiveInt = 4  # K: arrivals folded into one server step
    # s(tau) for an update tau versions old: sqrt 1/sqrt(1+tau) (FedBuff); constant 1; polynomial (1+tau)^-a;
    # hinge 1 up to b, then 1/(a(tau-b)+1) (FedAsync, Xie et al. 2019)
    staleness: Literal["sqrt", "constant", "polynomial", "hinge"] = "sqrt"
    staleness_a: PositiveFloat = 0.5  # polynomial exponent a, or hinge slope a
    staleness_b: Annotated[int, Field(ge=0)] = 4  # hinge: staleness with no discount
    # an arrival staler than this is dropped untrained (its slot goes to a fresh client); null: never
    max_staleness: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> FedBuffConfig:
        if self.buffer_size > self.concurrency:
            raise ValueError(
                f"server.fedbuff.buffer_size ({self.buffer_size}) exceeds concurrency ({self.concurrency}): "
                "fewer clients train at once than one step waits for"
            )
        return self


class ClientSpeedConfig(Section):
    """Simulated seconds per local step: base x a per-client factor drawn once x a per-dispatch jitter."""

    seconds_per_step: PositiveFloat = 1.0  # the median client's simulated seconds per local step
    sigma: Annotated[float, Field(ge=0)] = 0.5  # per-client factor ~ lognormal(0, sigma)
    slow_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0  # this share of clients (seeded) is slow ...
    slow_factor: Annotated[float, Field(ge=1)] = 10.0  # ... by this factor (the straggler tail)
    jitter_sigma: Annotated[float, Field(ge=0)] = 0.0  # each dispatch's time x lognormal(0, jitter_sigma)


# what async mode cannot do yet, and why; every entry is checked when the config is loaded
_ASYNC_REFUSED: tuple[tuple[str, str], ...] = (
    (
        "privacy.secure_aggregation",
        "SecAgg's pairwise masks are agreed by a roster fixed before any upload; FedBuff's buffer is whoever "
        "arrives first, so the masks of clients still in flight never cancel (per-buffer secure aggregation "
        "needs an asynchronous protocol such as LightSecAgg, not implemented)",
    ),
    ("privacy.dpsgd", "local DP-SGD's per-client ledger is keyed by round; async dispatches are not rounds yet"),
    ("privacy.dp.adaptive", "adaptive clipping spends part of each round's budget on a count of a sampled cohort"),
    ("privacy.dp.target_epsilon", "set privacy.dp.noise_multiplier; async steps are accounted without sampling"),
    ("server.scaffold", "SCAFFOLD's control variates assume every update was computed from the current model"),
    ("server.aggregator", "only 'mean' is folded with staleness weights (robust rules are not staleness-aware)"),
    (
        "server.lora_aggregation",
        "only 'naive' LoRA averaging is folded asynchronously (the other modes' server plug-ins, exact products and "
        "heterogeneous ranks assume one model version per aggregate)",
    ),
    (
        "server.update_norm_bound / max_examples_per_client 'adaptive' with privacy.dp",
        "the adaptive bounds are medians of the previous step's un-noised updates: they would carry private "
        "data into the next step outside the accounting (use a number, or 'off')",
    ),
    (
        "personalization",
        "the personalisation methods keep and split per-client state round by round (FedSA, FedPer, Ditto, "
        "fine-tuning after the last round); FedBuff has no rounds",
    ),
    ("client.local_epochs", "the simulated clock charges local_steps x seconds per step: set client.local_steps"),
    ("client.lr_scheduler_type", "the local schedule's position counts rounds; use 'constant' in async mode"),
)


def _refused(config: Config) -> list[str]:
    p, s, c = config.privacy, config.server, config.client
    on = {
        "privacy.secure_aggregation": p.secure_aggregation is not None,
        "privacy.dpsgd": p.dpsgd is not None,
        "privacy.dp.adaptive": p.dp is not None and p.dp.adaptive is not None,
        "privacy.dp.target_epsilon": p.dp is not None and p.dp.target_epsilon is not None,
        "server.scaffold": s.scaffold,
        "server.aggregator": s.aggregator != "mean",
        "server.lora_aggregation": s.lora_aggregation != "naive",
        "server.update_norm_bound / max_examples_per_client 'adaptive' with privacy.dp": p.dp is not None
        and "adaptive" in (s.update_norm_bound, s.max_examples_per_client),
        "personalization": config.personalization.active,
        "client.local_epochs": c.local_steps is None,
        "client.lr_scheduler_type": c.lr_scheduler_type != "constant",
    }
    return [f"{key}: {why}" for key, why in _ASYNC_REFUSED if on[key]]


def async_violation(config: Config) -> str | None:
    """The first async-mode rule ``config`` breaks, naming the keys (None: it obeys them); the shape of a rule
    in a table of cross-section rules."""
    if config.server.mode != "async":
        for key, value in (
            ("server.fedbuff", config.server.fedbuff),
            ("simulation.client_speed", config.simulation.client_speed),
        ):
            if value is not None:
                return f"{key} only applies to server.mode 'async'"
        return None
    refused = _refused(config)
    if refused:
        return "server.mode 'async' (FedBuff) cannot be combined with " + "; ".join(refused)
    dp = config.privacy.dp
    if dp is not None and "sampling" in dp.model_fields_set:
        return (
            "privacy.dp.sampling does not apply to server.mode 'async': arrivals are not sampled (they come in "
            "the order clients finish), so no amplification by sampling is claimed; each buffered step is "
            "accounted as an unamplified Gaussian mechanism (docs/ASYNC.md)"
        )
    return None


def check_async_rules(config: Config) -> None:
    """Raise ValueError (inside pydantic: reported like any config error) for a broken async-mode rule."""
    broken = async_violation(config)
    if broken is not None:
        raise ValueError(broken)
