"""Round-record fields for personalisation: each client's personalised metric beside the global model's.

Clients evaluate the global model and their own models on the same held-out examples (``ClientEval.personal``);
the round line gets, per variant ("personal", "finetuned"), the pooled metrics (``eval_personal_accuracy``,
as ``eval_accuracy`` is pooled) and the mean over clients of each client's own metric
(``eval_personal_client_mean_accuracy``, what personalisation papers report), with the global model's
client mean beside it (``eval_client_mean_accuracy``); each ``eval_client`` line gets ``personal_accuracy``...

>>> from fedtune.tasks.base import EvalSums
>>> glob = {"a": EvalSums(4.0, 4, 1, 4), "b": EvalSums(2.0, 2, 2, 2)}
>>> own = {"personal": {"a": EvalSums(2.0, 4, 3, 4), "b": EvalSums(1.0, 2, 2, 2)}}
>>> summary = personal_summary(glob, own, accuracy=True)
>>> summary["eval_client_mean_accuracy"], summary["eval_personal_client_mean_accuracy"]
(0.625, 0.875)
>>> personal_client(own, "a", accuracy=True)
{'personal_loss': 0.5, 'personal_accuracy': 0.75}
"""

from __future__ import annotations

from collections.abc import Mapping

from fedtune.tasks.base import EvalSums


def _client_mean(per_client: Mapping[str, EvalSums], accuracy: bool) -> dict[str, float]:
    metrics = [s.metrics(accuracy=accuracy) for s in per_client.values() if s.count]
    if not metrics:
        return {}
    return {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}


def personal_summary(
    global_clients: Mapping[str, EvalSums], personal: Mapping[str, Mapping[str, EvalSums]], accuracy: bool
) -> dict[str, float]:
    """The round line's personalisation fields (empty without personalisation)."""
    if not personal:
        return {}
    out = {f"eval_client_mean_{k}": v for k, v in _client_mean(global_clients, accuracy).items()}
    for variant, per_client in personal.items():
        pooled = sum(per_client.values(), EvalSums())
        out.update({f"eval_{variant}_{k}": v for k, v in pooled.metrics(accuracy=accuracy).items()})
        out.update({f"eval_{variant}_client_mean_{k}": v for k, v in _client_mean(per_client, accuracy).items()})
    return out


def personal_client(personal: Mapping[str, Mapping[str, EvalSums]], client_id: str, accuracy: bool) -> dict:
    """One ``eval_client`` line's fields: ``<variant>_loss``, ``<variant>_accuracy`` (or perplexity)."""
    out: dict[str, float] = {}
    for variant, per_client in personal.items():
        if client_id in per_client:
            out.update({f"{variant}_{k}": v for k, v in per_client[client_id].metrics(accuracy=accuracy).items()})
    return out
