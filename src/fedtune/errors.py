"""Typed errors. Every failure a user can cause raises one of these with a message that names the input."""


class FedtuneError(Exception):
    """Base class for errors fedtune raises on purpose."""


class ConfigError(FedtuneError):
    """The configuration is malformed, has an unknown key, a wrong type, or contradicts itself."""


class DataError(FedtuneError):
    """A data source is missing, unreadable, or yields no usable examples."""


class ModelError(FedtuneError):
    """A model cannot be found, loaded, or adapted."""


class UpdateRejected(FedtuneError):
    """A client update failed validation (shape, spec digest, non-finite values, size)."""


class CheckpointError(FedtuneError):
    """A checkpoint or run directory is missing, corrupt, or from an incompatible run."""


class NoRoundCompleted(FedtuneError):
    """A run ran rounds and none of them changed the model (every client failed, or every aggregate was
    rejected): the command exits non-zero."""


class DataWarning(UserWarning):
    """Data was left out (a client without held-out data, examples truncated away, clients dropped); the
    message gives the counts. Run with ``-W error::fedtune.errors.DataWarning`` to make it fatal."""
