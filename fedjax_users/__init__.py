"""fedjax_users: breaching's federated-learning users as pure JAX functions."""

from fedjax_users.compilation import compiler_options, jit
from fedjax_users.config import ConfigError, LocalDiffPrivacy, UserConfig
from fedjax_users.types import (
    LocalHyperparams,
    Metadata,
    ServerPayload,
    SharedData,
    TrueUserData,
    UserData,
)
from fedjax_users.users import ChunkPlan, aggregate, local_gradient, local_update, plan_chunks, step_slices

__version__ = "0.1.0"

__all__ = [
    "ChunkPlan",
    "ConfigError",
    "LocalDiffPrivacy",
    "LocalHyperparams",
    "Metadata",
    "ServerPayload",
    "SharedData",
    "TrueUserData",
    "UserConfig",
    "UserData",
    "aggregate",
    "compiler_options",
    "jit",
    "local_gradient",
    "local_update",
    "plan_chunks",
    "step_slices",
]
