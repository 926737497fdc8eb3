"""The live dashboard (``--dashboard``, ``fedtune dashboard RUN_DIR``)."""
