"""The two dtypes a model passes to its layers, as Flax's own layers name them.

``dtype`` is the dtype a layer computes in, ``param_dtype`` the dtype its parameters are created
in. ``None`` keeps each layer's own default: Flax's ``nn.Dense`` / ``nn.Conv`` / ``nn.Embed`` /
``nn.LayerNorm`` create float32 parameters and compute in the promoted dtype of their inputs and
parameters; ``fedjax_users.batchnorm.BatchNorm`` follows its inputs. So a model built with neither
set is exactly the model built before these fields existed, and under ``jax_enable_x64`` a model
built with ``param_dtype=jnp.float64`` is float64 throughout, with no casting of its variables.
With ``dtype`` alone, BatchNorm's parameters and statistics follow its (``dtype``) inputs; give
``param_dtype`` too (e.g. ``dtype=jnp.bfloat16, param_dtype=jnp.float32``) to keep them wider.
"""

from __future__ import annotations

from typing import Any, Optional

Dtype = Any  # a JAX / NumPy dtype or scalar type, e.g. jnp.float64


def layer_dtypes(dtype: Optional[Dtype], param_dtype: Optional[Dtype]) -> dict[str, Dtype]:
    """Keyword arguments that pass the set dtypes on to a layer or submodule (unset ones are left out)."""
    return {name: value for name, value in (("dtype", dtype), ("param_dtype", param_dtype)) if value is not None}
