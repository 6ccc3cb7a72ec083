"""Conversion between breaching's torch objects and fedjax_users' Flax/JAX ones.

Pairing is by name (see :mod:`fedjax_users.interop.naming`); values convert with the dtype rules
of :mod:`fedjax_users.interop.tensors`.

Names are imported on first use: the torch-free parts (``naming``, ``order``, ``metadata``) serve
``fedjax_users.io``, which writes updates torch reads, where torch is not installed (the run
dependencies do not name it). Everything else imports torch.

Example::

    >>> from fedjax_users import interop
    >>> interop.torch_name(("fc", "kernel"), interop.PARAMS)  # imports the torch-free naming module only
    'fc.weight'
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the submodule that defines it.
_EXPORTS = {
    "BATCH_STATS": "naming",
    "PARAMS": "naming",
    "Link": "naming",
    "link": "naming",
    "link_all": "naming",
    "torch_name": "naming",
    "TorchOrder": "order",
    "order_from_torch_names": "order",
    "torch_order": "order",
    "labels_from_torch": "shared_data",
    "labels_to_torch": "shared_data",
    "metadata_from_torch": "shared_data",
    "metadata_to_torch": "shared_data",
    "shared_data_from_files": "files",
    "shared_data_from_torch": "shared_data",
    "shared_data_to_torch": "shared_data",
    "nchw_to_nhwc": "tensors",
    "nhwc_to_nchw": "tensors",
    "to_jax": "tensors",
    "to_numpy": "tensors",
    "to_torch": "tensors",
    "buffers_from_torch_list": "torch_flax",
    "buffers_to_torch_list": "torch_flax",
    "grads_from_torch_list": "torch_flax",
    "grads_to_torch_list": "torch_flax",
    "params_from_torch_list": "torch_flax",
    "params_to_torch_list": "torch_flax",
    "payload_from_torch": "torch_flax",
    "payload_to_torch": "torch_flax",
    "tree_from_torch": "torch_flax",
    "tree_to_torch": "torch_flax",
    "variables_from_torch": "torch_flax",
    "variables_to_torch": "torch_flax",
}
_SUBMODULES = ("files", "metadata", "naming", "order", "shared_data", "tensors", "torch_flax")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
