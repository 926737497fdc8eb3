"""``fedtune predict``: the federated classifier of a run directory on new text (label and probabilities).

Label names come from ``labels.json``, which a simulated run writes next to its checkpoint (the data's label
names, e.g. the sorted distinct strings of a CSV's label column); without it, labels are class ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import CheckpointError, ModelError

LABELS = "labels.json"


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str  # the name of the most probable class (or its id)
    probabilities: dict[str, float]  # every class, by name (or id)


def write_label_names(run_dir: Path, names: Sequence[str]) -> None:
    if names:
        (Path(run_dir) / LABELS).write_text(json.dumps(list(names)))


def read_label_names(run_dir: Path, num_labels: int) -> list[str]:
    """The run's label names, or the class ids as strings."""
    path = Path(run_dir) / LABELS
    if path.is_file():
        try:
            names = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from None
        if isinstance(names, list) and len(names) == num_labels:
            return [str(n) for n in names]
    return [str(i) for i in range(num_labels)]


def predict(run_dir: Path, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]:
    from fedtune.run.artifacts import load_trained_task
    from fedtune.tasks.classification import ClassificationTask

    task, _ = load_trained_task(run_dir)
    if not isinstance(task, ClassificationTask):
        raise ModelError(f"predict needs a text classifier (model.kind classification); this run trained a {task.kind}")
    names = read_label_names(run_dir, task.num_labels)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        for text, row in zip(chunk, task.predict_proba(chunk).tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(text, names[best], dict(zip(names, row, strict=True))))
    return out
