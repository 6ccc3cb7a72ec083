"""The array layouts each public function takes, by input kind, as the error messages name them.

Float inputs are NHWC images, integer ones token ids; an aggregate's arrays carry a users axis first.

Example::

    >>> import numpy as np
    >>> from fedjax_users.validation import layouts
    >>> layouts.LAYOUTS["aggregate"][layouts.input_kind(np.int32)]
    '[users, examples, T]'
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from jax.typing import DTypeLike

LAYOUTS: Mapping[str, Mapping[str, str]] = {
    "local_gradient": {"float": "[examples, H, W, C]", "int": "[examples, T]", "labels": "[examples]"},
    "local_update": {"float": "[examples, H, W, C]", "int": "[examples, T]", "labels": "[examples]"},
    "aggregate": {
        "float": "[users, examples, H, W, C]", "int": "[users, examples, T]", "labels": "[users, examples]"
    },
}


def input_kind(dtype: DTypeLike) -> str:
    """The key of ``LAYOUTS`` for inputs of ``dtype``.

    Args:
      dtype: the inputs' dtype.

    Returns:
      ``"int"`` for integer inputs (token ids), ``"float"`` otherwise (images).

    Example::

        >>> input_kind(jnp.int32), input_kind(jnp.float32)
        ('int', 'float')
    """
    return "int" if jnp.issubdtype(dtype, jnp.integer) else "float"
