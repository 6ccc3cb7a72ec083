"""A text progress bar for runs over many users, fed by ``aggregate``'s per-chunk callback.

``aggregate(..., progress=fn)`` calls ``fn(done, total)`` on the host after each chunk of users.
``TextProgress`` turns those calls into a bar: redrawn in place on a terminal, one line per tenth
of the run elsewhere (a CI log), so that a long cohort shows it is alive without flooding a file.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Optional, TextIO

ProgressFn = Callable[[int, int], None]


def render(done: int, total: int, seconds: float, unit: str = "users", width: int = 30) -> str:
    """One line: ``[#####.....]  500/1,000 users  50%  1.2 s, about 1.2 s left``."""
    fraction = done / total if total else 1.0
    filled = int(round(width * fraction))
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} {unit} {fraction:4.0%} {seconds:6.1f} s"
    if 0 < done < total:
        line += f", about {seconds * (total - done) / done:.1f} s left"
    return line


@dataclasses.dataclass
class TextProgress:
    """A ``ProgressFn`` that draws ``render``'s bar on ``stream`` (default: standard error)."""

    label: str = ""
    unit: str = "users"
    stream: Optional[TextIO] = None
    started: Optional[float] = None
    last_tenth: int = -1

    def __call__(self, done: int, total: int) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        line = f"{self.label}{render(done, total, now - self.started, self.unit)}"
        if stream.isatty():
            stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            tenth = (10 * done) // max(total, 1)
            if tenth == self.last_tenth:
                return
            self.last_tenth = tenth
            stream.write(line + "\n")
        stream.flush()
