"""Progress for long work: a rich progress bar (frames, fps, ETA) on a terminal, plain log
lines every few seconds when stderr is not a terminal (CI logs, pipes)."""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger("segsynth")


class Progress:
    """Count work items; ``enabled=False`` (``--quiet``) shows nothing. Owned by one thread.
    ``initial``: items done before this run (a resumed one): counted, but not in the rate."""

    def __init__(self, description: str, total: int | None = None, *, unit: str = "frames",
                 enabled: bool = True, interval: float = 5.0, initial: int = 0) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done, self.initial, self.start = initial, initial, time.monotonic()
        self.enabled, self.interval, self._last = enabled, interval, self.start
        self._bar = self._task = None
        if enabled and sys.stderr.isatty():
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task(description, total=total, completed=initial, rate="")
            self._bar.start()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate:.1f} {self.unit}/s")
        elif self.enabled and time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        rate = self.rate
        text = f"{self.description}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}, {rate:.1f}/s"
        if self.total and rate > 0:
            text += f", ETA {max(self.total - self.done, 0) / rate:.0f} s"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
