"""Progress output: a live bar on a terminal, one line per epoch in logs and CI."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class EpochProgress:
    """Redraws a bar in place on a TTY; silent within the epoch otherwise (the trainer logs a line)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{self.total} loss {loss:.4f} {rate:.1f} it/s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


Logger = Callable[[str], None]


def print_logger(line: str) -> None:
    print(line, flush=True)
