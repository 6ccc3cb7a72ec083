"""Benchmarks of fedjax_users against breaching's classes, torch.func and the plain batch gradient.

``python -m benchmarks [--quick]`` (or ``fedjax-users bench``) writes ``results.json``,
``results.md`` and ``plot.png``; see :mod:`benchmarks.cli`.
"""

from benchmarks.cli import main

__all__ = ["main"]
