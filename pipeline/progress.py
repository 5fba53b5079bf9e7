"""One console and a small progress bar (rich) shared by every stage and command."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True, highlight=False)


class Progress:
    """`with ctx.progress(total, "encode") as bar: bar.advance(n)`; silent when not a terminal."""

    def __init__(self, total: int, desc: str, *, disable: bool = False) -> None:
        show = not disable and (sys.stderr.isatty() or os.environ.get("RYNN_PROGRESS") == "1")
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, disable=not show, transient=False)
        self._task = self._bar.add_task(desc, total=total)

    def __enter__(self) -> "Progress":
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)
