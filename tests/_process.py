"""Child processes that a test interrupts with SIGINT (Ctrl-C).

A process started in the background by a shell (``cmd &``, ``nohup``) inherits SIGINT *ignored*, and Python
installs its KeyboardInterrupt handler only where SIGINT is not ignored at start: such a child would never see
the test's Ctrl-C. ``interruptible`` gives the child the default disposition back before it execs, so the
test behaves the same however pytest itself was started."""

from __future__ import annotations

import signal


def interruptible() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: SIGINT at its default in the child (Python then turns it into
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
