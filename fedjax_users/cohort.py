"""Cohorts: users whose examples are read on demand, so that memory follows a chunk of users, not the cohort.

``fu.aggregate`` takes either every user's examples stacked in memory (``UserData`` with a leading
users axis) or a ``Cohort``: the number of users and a way to read one user's examples. With a
cohort, ``aggregate`` reads the users of each chunk (the chunks the strategy already runs) in
background threads while the previous chunk computes, through Grain (Google's data loader for
JAX: ordered, threaded prefetch, and an iterator whose state can be saved and restored, which is
what a resumable run needs). The result is bit for bit that of the same users in memory.

``ArrayCohort`` wraps arrays already in memory; ``FunctionCohort`` reads user ``i`` with any
function (``fedjax_users.data`` builds one for a case's dataset, decoding images only when their
user's chunk comes). On several processes each reads only the users of its own devices.

Example::

    >>> import numpy as np
    >>> from fedjax_users.cohort import ArrayCohort, FunctionCohort
    >>> cohort = FunctionCohort(1000, lambda i: (np.full((2, 4), i, np.float32), np.array([i % 10, 0])))
    >>> inputs, labels = cohort.load([3, 999])
    >>> inputs.shape, labels[:, 0].tolist(), len(cohort)
    ((2, 2, 4), [3, 9], 1000)
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Sequence

import numpy as np

from fedjax_users.types import UserData

__all__ = ["ArrayCohort", "Cohort", "FunctionCohort", "LoadUser"]

# position -> (that user's inputs [examples, ...], labels [examples, ...]), as NumPy arrays.
LoadUser = Callable[[int], tuple[np.ndarray, np.ndarray]]


class Cohort(abc.ABC):
    """The users of an aggregate, numbered 0 to ``len(cohort) - 1``, each read when needed.

    A subclass says how many users there are (``__len__``) and how to read one (``load_user``).
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of users."""

    @abc.abstractmethod
    def load_user(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """One user's examples.

        Args:
          position: the user, ``0 <= position < len(self)``.

        Returns:
          ``(inputs, labels)`` as NumPy arrays, each with a leading examples axis.
        """

    def load(self, positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Several users' examples, stacked.

        Args:
          positions: the users, in order (repeats allowed).

        Returns:
          ``(inputs, labels)`` with a leading users axis, then the examples axis.

        Example::

            >>> import numpy as np
            >>> cohort = ArrayCohort(np.arange(12.0).reshape(3, 2, 2), np.zeros((3, 2), np.int64))
            >>> cohort.load([2, 0])[0][:, 0, 0].tolist()
            [8.0, 0.0]
        """
        users = [self.load_user(int(p)) for p in positions]
        return np.stack([x for x, _ in users]), np.stack([y for _, y in users])

    def first(self) -> UserData:
        """User 0 alone, with a users axis of one: what shapes and dtypes are checked on.

        Returns:
          A ``UserData`` whose ``inputs`` and ``labels`` are ``[1, examples, ...]``.
        """
        inputs, labels = self.load([0])
        return UserData(inputs=inputs, labels=labels)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayCohort(Cohort):
    """Users already in memory.

    Attributes:
      inputs: every user's inputs, ``[users, examples, ...]``.
      labels: their labels, ``[users, examples, ...]``.
    """

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.inputs)[0])

    def load_user(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.inputs[position]), np.asarray(self.labels[position])


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionCohort(Cohort):
    """Users read by a function, one at a time.

    Attributes:
      num_users: the number of users.
      load_one: ``load_one(i)`` reads user ``i``'s ``(inputs, labels)``; called from background
        threads, so it must be safe to call concurrently.
    """

    num_users: int
    load_one: LoadUser

    def __len__(self) -> int:
        return self.num_users

    def load_user(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= position < self.num_users:
            raise IndexError(f"user {position} is outside the cohort's {self.num_users} users")
        inputs, labels = self.load_one(position)
        return np.asarray(inputs), np.asarray(labels)
