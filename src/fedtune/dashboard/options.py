"""``--dashboard [PORT]``: an option whose value may be left out (``fedtune run CONFIG --dashboard``).

Typer's own parser (a vendored click, without click's ``is_flag=False, flag_value=...``) always takes the next
argument as an option's value. ``OptionalValueCommand`` gives ``--dashboard`` its default port when what
follows is not a port number (nothing, another option, or CONFIG), before the parser sees the arguments, so
``--dashboard``, ``--dashboard 8800`` and ``--dashboard=8800`` all work. ``--dashboard-port N`` (the older
spelling) stays as an alias of ``--dashboard N``. (A CONFIG file named only by digits would read as a port
after ``--dashboard``: put it first, or write ``--dashboard=PORT``.)
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

DEFAULT_PORT = 8765
OPTION = "--dashboard"
_PORT = re.compile(r"\d{1,5}")

DashboardOpt = Annotated[
    int | None,
    typer.Option(
        OPTION,
        metavar="[PORT]",
        help=f"Serve a live dashboard of the run on PORT (default {DEFAULT_PORT}; 0: any free port). "
        "The URL, with its access token, is printed at start.",
    ),
]
DashboardPortOpt = Annotated[
    int | None, typer.Option("--dashboard-port", help="Same as --dashboard PORT (the older spelling).")
]


def with_default_port(args: list[str]) -> list[str]:
    """``--dashboard`` not followed by a port number becomes ``--dashboard=DEFAULT_PORT``."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":  # what follows is arguments, not options
            return out + args[i:]
        following = args[i + 1] if i + 1 < len(args) else None
        if arg == OPTION and (following is None or not _PORT.fullmatch(following)):
            out.append(f"{OPTION}={DEFAULT_PORT}")
        else:
            out.append(arg)
    return out


class OptionalValueCommand(TyperCommand):
    """A command whose ``--dashboard`` value is optional (see the module's docstring)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_default_port(args))


def dashboard_port(dashboard: int | None, alias: int | None) -> int | None:
    """The port to serve the dashboard on, or None for no dashboard. ``--dashboard-port`` wins if both are given
    (``--dashboard --dashboard-port 0``, as earlier versions were called)."""
    return alias if alias is not None else dashboard
