"""Conversion between breaching's torch objects and fedjax_users' Flax/JAX ones.

Pairing is by name (see :mod:`fedjax_users.interop.naming`); values convert with the dtype rules
of :mod:`fedjax_users.interop.tensors`.
"""

from fedjax_users.interop.naming import BATCH_STATS, PARAMS, Link, link, link_all
from fedjax_users.interop.shared_data import (
    labels_from_torch,
    labels_to_torch,
    metadata_from_torch,
    metadata_to_torch,
    shared_data_from_torch,
    shared_data_to_torch,
)
from fedjax_users.interop.tensors import nchw_to_nhwc, nhwc_to_nchw, to_jax, to_numpy, to_torch
from fedjax_users.interop.torch_flax import (
    buffers_from_torch_list,
    buffers_to_torch_list,
    grads_from_torch_list,
    grads_to_torch_list,
    params_from_torch_list,
    params_to_torch_list,
    payload_from_torch,
    payload_to_torch,
    tree_from_torch,
    tree_to_torch,
    variables_from_torch,
    variables_to_torch,
)

__all__ = [
    "BATCH_STATS",
    "PARAMS",
    "Link",
    "buffers_from_torch_list",
    "buffers_to_torch_list",
    "grads_from_torch_list",
    "grads_to_torch_list",
    "labels_from_torch",
    "labels_to_torch",
    "link",
    "link_all",
    "metadata_from_torch",
    "metadata_to_torch",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "params_from_torch_list",
    "params_to_torch_list",
    "payload_from_torch",
    "payload_to_torch",
    "shared_data_from_torch",
    "shared_data_to_torch",
    "to_jax",
    "to_numpy",
    "to_torch",
    "tree_from_torch",
    "tree_to_torch",
    "variables_from_torch",
    "variables_to_torch",
]
