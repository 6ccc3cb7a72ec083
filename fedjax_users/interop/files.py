"""breaching's ``shared_data`` dict from the files ``fedjax-users run`` writes, without a torch model.

A module of its own: it reads through :mod:`fedjax_users.io`, which the drop-in user and the parity
comparison (:mod:`fedjax_users.interop.breaching`, :mod:`~fedjax_users.interop.shared_data`) do
not import, so a change to the file format leaves the parity rows' fingerprints as they are.
"""

from __future__ import annotations

import json
import os

from safetensors import safe_open

from fedjax_users import io
from fedjax_users.interop.shared_data import metadata_to_torch

__all__ = ["shared_data_from_files"]


def shared_data_from_files(path: str | os.PathLike) -> dict:
    """breaching's ``shared_data`` dict from a ``.safetensors`` update and its metadata JSON, without a torch model.

    The files are those of :func:`fedjax_users.io.save_shared_safetensors` (``fedjax-users run``
    writes them for every query). Both are checked as :func:`fedjax_users.io.load_shared` checks
    them (the metadata's checksum of the tensors file included).

    Args:
      path: the ``.safetensors`` file; its ``.metadata.json`` must be beside it.

    Returns:
      ``{"gradients": [...], "buffers": [...] or None, "metadata": {...}}``, as breaching's user
      returns it: tensors in ``model.parameters()`` / ``model.buffers()`` order and torch's
      layouts (float dtypes as saved, integer buffers int64), int64 label tensors, and
      ``data_key`` / ``num_users`` only for the user types that send them.

    Raises:
      fedjax_users.io.SharedFileError: a missing, damaged or mismatched file.

    breaching's attacker takes the result as it takes its own user's:
    ``attacker.reconstruct([server_payload], [shared_data_from_files(path)], {}, dryrun=True)``.

    Example::

        >>> import os, tempfile, numpy as np
        >>> from fedjax_users.interop.order import TorchOrder
        >>> from fedjax_users.types import Metadata, SharedData
        >>> fc = {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}
        >>> metadata = Metadata(num_data_points=1, labels=np.array([1]))
        >>> shared = SharedData(gradients={"fc": fc}, batch_stats=None, metadata=metadata)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "update.safetensors")
        ...     _ = io.save_shared_safetensors(path, shared, TorchOrder(params=(("fc", "kernel"), ("fc", "bias"))))
        ...     shared_data = shared_data_from_files(path)
        >>> [tuple(tensor.shape) for tensor in shared_data["gradients"]], shared_data["buffers"]
        ([(2, 3), (2,)], None)
        >>> shared_data["metadata"]
        {'num_data_points': 1, 'labels': tensor([1]), 'local_hyperparams': None}
    """
    path = os.fspath(path)
    shared, _ = io.load_shared(path)  # checks the pair; its metadata is the Flax one
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata()
        # The order is the file's own list: a torch user reads the same with safetensors alone.
        lists = {key: json.loads(header[key]) for key in ("gradients", "buffers")}
        tensors = {key: None if names is None else [handle.get_tensor(name) for name in names]
                   for key, names in lists.items()}
    return dict(gradients=tensors["gradients"], buffers=tensors["buffers"], metadata=metadata_to_torch(shared.metadata))
