"""Progress of a long run on standard error: stages with their time, counts with rate and ETA.

``aggregate(..., progress=fn)`` calls ``fn(done, total)`` on the host after each chunk of users;
``fedjax-users run`` also reports its stages (building the users, each query). ``Progress`` draws
both with rich (already installed with flax), and draws nothing when standard error is not a
terminal (a CI log, a pipe) or when asked to be quiet: a file then holds only the run's summary.
Finished lines are removed, so what stays on the screen is the summary the command prints.

Example::

    >>> from fedjax_users.progress import Progress
    >>> with Progress(quiet=True) as progress:
    ...     report = progress.counter("users")
    ...     for done in range(0, 11, 5):
    ...         report(done, 10)
    ...     with progress.stage("compiling"):
    ...         pass
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress

__all__ = ["Progress", "ProgressFn"]

ProgressFn = Callable[[int, int], None]


class Progress:
    """Stages and counters of one run, drawn on standard error while the ``with`` block runs.

    Args:
      quiet: draw nothing.
      console: where to draw (default: standard error); nothing is drawn unless it is a terminal.
    """

    def __init__(self, quiet: bool = False, console: Optional[Console] = None) -> None:
        console = console if console is not None else Console(stderr=True)
        self.enabled = not quiet and console.is_terminal
        self._bars = _RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not self.enabled,
        )

    def __enter__(self) -> "Progress":
        self._bars.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._bars.stop()

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        """A step of unknown length (loading data, compiling): its name and the time it has taken.

        Args:
          description: what the step does, drawn while the ``with`` block runs.

        Example::

            >>> with Progress(quiet=True) as progress, progress.stage("building the users"):
            ...     pass
        """
        task = self._bars.add_task(description, total=None, rate="")
        try:
            yield
        finally:
            self._bars.remove_task(task)

    def counter(self, description: str, unit: str = "users") -> ProgressFn:
        """A ``(done, total)`` callback (``aggregate``'s ``progress=``) drawn as a bar with rate and ETA.

        Args:
          description: the bar's name.
          unit: what is counted, in the rate (``"users/s"``).

        Returns:
          ``report(done, total)``; the bar is removed once ``done`` reaches ``total``.

        Example::

            >>> with Progress(quiet=True) as progress:
            ...     report = progress.counter("users")
            ...     report(5, 10)
            ...     report(10, 10)
        """
        task: Optional[TaskID] = None

        def report(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = self._bars.add_task(description, total=total, rate="")
            self._bars.update(task, completed=done, total=total)
            speed = next(t.speed for t in self._bars.tasks if t.id == task)
            self._bars.update(task, rate=f"{speed:.3g} {unit}/s" if speed else "")
            if done >= total:
                self._bars.remove_task(task)
                task = None

        return report
