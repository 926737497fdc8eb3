"""The console's table of rounds: one row printed as each round finishes (fixed-width, so rows printed one at a
time line up), and the whole table at the end (rich)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


ROUND_COLUMNS = ("round", "clients", "train loss", "held-out loss", "quality", "MB down", "MB up", "seconds")


class RoundTable:
    """Prints one row per round as it finishes, and the whole table at the end."""

    def __init__(self, console: Console, *, accuracy: bool, extra_columns: Sequence[str] = ()) -> None:
        self.console = console
        self.accuracy = accuracy
        self.extra = list(extra_columns)
        self.rows: list[list[str]] = []

    def _fmt(self, value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def add(self, rec: dict) -> None:
        quality = rec.get("eval_accuracy") if self.accuracy else rec.get("eval_perplexity")
        row = [
            str(rec["round"]),
            f"{rec.get('clients_ok', 0)}/{rec.get('clients_sampled', 0)}",
            self._fmt(rec.get("train_loss"), ".4f"),
            self._fmt(rec.get("eval_loss"), ".4f"),
            self._fmt(quality, ".4f" if self.accuracy else ".2f"),
            _mb(rec.get("bytes_down", 0)),
            _mb(rec.get("bytes_up", 0)),
            self._fmt(rec.get("seconds"), ".1f"),
        ] + [self._fmt(rec.get(k), ".3f") for k in self.extra]
        if not self.rows:
            self.console.print(self._line(self._headers("acc" if self.accuracy else "ppl")), style="bold")
        self.rows.append(row)
        self.console.print(self._line(row), soft_wrap=True)

    def _line(self, cells: Sequence[str]) -> str:
        # fixed-width columns so rows printed one at a time still line up as a table
        widths = [5, 7, 10, 13, 9, 8, 8, 8] + [11] * len(self.extra)
        return " ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    def _headers(self, quality_name: str) -> list[str]:
        return [c if c != "quality" else quality_name for c in ROUND_COLUMNS] + self.extra

    def render(self) -> Table:
        quality_name = "accuracy" if self.accuracy else "perplexity"
        table = Table(title="federated rounds")
        for header in self._headers(quality_name):
            table.add_column(header, justify="right")
        for row in self.rows:
            table.add_row(*row)
        return table
