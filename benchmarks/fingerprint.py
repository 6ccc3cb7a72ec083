"""What a benchmark row was measured on: the sources its run imports and the library versions, as one hash.

A timing row (``results.json``) or a memory row (``memory.json``) is evidence about the code it
ran on, as a parity row is. Each row records :func:`row_fingerprint` when it is measured; a row
whose recorded fingerprint differs from today's is *stale*: the code it timed, the code that timed
it, or a library changed since, and its numbers describe that older code
(``python -m benchmarks --stale --list`` names such rows, ``python -m benchmarks --stale`` measures
them again).

The sources are found from the imports, with ``parity.fingerprint``'s rules (a file counts by its
code, not its comments or docstrings; the model registry's own file counts, not every family it
imports): the static import closure of the module that measures the row (``benchmarks.suite`` for
timings, ``benchmarks.memory`` for peaks), followed into ``fedjax_users``, ``benchmarks`` and
``parity`` (whose ``reference`` builds breaching's side), plus the module that defines the row's
Flax model.

Example::

    >>> sources = row_sources(SUITE, "lenet_zhu")
    >>> "fedjax_users/users.py" in sources and "benchmarks/timing.py" in sources
    True
    >>> "fedjax_users/models/vgg.py" in sources
    False
    >>> len(row_fingerprint(SUITE, "lenet_zhu", library_versions={}))
    16
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from parity import fingerprint

__all__ = ["SUITE", "MEMORY", "row_sources", "row_fingerprint", "stale", "freshness_line"]

SUITE = "benchmarks.suite"
MEMORY = "benchmarks.memory"
PACKAGES = ("fedjax_users", "benchmarks", "parity")
# Followed no further than their own files: the model registry (as for parity rows), and this
# module, which the runners import to stamp rows but which measures nothing (following it would
# make every benchmark row depend on the parity grid's case list).
REGISTRIES = fingerprint.REGISTRIES + ("benchmarks.fingerprint",)
# The libraries a timing depends on (transformers is not used by the benchmark models).
LIBRARIES = ("jax", "jaxlib", "flax", "numpy", "torch", "breaching")
# The benchmarks build their models at CIFAR's size (benchmarks.problems); the class does not depend on it.
_NUM_CLASSES, _NUM_CHANNELS = 10, 3


def _model_module(model: str) -> str:
    from fedjax_users import models

    return type(models.get(model, num_classes=_NUM_CLASSES, num_channels=_NUM_CHANNELS)).__module__


def row_sources(runner: str, model: str) -> list[str]:
    """Every source file a row of ``runner`` (:data:`SUITE` or :data:`MEMORY`) on ``model`` depends on, sorted.

    Args:
      runner: the module that measures the row.
      model: the row's model name (``fedjax_users.models.get``'s).

    Returns:
      Repository-relative paths.
    """
    return sorted(fingerprint.source_closure((runner, _model_module(model)), REGISTRIES, PACKAGES))


def row_fingerprint(runner: str, model: str, library_versions: Optional[Mapping[str, str]] = None) -> str:
    """A 16-hex-digit hash of :func:`row_sources` and the installed versions of :data:`LIBRARIES`.

    Args:
      runner: the module that measures the row (:data:`SUITE` or :data:`MEMORY`).
      model: the row's model name.
      library_versions: versions to hash instead of the installed ones.

    Returns:
      The fingerprint a row measured on today's code records.
    """
    if library_versions is None:
        library_versions = fingerprint.versions(LIBRARIES)
    return fingerprint.hash_sources(row_sources(runner, model), library_versions)


def stale(rows: Iterable[dict], runner: str) -> list[dict]:
    """The rows whose recorded ``fingerprint`` is not today's (a row without one counts as stale).

    Args:
      rows: timing rows of ``results.json`` or memory rows of ``memory.json``.
      runner: the module that measured them.

    Returns:
      The stale rows, in order.
    """
    today: dict[str, str] = {}
    found = []
    for row in rows:
        model = row["model"]
        if model not in today:
            today[model] = row_fingerprint(runner, model)
        if row.get("fingerprint") != today[model]:
            found.append(row)
    return found


def freshness_line(rows: list[dict], runner: str, what: str) -> str:
    """``N of M <what> measured on today's code`` for ``rows`` measured by ``runner``."""
    old = len(stale(rows, runner))
    return (f"{len(rows) - old} of {len(rows)} {what} measured on today's code (fingerprint matches); "
            f"{old} stale (python -m benchmarks --stale measures them again)")
