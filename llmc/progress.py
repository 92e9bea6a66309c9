"""Progress display for long CLI steps (loading, import, passes, compilation), on stderr.

`Stages` shows one bar over the announced stages with the current stage's name and
the elapsed time; `NoProgress` is the silent stand-in used by the Python API and tests.
"""

from __future__ import annotations

import time
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Reporter(Protocol):
    def stage(self, description: str) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def stage(self, description: str) -> None:
        pass

    def finish(self) -> None:
        pass


class Stages:
    def __init__(self, title: str, total: int):
        self.console = Console(stderr=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self.title = title
        self.task = self.progress.add_task(title, total=total)
        self.started = time.perf_counter()
        self.stage_started = self.started
        self.current: str | None = None
        self.progress.start()

    def stage(self, description: str) -> None:
        self._close_stage()
        self.current = description
        self.stage_started = time.perf_counter()
        self.progress.update(self.task, description=f"{self.title}: {description}")

    def _close_stage(self) -> None:
        if self.current is not None:
            seconds = time.perf_counter() - self.stage_started
            self.progress.console.print(f"  {self.current} [dim]({seconds:.1f} s)[/dim]")
            self.progress.advance(self.task)

    def finish(self) -> None:
        self._close_stage()
        self.current = None
        self.progress.update(self.task, description=f"{self.title}: done")
        self.progress.stop()
