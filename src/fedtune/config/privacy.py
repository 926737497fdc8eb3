"""The ``privacy`` section: client-level DP, local DP-SGD and secure aggregation (all off by default).

Every guarantee these keys buy, and the assumptions it rests on, is spelled out in docs/PRIVACY.md.
Rules that involve other sections (uniform weighting under DP, no robust aggregator under secure
aggregation, DP-SGD's batching) live in ``Config._check``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedtune.config.base import PositiveFloat, PositiveInt, Section
from fedtune.errors import ConfigError

Probability = Annotated[float, Field(gt=0, lt=1)]


class AdaptiveClipConfig(Section):
    """Quantile-based adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive
    clipping"): C <- C * exp(-lr * (noisy fraction of unclipped clients - target_quantile))."""

    target_quantile: Probability = 0.5  # gamma: the share of clients whose update should fit under C
    lr: PositiveFloat = 0.2  # eta_C of the geometric update
    # sigma_b: std of the Gaussian noise on the count of unclipped clients; null = expected clients / 20
    # (the paper's and TFF's default). Must exceed noise_multiplier / 2 (it takes part of the budget).
    count_noise: PositiveFloat | None = None


class DPConfig(Section):
    """Client-level DP-FedAvg (McMahan et al. 2018): clip each client's whole update, noise the sum."""

    clip: PositiveFloat = 1.0  # C: L2 bound of one client's update (the initial C with adaptive clipping)
    noise_multiplier: PositiveFloat | None = None  # z: noise std on the sum is z * C (exclusive with target_epsilon)
    target_epsilon: PositiveFloat | None = None  # choose z so that federation.rounds rounds spend this epsilon
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5  # the delta every reported epsilon is computed at
    epsilon_budget: PositiveFloat | None = None  # stop cleanly before a round that would exceed this epsilon
    # poisson: each client joins a round independently with probability q (federation.fraction, or
    # clients_per_round / population); fixed: exactly clients_per_round clients, accounted as sampling
    # without replacement (replace-one adjacency, RDP only)
    sampling: Literal["poisson", "fixed"] = "poisson"
    accountant: Literal["rdp", "pld"] = "rdp"  # dp-accounting's Renyi-DP or privacy-loss-distribution accountant
    adaptive: AdaptiveClipConfig | None = None  # null: fixed clipping at ``clip``
    secure_rng: bool = False  # noise and sampling from a CSPRNG seeded by the OS (production; not reproducible)
    # distributed DP: each client adds Skellam noise to its update inside secure aggregation (Agarwal et al.
    # 2021), so not even the server sees an un-noised sum; needs secure_aggregation and clients_per_round
    distributed: bool = False

    @model_validator(mode="after")
    def _check(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of privacy.dp.noise_multiplier and privacy.dp.target_epsilon")
        if self.distributed and self.adaptive is not None:
            raise ValueError(
                "privacy.dp.distributed cannot be accounted with privacy.dp.adaptive: the clipping bits would need "
                "their own distributed noise; use a fixed clip"
            )
        if self.distributed and self.accountant != "rdp":
            raise ValueError("privacy.dp.distributed is accounted by the Skellam RDP bound: set accountant 'rdp'")
        if self.sampling == "fixed" and self.accountant == "pld":
            raise ValueError(
                "privacy.dp.accountant 'pld' cannot account fixed-size sampling (without replacement); "
                "use accountant 'rdp' or sampling 'poisson'"
            )
        if (
            self.target_epsilon is not None
            and self.epsilon_budget is not None
            and self.epsilon_budget < self.target_epsilon
        ):
            raise ValueError("privacy.dp.epsilon_budget is smaller than privacy.dp.target_epsilon")
        if (
            self.adaptive is not None
            and self.adaptive.count_noise is not None
            and self.noise_multiplier is not None
            and 2 * self.adaptive.count_noise <= self.noise_multiplier
        ):
            raise ValueError(
                "privacy.dp.adaptive.count_noise must exceed noise_multiplier / 2: the count's noise takes "
                "part of the privacy budget and the update's share would be negative"
            )
        return self


class DpSgdConfig(Section):
    """Sample-level DP-SGD on each client's trainable parameters (Abadi et al. 2016), via Opacus."""

    noise_multiplier: PositiveFloat = 1.0  # noise std on each step's clipped gradient sum, in units of max_grad_norm
    max_grad_norm: PositiveFloat = 1.0  # per-example gradient L2 bound
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5  # the delta each client's epsilon is reported at
    # with client.full_batch: each step keeps each local example with this probability (Poisson sampling,
    # amplified accounting); required there and not allowed otherwise (shuffled minibatches are
    # accounted without amplification)
    sample_rate: Probability | None = None
    secure_rng: bool = False  # noise and example sampling from a CSPRNG (production; not reproducible)


class SecAggConfig(Section):
    """Secure aggregation: Bonawitz et al. 2017 with the SecAgg+ neighbour graph of Bell et al. 2020."""

    # t = ceil(threshold * k) of a client's k neighbours must survive to unmask; above 1/2 so that two
    # disjoint halves can never both reconstruct. null: just above 1/2 (the most dropouts a secure t allows)
    threshold: Annotated[float, Field(gt=0.5, le=1)] | None = None
    # k of the SecAgg+ graph. null: the smallest k whose rounds abort with probability <= failure_probability
    # at expected_dropout (the complete graph of SecAgg when none smaller does); >= clients - 1: complete graph.
    # Given explicitly (with clients_per_round), k and threshold are checked against the same target.
    neighbours: Annotated[int, Field(ge=2)] | None = None
    expected_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # share of a round's clients expected to drop
    failure_probability: Probability = 0.01  # target: at most this share of rounds aborts (Bell et al. 2020)
    # share of clients assumed corrupted and colluding with a malicious server (Bell et al.'s gamma): the
    # threshold is raised until no neighbourhood holds 2t - k of them (within failure_probability). 0: t just
    # above k/2, which withstands one colluding neighbour at most (docs/PRIVACY.md, trust model)
    expected_corrupt: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    # bits of precision per client value; the field modulus is 2^(value_bits + ceil(log2 n)) <= 2^32 so n
    # clients cannot wrap. null: use the whole 32-bit field (2^32 - 1) // n levels per value
    value_bits: Annotated[int, Field(ge=2, le=31)] | None = None
    clip_range: PositiveFloat = 1.0  # without DP: every coordinate is clipped to [-clip_range, clip_range]
    weight_cap: PositiveInt = 1000  # example weighting: a client's weight is min(n_k, weight_cap) / weight_cap
    simulate_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # simulation: a client drops at a random stage
    # A client's own floors under what the server proposes (malicious-server model, docs/PRIVACY.md): it
    # refuses a round whose threshold, neighbour count or roster size is below them.
    min_threshold: Annotated[float, Field(gt=0.5, le=1)] | None = None  # null: this section's threshold
    min_neighbours: Annotated[int, Field(ge=2)] | None = None  # null: this section's neighbours (null: 2)
    min_clients: Annotated[int, Field(ge=3)] = 3  # fewer clients in the roster: the client refuses


def _section_switch(value: object) -> object:
    """``secure_aggregation: true`` means the section with its defaults; false means off."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class PrivacyConfig(Section):
    dp: DPConfig | None = None  # client-level DP-FedAvg; null: off
    dpsgd: DpSgdConfig | None = None  # local sample-level DP-SGD; null: off
    secure_aggregation: SecAggConfig | None = None  # null/false: off; true: on with defaults

    @model_validator(mode="before")
    @classmethod
    def _switches(cls, data: object) -> object:
        if isinstance(data, dict):
            return {k: _section_switch(v) if k in ("secure_aggregation", "dpsgd") else v for k, v in data.items()}
        return data

    @property
    def enabled(self) -> bool:
        return self.dp is not None or self.dpsgd is not None or self.secure_aggregation is not None


def check_dpsgd_data_parallel(privacy: PrivacyConfig, nproc: int, *, nproc_key: str) -> None:
    """Refuse local DP-SGD on ``nproc > 1`` data-parallel ranks (``nproc_key`` names where nproc was set).

    Each rank would clip and noise its own shard of the batch and DDP would then average the ranks: the noise
    would be 1/sqrt(nproc) of what the accountant assumes and no rank's step would be the DP-SGD step the
    ledger records. Correct DP-SGD needs the per-example clipped sum over all ranks before one noise draw.

    >>> check_dpsgd_data_parallel(PrivacyConfig(dpsgd=DpSgdConfig()), 1, nproc_key="--nproc")  # fine
    """
    if privacy.dpsgd is not None and nproc > 1:
        raise ConfigError(
            f"privacy.dpsgd cannot run with {nproc_key} {nproc} (> 1): per-example clipping would see only one "
            "rank's shard of each batch and the noise and privacy accounting would be wrong; "
            f"set {nproc_key} 1 or turn privacy.dpsgd off"
        )


def check_secagg_availability(secagg: SecAggConfig, clients: int | None) -> None:
    """Refuse an explicit threshold / neighbour count whose rounds of ``clients`` would abort more often than
    ``failure_probability`` at ``expected_dropout``, and more often than the automatic choice. Checkable only
    when clients_per_round fixes n; with a sampling fraction the bound is computed each round (and logged)."""
    if clients is None or (secagg.threshold is None and secagg.neighbours is None):
        return
    from fedtune.config import secagg_bounds  # scipy: only for a config that fixes k or t

    given = secagg_bounds.plan(
        clients,
        dropout=secagg.expected_dropout,
        failure_probability=secagg.failure_probability,
        threshold=secagg.threshold,
        neighbours=secagg.neighbours,
        corrupt=secagg.expected_corrupt,
    )
    auto = secagg_bounds.plan(
        clients,
        dropout=secagg.expected_dropout,
        failure_probability=secagg.failure_probability,
        corrupt=secagg.expected_corrupt,
    )
    if given.collusion_bound > secagg.failure_probability:
        raise ValueError(
            f"privacy.secure_aggregation: threshold={secagg.threshold} with neighbours={secagg.neighbours} lets "
            f"2t - k colluding clients into a neighbourhood with probability up to {given.collusion_bound:.3g} at "
            f"expected_corrupt={secagg.expected_corrupt:g} (above failure_probability); raise the threshold or "
            "leave it null to choose it"
        )
    # refused only where the automatic choice does better (with few clients nothing may meet the target)
    if given.abort_bound > secagg.failure_probability and given.abort_bound > auto.abort_bound:
        k = auto.neighbours or "null (the complete graph)"
        raise ValueError(
            f"privacy.secure_aggregation: neighbours={secagg.neighbours} and threshold={secagg.threshold} abort up "
            f"to {given.abort_bound:.3g} of rounds of {clients} clients at expected_dropout="
            f"{secagg.expected_dropout:g}, above failure_probability={secagg.failure_probability:g}; leave both "
            f"null to choose them (here neighbours {k}, threshold just above 1/2), or declare the dropout you expect"
        )


def check_distributed_dp(privacy: PrivacyConfig, clients_per_round: int | None) -> None:
    """Distributed DP's cross-section rules: what its accounting and its noise split rest on."""
    if privacy.secure_aggregation is None:
        raise ValueError(
            "privacy.dp.distributed needs privacy.secure_aggregation: the clients' noise shares are each too small "
            "to protect an update the server could see on its own"
        )
    if privacy.secure_aggregation.value_bits is not None:
        raise ValueError(
            "privacy.dp.distributed carries noised integers in the 32-bit field: set "
            "privacy.secure_aggregation.value_bits to null"
        )
    if clients_per_round is None:
        raise ValueError(
            "privacy.dp.distributed needs federation.clients_per_round (not fraction): each client splits the noise "
            "by the number of clients it expects, computed from its own config"
        )
