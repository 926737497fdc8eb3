"""Aggregation math: pure functions over flat float32 buffers. No torch.nn, no transport, no peft."""

from fedtune.aggregation.fedavg import WeightedMean, client_weights, fold_weighted_mean

__all__ = ["WeightedMean", "client_weights", "fold_weighted_mean"]
