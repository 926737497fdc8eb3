"""DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018) as a wrapper around any linear strategy.

    clients:  d_k <- clip(d_k, C)                                   (fedtune.privacy.client_clip)
    server:   S   = sum_k d_k            re-clipped here, or summed by SecAgg (the summer)
              m   = expected clients     q * N (Poisson) or m (fixed size): data-independent
              d   = (S + N(0, (z_d C)^2 I)) / m
              x   <- inner strategy's step with d as the round's mean change
              ledger += one sampled-Gaussian event (q or m/N, z); epsilon logged at the configured delta

Everything that changes lives in ``state.extra["dp"]``: the clip norm (adaptive clipping moves it), the
noise multiplier (calibrated once from ``target_epsilon``), the population the rate refers to, and the
accountant's ledger. A checkpoint therefore resumes the privacy accounting exactly.

Fewer replies than sampled (failures, rejections, SecAgg dropouts) keep the guarantee: the noise is
calibrated to one client's contribution (C), not to the number who replied; the denominator is the
expected count, fixed before the round; and the round is charged to the ledger as planned. The missing
clients only make the released mean smaller. A SecAgg round that aborts releases nothing (no sum is ever
unmasked) and is not charged. ``agg_aggregated`` against ``clients_sampled`` in
metrics.jsonl, and the loop's failure lines, show every such round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from fedtune.config.privacy import DPConfig
from fedtune.config.schema import FederationConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.sampling import num_sampled, sampling_rate
from fedtune.core.state import ServerState
from fedtune.core.strategy import Needs, Outcome, Payload
from fedtune.core.sums import LinearSum, SumPlan
from fedtune.privacy import accountant, adaptive, distributed
from fedtune.privacy.ddp_client import config_plan
from fedtune.privacy.distributed import SkellamPlan
from fedtune.privacy.errors import PrivacyError
from fedtune.privacy.noise import gaussian
from fedtune.privacy.sums import plain_sum
from fedtune.privacy.wrapping import LinearStrategy, require_linear, skip_round

KEY = "dp"  # state.extra[KEY]
UNCLIPPED = "dp_unclipped"  # the client's adaptive-clipping bit (update.extras), 1 if norm <= C


def round_mechanism(dp_state: dict, federation: FederationConfig, sampling: str) -> tuple[dict, float]:
    """(ledger entry of the next round, expected number of clients), both data-independent."""
    n, z = int(dp_state["population"]), float(dp_state["z"])
    if sampling == "poisson":
        q = sampling_rate(n, count=federation.clients_per_round, fraction=federation.fraction)
        return accountant.poisson_entry(q, z), q * n
    m = num_sampled(n, count=federation.clients_per_round, fraction=federation.fraction)
    return accountant.fixed_entry(n, m, z), float(m)


class DPFedAvg:
    """Wraps a linear strategy into a sum strategy; holds configuration only (the round state is in
    ServerState). The loop forms the planned sum (in the clear, or by SecAgg) and calls ``apply_sum``."""

    def __init__(
        self,
        inner: LinearStrategy,
        dp: DPConfig,
        federation: FederationConfig,
        *,
        seed: int,
        expected_dropout: float = 0.0,
    ) -> None:
        require_linear(inner, what="privacy.dp (DP-FedAvg)")
        self.inner, self.dp, self.federation, self.seed = inner, dp, federation, seed
        self.expected_dropout = expected_dropout  # distributed DP: the survivors the noise is split among

    @property
    def needs(self) -> Needs:
        return self.inner.needs + Needs(extras=(UNCLIPPED,) if self.dp.adaptive is not None else ())

    # ----- state -------------------------------------------------------------------------------------------

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        state = self.inner.init_state(params, spec)
        ledger = {"clip": self.dp.clip, "z": self.dp.noise_multiplier, "population": None, "ledger": []}
        return state.evolve(extra={**state.extra, KEY: ledger})

    def _dp(self, state: ServerState) -> dict:
        if KEY not in state.extra:
            raise PrivacyError("the server state has no DP ledger: it was not created by this DP strategy")
        return state.extra[KEY]

    def _with(self, state: ServerState, dp_state: dict) -> ServerState:
        return state.evolve(extra={**state.extra, KEY: dp_state})

    def begin_round(self, state: ServerState, *, population: int) -> ServerState:
        """Record the population the sampling rate refers to; calibrate z from target_epsilon once."""
        state = self.inner.begin_round(state, population=population)
        dp_state = dict(self._dp(state), population=int(population))
        if self.dp.distributed:
            dp_state["z"] = self._skellam(state.spec.numel).noise_multiplier
        elif dp_state["z"] is None:
            dp_state["z"] = self._calibrate(int(population))
        self._noise_split(dp_state)  # fail before the round, not after training, if adaptive cannot work
        return self._with(state, dp_state)

    def _skellam(self, numel: int) -> SkellamPlan:
        """Distributed DP's plan: the same function of the config the clients compute (ddp_client)."""
        return config_plan(
            self.dp,
            rounds=self.federation.rounds,
            clients_per_round=self.federation.clients_per_round,
            expected_dropout=self.expected_dropout,
            dim=numel,
        )

    def _entry(self, state: ServerState, dp_state: dict, survivors: int | None = None) -> dict:
        """The ledger entry of a round: sampled Gaussian (central), or Skellam at ``survivors`` shares
        (distributed; the planned number before the round)."""
        if not self.dp.distributed:
            return round_mechanism(dp_state, self.federation, self.dp.sampling)[0]
        plan = self._skellam(state.spec.numel)
        return distributed.entry(plan, plan.planned_clients if survivors is None else survivors)

    def _noise_split(self, dp_state: dict) -> tuple[float, float | None]:
        """(update noise multiplier z_delta, count noise sigma_b or None without adaptive clipping)."""
        z = float(dp_state["z"])
        if self.dp.adaptive is None:
            return z, None
        _, expected = round_mechanism(dp_state, self.federation, self.dp.sampling)
        count_noise = self.dp.adaptive.count_noise or adaptive.default_count_noise(expected)
        if 2 * count_noise <= z:
            source = "privacy.dp.adaptive.count_noise" if self.dp.adaptive.count_noise else "the default (expected/20)"
            raise PrivacyError(
                f"adaptive clipping: count noise {count_noise:g} from {source} must exceed noise_multiplier / 2 = "
                f"{z / 2:g} with about {expected:g} clients per round; set privacy.dp.adaptive.count_noise higher"
            )
        return adaptive.update_noise_multiplier(z, count_noise), count_noise

    def _calibrate(self, population: int) -> float:
        fed, rounds = self.federation, self.federation.rounds
        if self.dp.sampling == "poisson":
            q = sampling_rate(population, count=fed.clients_per_round, fraction=fed.fraction)
            kwargs: dict[str, Any] = {"q": q}
        else:
            m = num_sampled(population, count=fed.clients_per_round, fraction=fed.fraction)
            kwargs = {"population": population, "sample_size": m}
        return accountant.noise_multiplier_for_epsilon(
            self.dp.target_epsilon,  # type: ignore[arg-type]
            self.dp.delta,
            rounds=rounds,
            accountant=self.dp.accountant,
            **kwargs,
        )

    def epsilon(self, state: ServerState) -> float:
        return accountant.epsilon(self._dp(state)["ledger"], self.dp.delta, accountant=self.dp.accountant)

    def should_stop(self, state: ServerState) -> str | None:
        """A reason to stop before the next round, if it would take epsilon past the budget."""
        reason = self.inner.should_stop(state)
        if reason is not None or self.dp.epsilon_budget is None:
            return reason
        dp_state = self._dp(state)
        if dp_state["population"] is None or dp_state["z"] is None:
            raise PrivacyError("should_stop called before begin_round recorded the population")
        entry = self._entry(state, dp_state)
        after = accountant.epsilon(
            accountant.append(dp_state["ledger"], entry), self.dp.delta, accountant=self.dp.accountant
        )
        if after > self.dp.epsilon_budget:
            spent = self.epsilon(state)
            return (
                f"privacy budget: round {state.round + 1} would bring epsilon from {spent:.3f} to {after:.3f} "
                f"(delta={self.dp.delta:g}), over privacy.dp.epsilon_budget={self.dp.epsilon_budget:g}"
            )
        return None

    # ----- a round -----------------------------------------------------------------------------------------

    def fit_payload(self, state: ServerState, client_id: str) -> Payload:
        arrays, options = self.inner.fit_payload(state, client_id)
        clip = float(self._dp(state)["clip"])
        return arrays, {**options, "dp_clip": clip, "dp_adaptive": self.dp.adaptive is not None}

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return self.inner.eval_payload(state, client_id=client_id)

    def client_state_lost(self, state: ServerState, client_id: str) -> ServerState:
        return self.inner.client_state_lost(state, client_id)

    def sum_plan(self, state: ServerState) -> SumPlan:
        """Uniform weights, every summand clipped to C (re-clipped by the plain sum), the clip bit summed too
        under adaptive clipping."""
        dp_state = self._dp(state)
        if dp_state["population"] is None or dp_state["z"] is None:
            raise PrivacyError("DP-FedAvg needs begin_round (the population) before aggregate")
        clip = float(dp_state["clip"])
        _, count_noise = self._noise_split(dp_state)
        return SumPlan(
            round=state.round + 1,
            numel=state.spec.numel,
            weighting="uniform",
            l2_bound=clip,
            coord_bound=clip,
            channels=(UNCLIPPED,) if count_noise else (),
            integers=self._skellam(state.spec.numel) if self.dp.distributed else None,
        )

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> Outcome:
        """The round from the clients' updates summed in the clear (the loop forms the sum itself)."""
        if self.dp.distributed:
            raise PrivacyError(
                "privacy.dp.distributed needs secure aggregation: the clients' noise is split among them"
            )
        return self.apply_sum(state, plain_sum(updates, self.sum_plan(state)))

    def apply_sum(self, state: ServerState, total: LinearSum) -> Outcome:
        dp_state = self._dp(state)
        round_idx, clip, z = state.round + 1, float(dp_state["clip"]), float(dp_state["z"])
        entry, expected = round_mechanism(dp_state, self.federation, self.dp.sampling)
        z_update, count_noise = self._noise_split(dp_state)
        skellam = self._skellam(state.spec.numel) if self.dp.distributed else None
        metrics: dict[str, Any] = {
            "dp_delta": self.dp.delta,
            "dp_noise_multiplier": z,
            "dp_clip": clip,
            "dp_noise_std": z_update * clip,
            "dp_expected_clients": expected,
        }
        if total.aborted is not None:
            # An aborted SecAgg round releases nothing: the server never unmasks a sum (every abort comes
            # before the last mask is removed, server.py), adds no noise and keeps the model. Whether it
            # aborts depends on dropouts only (assumption 6 of docs/PRIVACY.md), so it is not charged.
            eps = accountant.epsilon(dp_state["ledger"], self.dp.delta, accountant=self.dp.accountant)
            abort = {"epsilon": eps, "dp_charged": 0, "aggregated": 0, "secagg_abort": total.aborted}
            return self._with(skip_round(state), dp_state), {**metrics, **abort}
        # From here the round releases a noised sum whatever else happens: it is charged.
        if skellam is not None and total.count == 0:  # nobody's data in a zero sum: nothing to charge
            return self._with(self.inner.step_mean(state, np.zeros(state.spec.numel))[0], dp_state), {
                **metrics,
                "epsilon": self.epsilon(state),
                "dp_charged": 0,
                "aggregated": 0,
            }
        if skellam is not None:  # the clients' noise is in the sum already, its shares from the survivors alone
            entry = distributed.entry(skellam, total.count)
            noise = np.zeros(state.spec.numel)
            metrics.update(dp_noise_std=skellam.noise_std(total.count), ddp_noise_shares=total.count)
            metrics["dp_epsilon_round"] = accountant.epsilon([entry], self.dp.delta)
        else:
            noise = gaussian(
                state.spec.numel,
                z_update * clip,
                seed=self.seed,
                scope=("dp-noise", round_idx),
                secure=self.dp.secure_rng,
            )
        ledger = accountant.append(dp_state["ledger"], entry)
        metrics.update(epsilon=accountant.epsilon(ledger, self.dp.delta, accountant=self.dp.accountant), dp_charged=1)
        mean = (total.total + noise) / expected
        new_state, inner_metrics = self.inner.step_mean(state, mean)
        new_dp = {**dp_state, "ledger": ledger}
        if count_noise:
            new_dp["clip"], adaptive_metrics = self._adapt(total, clip, count_noise, expected, round_idx)
            metrics.update(adaptive_metrics)
        metrics.update({k: v for k, v in inner_metrics.items() if k != "aggregated"})
        metrics.update({"aggregated": total.count, **total.metrics})
        return self._with(new_state, new_dp), metrics

    def _adapt(
        self, total: LinearSum, clip: float, count_noise: float, expected: float, round_idx: int
    ) -> tuple[float, dict]:
        cfg = self.dp.adaptive
        assert cfg is not None
        centred = total.channels[UNCLIPPED] - 0.5 * total.count
        noise = float(
            gaussian(1, count_noise, seed=self.seed, scope=("dp-count-noise", round_idx), secure=self.dp.secure_rng)[0]
        )
        fraction = adaptive.unclipped_fraction(centred, noise, expected)
        new_clip = adaptive.next_clip(clip, fraction, target_quantile=cfg.target_quantile, lr=cfg.lr)
        if not math.isfinite(new_clip) or new_clip <= 0:
            raise PrivacyError(f"adaptive clipping produced an invalid clip norm {new_clip}")
        return new_clip, {"dp_unclipped_fraction": fraction, "dp_next_clip": new_clip}
