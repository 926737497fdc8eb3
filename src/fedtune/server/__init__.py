"""The coordinator: strategies (pure state transitions) and the round loop."""
