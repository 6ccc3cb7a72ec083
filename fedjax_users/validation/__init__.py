"""Checks that run before a user computes, and the check that what it computed is finite.

Before computing (``validate_user`` for ``local_gradient`` / ``local_update``, ``validate_users``
for ``aggregate``: both one check, ``inputs.validate_data``, parameterised by the data's leading
axes): the argument types, the config's user type against the function, the ranks and shapes of
inputs and labels, the payload against the model's variables for these inputs, and, when they are
concrete (not tracers of an outer ``jit``), the labels against the model's number of outputs and
the inputs for NaN and infinity. Shape checks need no data, so they also run under an outer
``jit``; they trace the model once per (model, input shape, dtype), cached.

After computing (``check_outputs``): with ``check_finite`` on, one reduction says whether every
output is finite; only when one is not does a diagnosis run (which leaf, and by re-running the
user for fewer steps, the first local step that went non-finite).

Errors: ``InputError`` (a ``ValueError``) for inputs, labels and payloads, ``InputTypeError`` (also
a ``TypeError``) for arguments of the wrong Python type, ``fedjax_users.ConfigError`` for configs
and ``NonFiniteError`` (a ``FloatingPointError`` and a ``ValueError``) for non-finite results.
Every message is one line naming the input and what was expected. See ``docs/validation.md``.

Submodules, one idea each:

- ``errors``: the error types, and how a caught cause is quoted in one line.
- ``introspection``: the model's variable and output shapes for given inputs, cached per model
  (the compute path reads the same cache).
- ``arguments``: the Python types of the arguments, the user kind, the strategy.
- ``layouts``: the array layouts each public function takes, as messages name them.
- ``payload``: the payload and a caller's BatchNorm state against the model's variables.
- ``labels``: labels against the model's outputs (shape per example, classes).
- ``inputs``: the one check before computing (``validate_data``) and its thin callers.
- ``nonfinite``: finite inputs and outputs, and the diagnosis of a non-finite result.

Example::

    >>> import numpy as np
    >>> from fedjax_users import validation
    >>> validation.all_finite({"w": np.ones(2)}), validation.first_failing_step(lambda s: s >= 3, 4)
    (True, 3)
"""

from fedjax_users.validation.arguments import check_strategy, check_user_kind
from fedjax_users.validation.errors import InputError, InputTypeError, NonFiniteError
from fedjax_users.validation.inputs import (as_array, check_chunk, first_examples, validate_data, validate_user,
                                           validate_users)
from fedjax_users.validation.introspection import cached_by_model, draws_in_train_mode, output_shape, variable_shapes
from fedjax_users.validation.labels import IGNORING_LOSSES, INTEGER_LABEL_LOSSES
from fedjax_users.validation.layouts import LAYOUTS
from fedjax_users.validation.nonfinite import (
    all_finite,
    check_finite_inputs,
    check_outputs,
    finite_check_mode,
    first_failing_step,
    first_non_finite,
    is_concrete,
)
from fedjax_users.validation.payload import check_payload

# What other modules and users call; the submodules' other names are theirs (``validation.payload.check_state``).
__all__ = [
    "IGNORING_LOSSES",
    "INTEGER_LABEL_LOSSES",
    "InputError",
    "InputTypeError",
    "LAYOUTS",
    "NonFiniteError",
    "all_finite",
    "as_array",
    "cached_by_model",
    "check_chunk",
    "check_finite_inputs",
    "check_outputs",
    "check_payload",
    "check_strategy",
    "check_user_kind",
    "draws_in_train_mode",
    "finite_check_mode",
    "first_examples",
    "first_failing_step",
    "first_non_finite",
    "is_concrete",
    "output_shape",
    "validate_data",
    "validate_user",
    "validate_users",
    "variable_shapes",
]
