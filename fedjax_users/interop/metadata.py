"""breaching's ``shared_data["metadata"]`` dict <-> :class:`fedjax_users.types.Metadata`, for any label type.

The dict: ``num_data_points``, ``labels``, ``local_hyperparams`` ({lr, steps, data_per_step,
labels: one array per step} or None), and, only for the user types that send them, ``data_key``
(multi-step users) and ``num_users`` (aggregates). The structure lives here once; what a label
becomes is the caller's: a torch tensor (:mod:`fedjax_users.interop.shared_data`) or a JSON list
(:func:`fedjax_users.io.save_shared_safetensors`). This module does not import torch.

Example::

    >>> from fedjax_users.types import Metadata
    >>> metadata_to_dict(Metadata(num_data_points=2, labels=[3, 1]), list)
    {'num_data_points': 2, 'labels': [3, 1], 'local_hyperparams': None}
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from fedjax_users.types import LocalHyperparams, Metadata

__all__ = ["OPTIONAL_KEYS", "metadata_from_dict", "metadata_to_dict"]

# Metadata keys only some user types send; absent from breaching's dict when None.
OPTIONAL_KEYS = ("data_key", "num_users")

# What a label array becomes (the caller's: a torch tensor, a JSON list, a JAX array).
Convert = Callable[[Any], Any]


def _labels(labels: Any, convert: Convert) -> Any:
    return None if labels is None else convert(labels)


def _step_labels(labels: Optional[list], convert: Convert) -> Optional[list]:
    return None if labels is None else [convert(step) for step in labels]


def metadata_to_dict(metadata: Metadata, labels: Convert) -> dict:
    """``metadata`` as breaching's dict.

    Args:
      metadata: the metadata of a :class:`~fedjax_users.types.SharedData`.
      labels: what each label array (the labels, and each step's) becomes.

    Returns:
      breaching's ``metadata`` dict; ``data_key`` and ``num_users`` only where not None.

    Example::

        >>> hyper = LocalHyperparams(lr=0.1, steps=2, data_per_step=1, labels=[(0,), (1,)])
        >>> result = metadata_to_dict(Metadata(num_data_points=2, local_hyperparams=hyper, data_key="inputs"), list)
        >>> result["local_hyperparams"]["labels"], result["data_key"], "num_users" in result
        ([[0], [1]], 'inputs', False)
    """
    hyper = metadata.local_hyperparams
    result = dict(
        num_data_points=metadata.num_data_points,
        labels=_labels(metadata.labels, labels),
        local_hyperparams=None if hyper is None else dict(
            lr=hyper.lr, steps=hyper.steps, data_per_step=hyper.data_per_step,
            labels=_step_labels(hyper.labels, labels),
        ),
    )
    for key in OPTIONAL_KEYS:
        if getattr(metadata, key) is not None:
            result[key] = getattr(metadata, key)
    return result


def metadata_from_dict(metadata: Mapping[str, Any], labels: Convert) -> Metadata:
    """breaching's ``metadata`` dict as :class:`~fedjax_users.types.Metadata`.

    Args:
      metadata: breaching's dict (keys it lacks are None).
      labels: what each label value (the labels, and each step's) becomes.

    Returns:
      The Metadata.

    Example::

        >>> metadata_from_dict({"num_data_points": 2, "labels": [3, 1], "local_hyperparams": None}, tuple)
        Metadata(num_data_points=2, labels=(3, 1), local_hyperparams=None, data_key=None, num_users=None)
    """
    hyper = metadata.get("local_hyperparams")
    return Metadata(
        num_data_points=metadata.get("num_data_points"),
        labels=_labels(metadata.get("labels"), labels),
        local_hyperparams=None if hyper is None else LocalHyperparams(
            lr=hyper["lr"], steps=hyper["steps"], data_per_step=hyper["data_per_step"],
            labels=_step_labels(hyper.get("labels"), labels),
        ),
        data_key=metadata.get("data_key"),
        num_users=metadata.get("num_users"),
    )
