"""The client half of personalisation: what each client keeps, trains and evaluates for itself.

    fedsa / fedper  the local parameters (``fedtune.models.personal``; frozen and outside the exchanged
                    vector) are written with the client's own values for its fit, trained beside the shared
                    part, saved, and reset to their build-time values, so whatever runs next (another client,
                    the global evaluation) sees the global model
    ditto           after the usual global update (which is what the client sends), the client's personal
                    model v_k (first: the global model it received) trains for ditto_steps with
                    loss + lambda/2 ||v_k - w||^2, w the received global model (Li et al. 2021, Algorithm 1)
    finetune_steps  at the evaluation after the last round, the client fine-tunes the final global model (with
                    its own local parameters) for that many steps and is evaluated again; under client ranks
                    (flora / hetlora / flexlora) at its own rank r_k, through the same rank hook its fits use
                    (``LoraRanks.at_rank``: the first r_k components, scaling alpha / r_k, the rest masked)

Every client's values live in the client state store (``fedtune.core.state_store``) under the namespaces
below, versioned by round: a fit of round r reads what rounds < r saved, so a round replayed after a crash
reads what it read the first time, and a resumed run continues every client exactly. One object serves all
the clients of a worker; it holds no client's values between requests (only the build-time values of the
local parameters, which every client starts from).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from fedtune.aggregation.lora import lora_pairs
from fedtune.aggregation.lora_ranks import from_client_rank
from fedtune.client.lora_ranks import LoraRanks
from fedtune.client.train import LocalHooks, LocalResult, LocalRun, local_train
from fedtune.client.weights import TrainableView
from fedtune.config.personalization import PersonalizationConfig
from fedtune.config.schema import ClientConfig
from fedtune.core.keys import CLIENT_RANK_EXTRA, CLIENT_RSLORA_EXTRA, ROUNDS_OPTION
from fedtune.core.messages import EvalInstruction, FitInstruction
from fedtune.core.rng import derive_seed
from fedtune.core.state_store import ClientState, ClientStateStore, open_state_store
from fedtune.errors import CheckpointError
from fedtune.models.personal import local_parameters
from fedtune.tasks.base import EvalSums, Example, Task

NS_LOCAL = "personal-local"  # fedsa / fedper: {parameter name: value}
NS_DITTO = "personal-ditto"  # ditto: {"params": the personal model's exchanged vector}
# after the last round: {"params": vector, "local/<name>": value}; meta "lora_rank" / "lora_rslora" when the
# client fine-tuned at a rank below the adapter's (the vector is then in global units, zero beyond that rank)
NS_FINETUNED = "personal-finetuned"
PERSONAL, FINETUNED = "personal", "finetuned"  # keys of ClientEval.personal
LOCAL_PREFIX = "local/"

Evaluate = Callable[[Sequence[Example]], EvalSums]  # held-out sums of the module's current weights


class Personalizer:
    """Built once per worker from the config; ``state`` is the store's address (opened on first use in
    whichever process built this object: a Ray actor, a participant). ``ranks``: the worker's rank hook
    (the one its fits use, so a participant's own and pruned ranks hold for fine-tuning too)."""

    def __init__(
        self,
        cfg: PersonalizationConfig,
        client: ClientConfig,
        *,
        state: str,
        seed: int,
        rounds: int,
        ranks: LoraRanks | None = None,
    ) -> None:
        self.cfg = cfg
        self.ranks = ranks if ranks is not None else LoraRanks()
        self.client = client  # for fine-tuning after the last round (an evaluation carries no train section)
        self.state = state
        self.seed = seed
        self.rounds = rounds
        self._initial: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()

    @functools.cached_property
    def store(self) -> ClientStateStore:
        return open_state_store(self.state)

    # ----------------------------------------------------------------------------------------- local params

    def _build_values(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The local parameters' values as built (seeded, the same on every worker); taken on first use,
        before any client's values were written."""
        if module not in self._initial:
            self._initial[module] = {n: p.detach().clone() for n, p in local_parameters(module).items()}
        return self._initial[module]

    def local_values(self, module: torch.nn.Module, client_id: str, *, before: int) -> dict[str, torch.Tensor]:
        """The client's local parameters as saved in the newest round before ``before`` (else as built)."""
        build = self._build_values(module)
        saved = self.store.load(client_id, NS_LOCAL, round=before)
        if saved is None:
            return build
        if set(saved.arrays) != set(build):
            raise CheckpointError(
                f"client {client_id!r}: its saved local parameters {sorted(saved.arrays)[:3]} do not match the "
                f"model's {sorted(build)[:3]} (the personalization section changed?)"
            )
        return {n: torch.from_numpy(np.array(a)) for n, a in saved.arrays.items()}

    @contextmanager
    def own_local(
        self, module: torch.nn.Module, client_id: str, *, before: int, train: bool = False
    ) -> Iterator[dict[str, torch.nn.Parameter]]:
        """The client's local parameters in ``module`` (trainable if ``train``); the build values after."""
        local = local_parameters(module)
        build = self._build_values(module)
        _write(local, self.local_values(module, client_id, before=before))
        try:
            for p in local.values():
                p.requires_grad_(train)
            yield local
        finally:
            for p in local.values():
                p.requires_grad_(False)
            _write(local, build)

    # ----------------------------------------------------------------------------------------- fit

    def fit(
        self,
        task: Task,
        view: TrainableView,
        instr: FitInstruction,
        cfg: ClientConfig,
        train: Callable[[], LocalResult],
        examples: Sequence[Example],
    ) -> tuple[LocalResult, np.ndarray, dict[str, float]]:
        """Run ``train`` (the global update) the method's way; returns (its result, the trained exchanged
        vector to reply with, extra metrics). The client's own state is saved before this returns."""
        cid = instr.client_id
        if self.cfg.method in ("fedsa", "fedper"):
            with self.own_local(task.module, cid, before=instr.round, train=True) as local:
                result = train()
                params = view.read()
                trained = {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in local.items()}
            self.store.save(cid, NS_LOCAL, ClientState(trained, {"steps": result.steps}), round=instr.round)
            return result, params, {}
        result = train()
        params = view.read()
        if self.cfg.method != "ditto":
            return result, params, {}
        personal = self._ditto(task, view, instr, cfg, examples)
        view.write(params)  # the worker's model holds the global update again
        return result, params, {"ditto_train_loss": personal.train_loss}

    def _ditto(
        self, task: Task, view: TrainableView, instr: FitInstruction, cfg: ClientConfig, examples: Sequence[Example]
    ) -> LocalResult:
        """One round of the personal model: min_v F_k(v) + lambda/2 ||v - w||^2, from the saved v_k."""
        saved = self.store.load(instr.client_id, NS_DITTO, round=instr.round)
        view.write(saved.arrays["params"] if saved is not None else instr.params)
        lam = self.cfg.ditto_lambda
        anchors = _tensors(instr.params, view)
        hooks = LocalHooks()
        if lam > 0:

            def pull() -> torch.Tensor:
                return 0.5 * lam * sum(((p - w) ** 2).sum() for p, w in zip(view.params, anchors, strict=True))

            hooks.loss_terms.append(pull)
        if self.cfg.ditto_steps is not None:
            cfg = cfg.model_copy(update={"local_steps": self.cfg.ditto_steps, "local_epochs": None})
        # its own minibatch and dropout streams
        run = LocalRun(derive_seed(instr.seed, "ditto"), instr.round, instr.client_id, instr.options.get(ROUNDS_OPTION))
        result = local_train(task, examples, cfg, run, hooks=hooks)
        state = ClientState({"params": view.read()}, {"steps": result.steps})
        self.store.save(instr.client_id, NS_DITTO, state, round=instr.round)
        return result

    # ----------------------------------------------------------------------------------------- evaluate

    def evaluate(
        self,
        task: Task,
        view: TrainableView,
        instr: EvalInstruction,
        evaluate: Evaluate,
        examples: Sequence[Example],
        train_examples: Callable[[], Sequence[Example]],
    ) -> dict[str, EvalSums]:
        """The client's personalised (and, after the last round, fine-tuned) sums on the same ``examples``
        the global model was evaluated on. ``view`` holds the global vector; it does again afterwards."""
        out: dict[str, EvalSums] = {}
        cid, after = instr.client_id, instr.round + 1  # what the fits of rounds <= instr.round saved
        if self.cfg.method in ("fedsa", "fedper"):
            with self.own_local(task.module, cid, before=after):
                out[PERSONAL] = evaluate(examples)
        elif self.cfg.method == "ditto":
            saved = self.store.load(cid, NS_DITTO, round=after)
            view.write(saved.arrays["params"] if saved is not None else instr.params)
            out[PERSONAL] = evaluate(examples)
            view.write(instr.params)
        if self.cfg.finetune_steps and instr.round == self.rounds:
            out[FINETUNED] = self._finetune(task, view, instr, evaluate, examples, train_examples())
        return out

    def _finetune(
        self,
        task: Task,
        view: TrainableView,
        instr: EvalInstruction,
        evaluate: Evaluate,
        examples: Sequence[Example],
        train_examples: Sequence[Example],
    ) -> EvalSums:
        """Local fine-tuning after federation: finetune_steps from the final global model (with the client's
        own local parameters), constant learning rate, at the client's rank (``_rank_hooks``); saved in global
        units, so ``fedtune export --finetuned`` can write it."""
        cfg = self.client.model_copy(
            update={
                "local_steps": self.cfg.finetune_steps,
                "local_epochs": None,
                "lr_scheduler_type": "constant",
                "warmup_steps": 0,
                "warmup_ratio": 0.0,
                "straggler_fraction": 0.0,
            }
        )
        rank, rslora = self._rank(instr)
        hooks = LocalHooks() if rank is None else self.ranks.at_rank(task, view, instr.params, rank, rslora=rslora)
        meta: dict = {}
        try:
            with self.own_local(task.module, instr.client_id, before=instr.round + 1, train=True) as local:
                run = LocalRun(derive_seed(self.seed, "finetune"), instr.round, instr.client_id)
                local_train(task, train_examples, cfg, run, hooks=LocalHooks(grad_hooks=hooks.grad_hooks))
                sums = evaluate(examples)  # the rank-r_k model, scaled by alpha / r_k
                params = view.read()
                if hooks.finish:  # a rank below the adapter's: back to global units (zero beyond r_k)
                    params = from_client_rank(params, lora_pairs(view.spec), rank, rslora=rslora)
                    meta = {"lora_rank": rank, "lora_rslora": rslora}
                arrays = {"params": params} | {
                    LOCAL_PREFIX + n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in local.items()
                }
        finally:
            for cleanup in hooks.cleanup:  # the layers' global scaling back
                cleanup()
        self.store.save(instr.client_id, NS_FINETUNED, ClientState(arrays, meta), round=instr.round)
        view.write(instr.params)
        return sums

    def _rank(self, instr: EvalInstruction) -> tuple[int | None, bool]:
        """The rank this client fine-tunes at: the server's (``lora/client_rank``), its own, its pruned one."""
        offered, rslora = _int_extra(instr, CLIENT_RANK_EXTRA), _int_extra(instr, CLIENT_RSLORA_EXTRA)
        return self.ranks.rank_for(instr.client_id, offered), self.ranks.own_rslora if rslora is None else bool(rslora)


def _int_extra(instr: EvalInstruction, key: str) -> int | None:
    value = instr.extras.get(key)
    return None if value is None else int(np.asarray(value).reshape(-1)[0])


def _write(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(values[name].to(device=param.device, dtype=param.dtype))


def _tensors(flat: np.ndarray, view: TrainableView) -> list[torch.Tensor]:
    """Per-parameter float32 copies of a flat vector laid out like ``view`` (Ditto's anchor w)."""
    return [
        torch.from_numpy(np.array(flat[start:stop], dtype=np.float32)).view(shape).to(param.device)
        for (_, start, stop, shape), param in zip(view.spec.offsets(), view.params, strict=True)
    ]
