"""Who is calling: the CN of the verified TLS client certificate, checked against the allow list and the
revocation list on every call.

gRPC's TLS layer has already verified the certificate chain against ``deployment.tls_ca`` before any
handler runs (``require_client_auth``), so a client without a certificate from the federation's CA never
gets this far. What is left is policy: the CN is the client's identity (a name in a message is never
trusted), and a revoked CN or serial number is refused even though its certificate is still valid.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from fedtune.errors import FedtuneError

log = logging.getLogger("fedtune.server")


class AuthError(FedtuneError):
    """A caller that may not take part: no certificate CN, not on the allow list, or revoked."""

    def __init__(
        self, message: str, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED, client_id: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.client_id = client_id  # the certificate's CN, when there is one (for the dashboard's refusals)


class RevocationListError(FedtuneError):
    """A revocation list that cannot be read or has a malformed line (the message names the line)."""


_MAX_CN = 64  # X.509's upper bound for a common name (RFC 5280 ub-common-name)


def read_revocations(path: Path) -> tuple[frozenset[str], frozenset[int]]:
    """(revoked CNs, revoked serial numbers) from a revocation list: one CN or ``serial:<hex>`` a line,
    ``#`` starts a comment. A line that is neither (a bad serial, a CN with control characters or longer than
    a CN can be) raises RevocationListError naming the file and line: a list that says something other than
    what its author meant must not be half-applied."""
    names, serials = set(), set()
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except OSError as err:
        raise RevocationListError(f"cannot read revocation list {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise RevocationListError(
            f"revocation list {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.lower().startswith("serial:"):
            digits = line[7:].strip().replace(":", "")
            try:
                serial = int(digits, 16)
            except ValueError:
                serial = -1
            if serial < 0 or not digits.isalnum():
                raise RevocationListError(f"{path}:{lineno}: bad serial {line!r} (expected serial:<hex>)") from None
            serials.add(serial)
        elif len(line) > _MAX_CN or not line.isprintable():
            raise RevocationListError(
                f"{path}:{lineno}: {line[:80]!r} is not a certificate CN (at most {_MAX_CN} printable characters) "
                "nor serial:<hex>"
            )
        else:
            names.add(line)
    return frozenset(names), frozenset(serials)


@dataclass
class _Revoked:
    mtime: float = -1.0
    names: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()


class Authenticator:
    """Maps a call's TLS peer to a client id, or raises AuthError saying why not."""

    def __init__(
        self,
        *,
        allowed: Iterable[str] | None,
        revocation_list: Path | None,
        on_identified: Callable[[str], None] | None = None,
    ) -> None:
        self.allowed = None if allowed is None else frozenset(allowed)
        # told the peer (gRPC's name for the connection) of every call that passed: the connection gate
        # stops counting that connection as unauthenticated (gate.py)
        self.on_identified = on_identified
        self.revocation_list = None if revocation_list is None else Path(revocation_list)
        self._revoked = _Revoked()
        self._bad_mtime: float | None = None  # a malformed version already refused (not re-read on every call)
        self._last_error = ""
        self._lock = threading.Lock()
        if self.revocation_list is not None:
            self._reload()  # a broken list is an error at start, not at the first call

    def _reload(self) -> _Revoked:
        """The revocation list, re-read when the file changes (so revoking needs no restart). At start a bad
        list is an error; later, a list that became unreadable or malformed is logged and the last good one
        stays in force (every call goes on being checked against it) until the file is fixed."""
        assert self.revocation_list is not None
        with self._lock:
            try:
                mtime = os.stat(self.revocation_list).st_mtime
                if mtime != self._revoked.mtime and mtime != self._bad_mtime:
                    names, serials = read_revocations(self.revocation_list)
                    self._revoked = _Revoked(mtime, names, serials)
            except (OSError, RevocationListError) as err:
                if self._revoked.mtime < 0:  # never had a good list: refuse to start
                    if isinstance(err, OSError):
                        raise RevocationListError(
                            f"cannot read revocation list {self.revocation_list}: {err.strerror}"
                        ) from None
                    raise
                bad = f"{self.revocation_list}: {err.strerror}" if isinstance(err, OSError) else str(err)
                self._bad_mtime = None if isinstance(err, OSError) else mtime
                if bad != self._last_error:  # once per problem, not once per call
                    log.error("revocation list not reloaded, the previous one stays in force: %s", bad)
                    self._last_error = bad
                return self._revoked
            self._last_error = ""
            return self._revoked

    def identify(self, context: grpc.ServicerContext) -> str:
        auth = context.auth_context()
        cns = auth.get("x509_common_name") or []
        if len(cns) != 1:
            raise AuthError("no client certificate with a common name (CN)", grpc.StatusCode.UNAUTHENTICATED)
        cid = cns[0].decode("utf-8", "replace")
        if self.allowed is not None and cid not in self.allowed:
            raise AuthError(f"client {cid!r} is not in this federation's deployment.allowed_clients", client_id=cid)
        if self.revocation_list is not None:
            revoked = self._reload()
            if cid in revoked.names:
                raise AuthError(f"the certificate of client {cid!r} has been revoked", client_id=cid)
            if revoked.serials:
                pem = (auth.get("x509_pem_cert") or [b""])[0]
                serial = x509.load_pem_x509_certificate(pem).serial_number if pem else None
                if serial in revoked.serials:
                    raise AuthError(f"certificate serial {serial:x} of client {cid!r} has been revoked", client_id=cid)
        if self.on_identified is not None:
            self.on_identified(context.peer())
        return cid
