"""FedProx, stragglers and SCAFFOLD through the real worker, against plain NumPy/PyTorch oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedtune.client.hooks import proximal_term, straggler_budget
from fedtune.core.messages import FitInstruction
from fedtune.server.build import build_strategy
from fedtune.server.strategies.scaffold import SUM_KEY, client_key
from test_strategies_support import (
    ArrayTask,
    classification_records,
    make_config,
    make_worker,
    regression_records,
    run_federation,
    seeded,
)


def instruction(worker, config, cid="c0", round_idx=1, options=None, extras=None, params=None):
    return FitInstruction(
        cid,
        round_idx,
        worker.current_params() if params is None else params,
        worker.view.spec.digest,
        config.seed,
        config.client,
        extras or {},
        options or {},
    )


# --------------------------------------------------------------------------------------------- FedProx


def test_proximal_term_gradient_is_mu_times_distance_to_the_global_model():
    task = ArrayTask(seeded(lambda: torch.nn.Linear(3, 2)))
    worker = make_worker(task, classification_records(1, dim=3))
    config = make_config()
    instr = instruction(worker, config, options={"proximal_mu": 0.7})
    worker.view.write(instr.params)  # as the worker does before the hooks are made: the anchor is this point
    (term,) = proximal_term(task, instr, worker.view).loss_terms
    with torch.no_grad():
        for p in worker.view.params:
            p.add_(1.5)  # training moves away from the anchor
    for p in worker.view.params:
        p.grad = None
    term().backward()
    anchor = instr.params
    grads = np.concatenate([p.grad.reshape(-1).numpy() for p in worker.view.params])
    np.testing.assert_allclose(grads, 0.7 * (worker.view.read() - anchor), rtol=1e-5)
    assert proximal_term(task, instruction(worker, config), worker.view).loss_terms == []


def test_fedprox_matches_a_plain_pytorch_loop_with_the_proximal_loss():
    """Oracle: full-batch SGD on loss + mu/2 ||w - w0||^2 written directly in PyTorch."""
    records = regression_records(1)
    task = ArrayTask(seeded(lambda: torch.nn.Linear(4, 1, bias=False)), loss_kind="mse")
    worker = make_worker(task, records)
    config = make_config(client={"local_steps": 4, "full_batch": True, "lr": 0.05}, server={"proximal_mu": 0.5})
    strategy = build_strategy(config)
    w0 = worker.current_params()
    arrays, options = strategy.fit_payload(strategy.init_state(w0, worker.view.spec), "c0")
    update = worker.fit(instruction(worker, config, options=options, extras=arrays, params=w0))

    x = torch.tensor(np.stack([r[0] for r in records["c0"][0]]))
    y = torch.tensor([r[1] for r in records["c0"][0]], dtype=torch.float32)
    w = torch.tensor(w0.copy(), requires_grad=True)
    anchor = torch.tensor(w0.copy())
    for _ in range(4):
        loss = ((x @ w - y) ** 2).mean() + 0.25 * ((w - anchor) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, w)
        w = (w - 0.05 * grad).detach().requires_grad_(True)
    np.testing.assert_allclose(update.delta, w.detach().numpy() - w0, rtol=1e-4, atol=1e-6)


def test_a_straggler_sends_exactly_the_work_it_finished():
    """Oracle: the same client, same seed, with local_steps set to the straggler's budget."""
    records = classification_records(2)
    config = make_config(client={"local_steps": 6, "straggler_fraction": 1.0, "lr": 0.2})
    task = ArrayTask(seeded(lambda: torch.nn.Linear(6, 3)))
    worker = make_worker(task, records)
    w0 = worker.current_params()
    instr = instruction(worker, config, params=w0)
    budget = straggler_budget(instr)
    assert budget is not None and 1 <= budget < 6
    partial = worker.fit(instr)
    assert partial.metrics["steps"] == budget and partial.metrics["straggler"] == 1.0

    short = make_config(client={"local_steps": budget, "lr": 0.2})
    full = worker.fit(instruction(worker, short, params=w0))
    np.testing.assert_allclose(partial.delta, full.delta, rtol=1e-6, atol=1e-7)
    assert straggler_budget(instruction(worker, make_config(client={"straggler_fraction": 0.0}))) is None


def test_straggler_share_follows_the_configured_fraction():
    config = make_config(client={"local_steps": 5, "straggler_fraction": 0.3})
    task = ArrayTask(seeded(lambda: torch.nn.Linear(6, 3)))
    worker = make_worker(task, classification_records(1))
    draws = [
        straggler_budget(instruction(worker, config, cid=f"c{i}", round_idx=r)) for i in range(50) for r in (1, 2)
    ]
    share = sum(b is not None for b in draws) / len(draws)
    assert 0.2 < share < 0.4


def test_stragglers_need_local_steps():
    with pytest.raises(ValueError, match=r"straggler_fraction needs client\.local_steps"):
        make_config(client={"local_steps": None, "local_epochs": 1, "straggler_fraction": 0.5})


# --------------------------------------------------------------------------------------------- SCAFFOLD


def numpy_scaffold(records, w0, *, rounds, steps, lr, sampled, correct=True):
    """Karimireddy et al. 2020, Algorithm 1 with option II, full-batch gradients, N = all clients."""
    data = {
        cid: (np.stack([r[0] for r in tr]).astype(np.float64), np.array([r[1] for r in tr]))
        for cid, (tr, _) in records.items()
    }
    n_total = len(records)
    x, c = w0.astype(np.float64), np.zeros_like(w0, dtype=np.float64)
    c_i = {cid: np.zeros_like(x) for cid in records}
    for r in range(rounds):
        deltas, dcs, weights = [], [], []
        for cid in sampled[r]:
            xs, ys = data[cid]
            y = x.copy()
            for _ in range(steps):
                grad = 2.0 / len(ys) * xs.T @ (xs @ y - ys)  # d/dw mean (xw - y)^2
                y = y - lr * (grad - c_i[cid] + c if correct else grad)
            new_ci = c_i[cid] - c + (x - y) / (steps * lr)
            deltas.append(y - x)
            dcs.append(new_ci - c_i[cid])
            weights.append(len(ys))
            c_i[cid] = new_ci
        x = x + np.average(deltas, axis=0, weights=weights)
        c = c + np.sum(dcs, axis=0) / n_total
    return x, c, c_i


def test_scaffold_matches_a_numpy_transcription_of_the_paper():
    records = regression_records(5)
    config = make_config(
        server={"scaffold": True},
        federation={"rounds": 3, "clients_per_round": 3},
        client={"local_steps": 4, "full_batch": True, "lr": 0.02},
        eval={"every": 100},
    )
    task = ArrayTask(seeded(lambda: torch.nn.Linear(4, 1, bias=False)), loss_kind="mse")
    w0 = next(iter(task.module.parameters())).detach().reshape(-1).numpy().copy()
    state, reports, _ = run_federation(config, task, records)
    sampled = [r.sampled for r in reports]
    x, c, c_i = numpy_scaffold(records, w0, rounds=3, steps=4, lr=0.02, sampled=sampled)
    np.testing.assert_allclose(state.params, x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.arrays[SUM_KEY] / len(records), c, rtol=1e-4, atol=1e-5)
    for cid in {c for s in sampled for c in s}:
        np.testing.assert_allclose(state.arrays[client_key(cid)], c_i[cid], rtol=1e-4, atol=1e-5)
    # and the correction matters: plain FedAvg on the same rounds ends elsewhere
    plain, _, _ = numpy_scaffold(records, w0, rounds=3, steps=4, lr=0.02, sampled=sampled, correct=False)
    assert np.abs(x - plain).max() > 1e-2


def test_scaffold_needs_local_sgd():
    with pytest.raises(ValidationError, match=r"client\.optimizer"):  # refused when the config loads
        make_config(server={"scaffold": True}, client={"optimizer": "adamw"})
