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


class ClientStateLost(UpdateRejected):
    """The server's instruction relies on client state this client does not hold (its state store was wiped, or
    is another run's): e.g. LoRA residual increments from a version it has no copy of. The client's failure
    says so (``ClientFailure.cause``), so the server can send it what it lost instead of the increments."""


class CheckpointError(FedtuneError):
    """A checkpoint or run directory is missing, corrupt, or from an incompatible run."""


class NoRoundCompleted(FedtuneError):
    """A run ran rounds and none of them changed the model (every client failed, or every aggregate was
    rejected): the command exits with EXIT_NO_ROUND, not the configuration error's status."""


# Exit statuses of the commands (docs/DEPLOYMENT.md): 0 success, 1 a participant's federation ended in error,
# 2 bad configuration, data or certificates, 3 a participant that cannot connect or is refused, 4 a run that
# started but in which no round could be completed (a script can tell "fix the config" from "the federation
# ran and failed").
EXIT_CONFIG = 2
EXIT_NO_ROUND = 4


def exit_status(err: FedtuneError) -> int:
    """The command's exit status for an error that ends it."""
    return EXIT_NO_ROUND if isinstance(err, NoRoundCompleted) else EXIT_CONFIG


class DataWarning(UserWarning):
    """Data was left out (a client without held-out data, examples truncated away, clients dropped); the
    message gives the counts. Run with ``-W error::fedtune.errors.DataWarning`` to make it fatal."""
