"""Run directories: resolved config, metrics, plots, checkpoints, export and generation."""
