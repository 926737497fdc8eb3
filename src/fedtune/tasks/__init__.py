"""Tasks: a model plus how to encode records, compute a training loss, and evaluate."""
