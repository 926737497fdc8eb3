"""Framework-free building blocks: flat parameter buffers, seeded randomness, sampling, server state."""
