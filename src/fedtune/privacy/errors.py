"""Typed privacy errors."""

from __future__ import annotations

from fedtune.errors import FedtuneError


class PrivacyError(FedtuneError):
    """A privacy mechanism cannot give its guarantee (bad setup, missing per-sample gradient, ...)."""


class SecAggAbort(PrivacyError):
    """A secure-aggregation round stopped without a result (too many dropouts, a failed check)."""


class TamperingDetected(SecAggAbort):
    """A ciphertext or secret share failed authentication or verification; names the suspect."""

    def __init__(self, message: str, *, suspect: str | None = None) -> None:
        super().__init__(message)
        self.suspect = suspect
