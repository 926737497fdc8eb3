"""Ctrl-C during a run: what was kept, and the command that continues it."""

from __future__ import annotations

from pathlib import Path

from fedtune.core.state import load_state
from fedtune.run import rundir


class RunInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that knows its run directory and the last round its checkpoint holds."""

    def __init__(self, run_dir: Path | None, completed_round: int) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir
        self.completed_round = completed_round

    @classmethod
    def of(cls, run_dir: Path | None) -> RunInterrupted:
        checkpoint = Path(run_dir) / rundir.CHECKPOINT if run_dir is not None else None
        try:
            done = load_state(checkpoint).round if checkpoint is not None and checkpoint.is_file() else 0
        except Exception:  # a checkpoint torn by the interrupt itself: nothing to resume from
            done = 0
        return cls(run_dir, done)

    def hint(self) -> str:
        if self.run_dir is not None and self.completed_round > 0:
            return (
                f"interrupted after round {self.completed_round}; continue with `fedtune run --resume {self.run_dir}`"
            )
        where = f" ({self.run_dir} holds no checkpoint)" if self.run_dir is not None else ""
        return f"interrupted before the first round finished{where}; start again with `fedtune run CONFIG`"
