"""fedjax_users: breaching's federated-learning users as pure JAX functions.

The top level holds what a caller of the users needs: the three users and their dispatcher
(``local_gradient``, ``local_update``, ``aggregate``, ``compute``), the user built once (``User``),
the execution strategy (``choose_strategy``, ``step_slices``), the config (``UserConfig``,
``LocalDiffPrivacy``, ``UserKind``), the values that cross the user boundary (``ServerPayload``,
``UserData``, ``SharedData``, ``Metadata``, ``LocalHyperparams``, ``TrueUserData``) and the errors
raised before computing (``ConfigError``, ``InputError``, ``InputTypeError``, ``NonFiniteError``).

Everything else lives in submodules, reachable as namespaces after ``import fedjax_users as fu``
(``fu.models.get``, ``fu.accounting.guarantee``), as optax and flax expose theirs. Each is imported
on first use, so that ``import fedjax_users`` stays light: ``interop`` imports torch and
``accounting`` dp-accounting only when they are reached. Each submodule's ``__all__`` is its public
surface.

Submodules:

* ``accounting``: the (epsilon, delta)-DP guarantee of a user config, and the gradient noise for
  a target epsilon (dp-accounting's PLD and RDP accountants).
* ``attacks``: gradient inversion through the exact user (``python -m fedjax_users.attacks``).
* ``batchnorm``: ``BatchNorm`` with PyTorch's running statistics, and its pure update steps.
* ``cohort``: an aggregate's users read on demand (``ArrayCohort``, ``FunctionCohort``).
* ``data``: breaching's cases: composition, the catalogue of case files, datasets, partitions,
  the server's payload, and ``construct_users``.
* ``evaluate``: defences measured against epsilon (accounting, attacks and utility).
* ``interop``: torch <-> JAX conversion, torch's names and order, breaching's drop-in users and
  the parity check (imports torch).
* ``io``: shared updates saved and loaded, checked (msgpack, and safetensors for torch).
* ``losses``: per-example losses matching breaching's torch losses, and their mean.
* ``models``: the model zoo, looked up by breaching's names (``get``, ``for_data``, ``names``).
* ``plots``: image grids and epsilon against the number of queries, drawn without pyplot.
* ``privacy``: breaching's clipping rule and Gaussian/Laplace noise from explicit keys.
* ``progress``: a long run's stages and counters on standard error.
* ``semantics``: what a breaching user computes, written to be read (``docs/semantics.md``).
* ``strategy``: how to run it fast without changing the numbers (clipping, chunks, devices,
  streaming, compile options).
* ``validation``: the checks made before computing, and the diagnosis of a non-finite result.

Example::

    >>> import fedjax_users as fu
    >>> type(fu.models.get("lenet_zhu", num_classes=10)).__name__
    'LeNetZhu'
    >>> import jax.numpy as jnp
    >>> loss = fu.losses.softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))  # uniform over 4 classes
    >>> loss.shape, bool(jnp.allclose(loss, jnp.log(4.0)))
    ((2,), True)
"""

from fedjax_users.config import ConfigError, LocalDiffPrivacy, UserConfig, UserKind
from fedjax_users.types import (
    LocalHyperparams,
    Metadata,
    ServerPayload,
    SharedData,
    TrueUserData,
    UserData,
)
from fedjax_users.user import User
from fedjax_users.users import aggregate, choose_strategy, compute, local_gradient, local_update, step_slices
from fedjax_users.validation import InputError, InputTypeError, NonFiniteError

__version__ = "0.1.0"

# The submodules of the package docstring, imported on first use (``__getattr__``) so that
# ``import fedjax_users`` stays light. tests/test_public_api.py checks the docstring names each.
SUBMODULES = (
    "accounting", "attacks", "batchnorm", "cohort", "data", "evaluate", "interop", "io", "losses", "models", "plots",
    "privacy", "progress", "semantics", "strategy", "validation",
)


def __getattr__(name: str):
    if name in SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))


__all__ = [
    "ConfigError",
    "InputError",
    "InputTypeError",
    "LocalDiffPrivacy",
    "LocalHyperparams",
    "Metadata",
    "NonFiniteError",
    "ServerPayload",
    "SharedData",
    "TrueUserData",
    "User",
    "UserConfig",
    "UserData",
    "UserKind",
    "aggregate",
    "choose_strategy",
    "compute",
    "local_gradient",
    "local_update",
    "step_slices",
]
