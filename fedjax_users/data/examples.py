"""``Examples``: one split of a dataset, its labels, and how its stored examples become model inputs.

Its own module so that every reader (``sources`` for the image datasets, ``text``, ``tff`` and
``glue`` for the text ones) builds it without importing the module that dispatches to them.
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

    ``given``: a dataset's own users (breaching's ``partition: given``; wikitext's articles), user
    index -> that user's examples. ``collate``: what breaching's collate function does to each
    batch a user takes, ``(inputs, seed) -> (inputs, labels)`` (masked-lm masking), else ``None``.
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
        """The first ``size`` examples (breaching's ``cfg_data.size`` cut)."""
        return dataclasses.replace(self, stored=self.stored[:size], labels=self.labels[:size])

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded inputs and labels of the examples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return self.decode(self.stored[indices]), self.labels[indices]
