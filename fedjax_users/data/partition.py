"""Which examples of a dataset belong to one user: breaching's synthetic federated partitions.

``partition_indices`` returns the same example indices, in the same order, as breaching's
``_split_dataset_vision`` for ``balanced``, ``unique-class``, ``mixup``, ``feat_est``, ``random``
and ``none``. Where the reference is ill-defined we choose, and say so:

* ``random`` builds a generator seeded 233 and then never hands it to ``torch.randperm``, so its
  "deterministic over reruns" split is in fact drawn from the global torch RNG and users' slices
  can overlap. We implement the evident intent: one permutation from a generator seeded 233,
  shared by every user, so users get disjoint slices that repeat across runs. ``torch_randperm``
  reproduces ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` bit for bit with
  numpy alone, so these are exactly the indices the fixed reference would pick.
* ``random-full`` draws an unseeded ``torch.randperm`` per user; we take a ``seed`` instead (the
  same torch-compatible permutation, seeded), fresh OS entropy if none is given.
* User indices must lie in ``[0, default_clients)``. The reference only rejects
  ``user_idx > default_clients``, letting a nonexistent client number ``default_clients`` through.
* ``mixup_freq`` is accepted because configs carry it, but the reference's selection never reads
  it (every user always gets pairs from both ends of the dataset), so neither does ours.

Example::

    >>> import numpy as np
    >>> from fedjax_users.data.partition import partition_indices
    >>> labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2])
    >>> partition_indices(labels, num_classes=3, partition="balanced", user_idx=0, default_clients=2).tolist()
    [0, 1, 6]
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from fedjax_users.data.errors import DataError

__all__ = ["PARTITIONS", "RANDOM_PARTITION_SEED", "partition_indices", "torch_randperm"]

PARTITIONS = ("balanced", "unique-class", "mixup", "feat_est", "random", "random-full", "none")
LABEL_PARTITIONS = ("balanced", "unique-class", "feat_est")
RANDOM_PARTITION_SEED = 233  # the reference's seed for ``random``
# torch switches to 64-bit draws (a different permutation) from this length on.
_TORCH_RANDPERM_32BIT_LIMIT = (2**32 - 1) // 20


@functools.lru_cache(maxsize=8)  # every user of a ``random`` split slices the same permutation
def torch_randperm(n: int, seed: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``, computed with numpy.

    Args:
      n: the length of the permutation (below torch's 32-bit limit, about 2**32 / 20).
      seed: the generator's seed.

    Returns:
      The permutation, int64 and read-only (cached: every user of a ``random`` split slices it).

    Raises:
      DataError: ``n`` at or past torch's 32-bit limit.

    Example::

        >>> torch_randperm(5, 233).tolist()  # torch.randperm(5, generator=torch.Generator().manual_seed(233))
        [1, 4, 2, 0, 3]
    """
    if n >= _TORCH_RANDPERM_32BIT_LIMIT:
        raise DataError(f"torch-compatible permutations are limited to {_TORCH_RANDPERM_32BIT_LIMIT - 1} examples")
    # Both torch's CPU generator and numpy's legacy RandomState are MT19937 seeded by init_genrand,
    # and a full-range uint32 draw is the raw generator output that torch's shuffle consumes.
    draws = np.random.RandomState(seed).randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint32)
    perm = list(range(n))
    # torch's swap-forward Fisher-Yates: position i swaps with i + (draw % remaining).
    for i, draw in enumerate(draws.tolist()):
        j = i + draw % (n - i)
        perm[i], perm[j] = perm[j], perm[i]
    result = np.asarray(perm, dtype=np.int64)
    result.flags.writeable = False  # shared through the cache
    return result


def _indices(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _balanced(labels: np.ndarray, num_classes: int, user_idx: int, default_clients: int) -> np.ndarray:
    per_class = len(labels) // num_classes // default_clients
    if per_class < 1:
        raise DataError(
            f"too many clients for a balanced partition: {len(labels)} examples, {num_classes} classes, "
            f"{default_clients} clients leave less than one example per class per client"
        )
    # Each user takes its own block of every class, class by class. A stable sort by label lists
    # every class's examples in index order, one class after the other (one pass for all classes).
    start, stop = user_idx * per_class, (user_idx + 1) * per_class
    by_class = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[by_class], np.arange(num_classes + 1), side="left")
    return _indices(np.concatenate(
        [by_class[bounds[c] : bounds[c + 1]][start:stop] for c in range(num_classes)]
    ))


def _mixup(num_examples: int, user_idx: int, default_clients: int) -> np.ndarray:
    per_user = num_examples // default_clients
    offsets = user_idx * per_user + np.arange(per_user)
    # Alternate one example from the front with its mirror image from the back.
    return _indices(np.stack([offsets, num_examples - 1 - offsets], axis=1).reshape(-1))


def _feat_est(labels: np.ndarray, user_idx: int, num_data_points: int, target_label: int) -> np.ndarray:
    of_target = np.flatnonzero(labels == target_label)
    return _indices(of_target[user_idx * num_data_points : (user_idx + 1) * num_data_points])


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0])


def partition_indices(
    labels: np.ndarray,
    num_classes: int,
    partition: str,
    user_idx: int,
    default_clients: int,
    *,
    mixup_freq: int = 2,
    num_data_points: int = 1,
    target_label: int = 0,
    seed: Optional[int] = None,
) -> np.ndarray:
    """The examples user ``user_idx`` holds under a partition (module docstring).

    Args:
      labels: one entry per example, ``[N]`` (or ``[N, T]`` for token data, which only the
        label-free partitions accept).
      num_classes: the dataset's classes.
      partition: one of ``PARTITIONS`` (breaching's ``data.partition``).
      user_idx: the user, ``0 <= user_idx < default_clients``.
      default_clients: the number of users the dataset is split into.
      mixup_freq: accepted and ignored, as the reference ignores it.
      num_data_points: ``feat_est``'s examples per user.
      target_label: ``feat_est``'s label.
      seed: seeds ``random-full`` (in ``[0, 2**32)``): give each user its own; ``None`` draws one.

    Returns:
      The example indices, int64, in the reference's order.

    Raises:
      DataError: an unknown partition, a user outside the clients, labels a label partition
        cannot read, or too many clients for ``balanced``.

    Example::

        >>> import numpy as np
        >>> labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2])
        >>> partition_indices(labels, 3, "unique-class", user_idx=2, default_clients=3).tolist()
        [6, 7, 8]
        >>> partition_indices(labels, 3, "mixup", user_idx=1, default_clients=2).tolist()  # front and back in turn
        [4, 4, 5, 3, 6, 2, 7, 1]
    """
    del mixup_freq  # see the module docstring: the reference's selection ignores it
    labels = np.asarray(labels)
    num_examples = len(labels)
    if partition not in PARTITIONS:
        raise DataError(f"unknown partition {partition!r}; known partitions: {', '.join(PARTITIONS)}")
    if default_clients < 1:
        raise DataError(f"default_clients must be >= 1, got {default_clients}")
    if not 0 <= user_idx < default_clients:
        raise DataError(
            f"user index {user_idx} is outside the dataset's {default_clients} clients "
            f"(valid: 0..{default_clients - 1})"
        )
    if partition in LABEL_PARTITIONS and labels.ndim != 1:
        raise DataError(
            f"partition {partition!r} needs one class label per example, these labels have shape "
            f"{labels.shape}; use one of: mixup, random, random-full, none"
        )

    if partition == "balanced":
        return _balanced(labels, num_classes, user_idx, default_clients)
    if partition == "unique-class":
        return _indices(np.flatnonzero(labels == user_idx))
    if partition == "mixup":
        return _mixup(num_examples, user_idx, default_clients)
    if partition == "feat_est":
        return _feat_est(labels, user_idx, num_data_points, target_label)
    if partition == "none":  # every user holds the whole dataset (a sanity check)
        return _indices(np.arange(num_examples))
    per_user = num_examples // default_clients
    if partition == "random":
        perm = torch_randperm(num_examples, RANDOM_PARTITION_SEED)
        return perm[user_idx * per_user : (user_idx + 1) * per_user].copy()
    # random-full: every user draws its own subset, so examples may repeat across users.
    return torch_randperm(num_examples, _fresh_seed() if seed is None else seed)[:per_user].copy()
