"""``Examples``: one split of a dataset, its labels, and how its stored examples become model inputs.

Its own module so that every reader (``sources`` for the image datasets, ``text``, ``tff`` and
``glue`` for the text ones) builds it without importing the module that dispatches to them.

Example::

    >>> import numpy as np
    >>> from fedjax_users.data.examples import Examples
    >>> digits = Examples(stored=np.arange(6).reshape(3, 2), labels=np.array([7, 8, 9]), num_classes=10,
    ...                   decode=lambda stored: stored / 10)
    >>> inputs, labels = digits.take([2, 0])
    >>> inputs.tolist(), labels.tolist(), len(digits.head(2))
    ([[0.4, 0.5], [0.0, 0.1]], [9, 7], 2)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["Examples"]


def _identity(stored: np.ndarray) -> np.ndarray:
    return stored


@dataclasses.dataclass(frozen=True)
class Examples:
    """One dataset split: stored inputs, labels, and the decoder from stored form to model inputs.

    Attributes:
      stored: the examples as stored (image bytes, file paths, token ids), one per row.
      labels: one label per example (a class, or token ids for language modelling).
      num_classes: the classes (the vocabulary size for text).
      decode: stored rows -> model inputs, applied only to the examples taken.
      given: a dataset's own users (breaching's ``partition: given``; wikitext's articles), user
        index -> that user's examples; ``None`` for datasets partitioned by ``data.partition``.
      collate: what breaching's collate function does to each batch a user takes,
        ``(inputs, seed) -> (inputs, labels)`` (masked-lm masking), else ``None``.
    """

    stored: np.ndarray
    labels: np.ndarray
    num_classes: int
    decode: Callable[[np.ndarray], np.ndarray] = _identity
    given: Optional[Callable[[int], "Examples"]] = None
    collate: Optional[Callable[[np.ndarray, Sequence[int]], tuple[np.ndarray, np.ndarray]]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, size: int) -> "Examples":
        """The first examples (breaching's ``cfg_data.size`` cut).

        Args:
          size: how many to keep.

        Returns:
          A copy holding the first ``size`` stored examples and labels (decoder and users kept).
        """
        return dataclasses.replace(self, stored=self.stored[:size], labels=self.labels[:size])

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded inputs and labels of some examples.

        Args:
          indices: the examples, in the order wanted (repeats allowed).

        Returns:
          ``(inputs, labels)``: ``decode`` of their stored rows, and their labels.
        """
        indices = np.asarray(indices, dtype=np.int64)
        return self.decode(self.stored[indices]), self.labels[indices]
