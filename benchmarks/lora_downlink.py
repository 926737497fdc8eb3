"""Downlink bytes a round of the exact LoRA modes (fedex, svd) against naive averaging, per sampled client.

SmolLM2-135M's architecture (hidden 576, 9 query / 3 key-value heads of 64, 30 blocks) with random weights,
and the demo's adapter (r = 8 on q/k/v/o of the top 8 blocks: 245,760 float32 values); K clients a round,
each with a random update (bytes do not depend on the values). One round of the real FedOpt + FedExLora /
SvdLora strategies; the columns are raw float32 array bytes of what one client receives for its fit:

* naive: the global adapter;
* dense residual (today): the adapter plus every module's (out, in) residual R, as the fit payload holds it;
* factored increment: the adapter plus this round's residual increment dR as two thin factors of rank
  (K - 1) r (``fedex_increment_factors`` / ``svd_tail_factors``), or dense where that is smaller, for a
  participant that holds last round's R;
* lower bound: any exact encoding of a generic rank-(K - 1) r increment needs (K - 1) r (out + in - (K - 1) r)
  numbers a module (its degrees of freedom), so no exact scheme can beat this column.

    nice -n 10 .venv/bin/python benchmarks/lora_downlink.py --clients 2 4 20
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_bytes_section
from _workloads import smollm2_config

from fedtune.aggregation.lora import (
    factored_is_smaller,
    fedex_increment_factors,
    lora_pairs,
    product_mean,
    svd_tail_factors,
)
from fedtune.client.weights import TrainableView
from fedtune.config.schema import LoraConfig
from fedtune.core.messages import ClientUpdate
from fedtune.models.lora import apply_lora
from fedtune.server.strategies import FedExLora, FedOpt, SvdLora

MB = 1e6


def smollm2_adapter() -> tuple[np.ndarray, object]:
    """(trainable vector, spec) of the demo's LoRA on a random-weight SmolLM2-135M."""
    from transformers import LlamaForCausalLM

    config = smollm2_config()
    torch.manual_seed(0)
    model = apply_lora(
        LlamaForCausalLM(config),
        LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], top_layers=8),
        task_type="causal_lm",
    )
    view = TrainableView(model)
    return view.read(), view.spec


def one_round(plugin, params, spec, k: int) -> dict[str, float]:
    """Bytes one client receives for the next fit, each way, after one round of ``k`` random updates."""
    strategy = FedOpt(plugins=[plugin])
    state = strategy.init_state(params, spec)
    rng = np.random.default_rng(k)
    updates = [
        ClientUpdate(f"c{i}", 1, 10 + i, rng.normal(0, 0.01, spec.numel).astype(np.float32), spec.digest)
        for i in range(k)
    ]
    new_state, _ = strategy.aggregate(state, updates)
    dense_arrays = strategy.eval_payload(new_state)  # no client named: the dense residual, as sent before increments
    adapter = new_state.params.nbytes
    factored = bound = 0
    for pair in lora_pairs(spec):
        factors = [pair.factors(state.params + u.delta) for u in updates]
        weights = [float(u.num_examples) for u in updates]
        if plugin.name == "fedex":
            b_d, a_d = fedex_increment_factors(factors, weights)
        else:
            b_d, a_d = svd_tail_factors(product_mean(factors, weights), pair.rank, bound=k * pair.rank)
        m, dense = a_d.shape[0], pair.out_features * pair.in_features
        thin = factored_is_smaller(m, pair.out_features, pair.in_features)
        factored += 4 * (b_d.size + a_d.size if thin else dense)
        bound += 4 * min(dense, m * (pair.out_features + pair.in_features - m))
    dense_residual = sum(v.nbytes for v in dense_arrays.values())
    return {
        "naive": adapter,
        "dense": adapter + dense_residual,
        "factored": adapter + factored,
        "bound": adapter + bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 20], help="clients a round (K)")
    parser.add_argument("--write", action="store_true", help="replace the docs/BENCHMARKS.md section")
    args = parser.parse_args()
    params, spec = smollm2_adapter()
    load = [os.getloadavg()[0]]
    rows = [
        "| K | mode | naive MB | dense residual MB (x naive) | factored increment MB (x naive) "
        "| lower bound MB (x naive) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in args.clients:
        for plugin in (FedExLora(), SvdLora()):
            b = one_round(plugin, params, spec, k)
            cells = [f"{b[c] / MB:.2f} ({b[c] / b['naive']:.1f}x)" for c in ("dense", "factored", "bound")]
            rows.append(f"| {k} | {plugin.name} | {b['naive'] / MB:.2f} | " + " | ".join(cells) + " |")
            load.append(os.getloadavg()[0])
    table = "\n".join(rows)
    print(table)
    if args.write:
        clients = " ".join(map(str, args.clients))
        command = f"nice -n 10 .venv/bin/python benchmarks/lora_downlink.py --clients {clients} --write"
        write_bytes_section("Downlink of the exact LoRA modes", command, __doc__, table, load)


if __name__ == "__main__":
    main()
