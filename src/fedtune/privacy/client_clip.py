"""The client half of DP-FedAvg: clip the whole update to the server's current C (an update transform).

Runs last among the update transforms, so what leaves the client is what is bounded. With adaptive
clipping it also attaches the bit b_k = [norm <= C] (Andrew et al. 2021) as ``extras["dp_unclipped"]``;
the server only ever uses the noised sum of these bits. The pre-clip norm itself is not reported.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedtune.aggregation.clip import clip_l2
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.privacy.dp_fedavg import UNCLIPPED
from fedtune.privacy.errors import PrivacyError


def dp_clip_transform(update: ClientUpdate, instr: FitInstruction) -> ClientUpdate:
    clip = instr.options.get("dp_clip")
    if clip is None:
        raise PrivacyError(
            "privacy.dp is on for this client but the server sent no clip norm (options['dp_clip']): "
            "server and client must run the same privacy configuration"
        )
    delta, norm = clip_l2(update.delta, float(clip))
    extras = dict(update.extras)
    if instr.options.get("dp_adaptive"):
        extras[UNCLIPPED] = np.array([1.0 if norm <= float(clip) else 0.0], dtype=np.float32)
    return replace(update, delta=delta, extras=extras)
