"""fedjax_users: breaching's federated-learning users as pure JAX functions."""

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

# Submodules reachable as ``fu.models`` etc. after ``import fedjax_users as fu``, imported on first
# use so that ``import fedjax_users`` stays light (``interop`` imports torch, ``accounting``
# dp-accounting).
_LAZY_SUBMODULES = (
    "accounting", "attacks", "batchnorm", "data", "evaluate", "interop", "io", "losses", "models", "privacy", "progress",
    "semantics", "strategy", "validation",
)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

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
