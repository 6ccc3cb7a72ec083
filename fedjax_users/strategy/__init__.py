"""How the users are made fast: the execution strategy, apart from what they compute.

What a user computes is ``fedjax_users.semantics``. A ``Strategy`` says how to run it: over which
devices, how many users and examples at a time, whether per-example clipping forms kernel
gradients from im2col patches, whether an aggregate's multi-step users run their convolutions as
matmuls, how many local steps are unrolled. None of it changes the numbers beyond float rounding
(each fast path is tested against the plain one). ``choose`` fills in what a strategy leaves open
from the platform, the model and the shapes; every constant it uses is in ``strategy.cpu``.

Modules: ``clipping`` (per-example clipping without per-example weight gradients), ``patches``
(im2col convolutions), ``chunking`` (users a chunk at a time), ``sharding`` (users over devices
and hosts), ``compilation`` (XLA:CPU's memory-optimized scheduler where it pays), ``cpu`` (the
tuned constants).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from fedjax_users.config import ConfigError
from fedjax_users.strategy import cpu
from fedjax_users.strategy.cpu import platform_of
from fedjax_users.strategy.compilation import compiler_options, jit


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How users run; ``None`` fields are chosen by ``choose`` (the comment above each field says how).

    Attributes:
      devices: the devices an aggregate's users axis is split over.
      users_per_chunk: users each device runs at a time in an aggregate.
      per_user_convs: an aggregate's multi-step users run their convolutions as im2col matmuls.
      fast_clipping: per-example clipping forms kernel gradients from layer inputs and cotangents.
      examples_per_chunk: examples a user runs at a time where its examples are independent.
      max_unrolled_steps: local steps up to this many are unrolled, longer schedules scanned.

    Example::

        >>> from fedjax_users.strategy import Strategy
        >>> Strategy(users_per_chunk=4).replace(examples_per_chunk=100).examples_per_chunk
        100
    """

    # The devices the users axis of an aggregate is split over; None: ``jax.devices()``.
    devices: Optional[tuple[jax.Device, ...]] = None
    # Users each device runs at a time in an aggregate; None: the largest chunk that fits the
    # memory budget (a quarter of the free memory, at most ``cpu.USERS_CHUNK_BYTES`` on CPU).
    users_per_chunk: Optional[int] = None
    # An aggregate's multi-step users run their convolutions as im2col matmuls instead of the
    # grouped convolutions ``vmap`` makes of per-user kernels; None: on CPU when a chunk holds
    # more than one user (not measured elsewhere, so off there).
    per_user_convs: Optional[bool] = None
    # Per-example clipping forms dense and convolution kernel gradients from the layer's inputs and
    # cotangents; False: a plain ``vmap`` of per-example gradients.
    fast_clipping: bool = True
    # Examples a user runs at a time where its examples are independent: per-example clipping's
    # chunks (None: ``clipping.auto_examples_per_chunk``), and an unclipped single-step user's in
    # eval mode (None: the whole batch; an aggregate chooses chunks when one user would not fit,
    # ``examples.auto_examples_per_chunk``).
    examples_per_chunk: Optional[int] = None
    # Local steps up to this many are unrolled; longer schedules run as a ``lax.scan``.
    max_unrolled_steps: int = cpu.MAX_UNROLLED_STEPS

    def __post_init__(self):
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))
            if not self.devices:
                raise ConfigError("strategy.devices must name at least one device, got none")
        for name, least in (("users_per_chunk", 1), ("examples_per_chunk", 1), ("max_unrolled_steps", 0)):
            value = getattr(self, name)
            if value is None and name != "max_unrolled_steps":
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ConfigError(f"strategy.{name} must be an integer, got {value!r}")
            if value < least:
                raise ConfigError(f"strategy.{name} must be >= {least}, got {value}")

    @property
    def platform(self) -> str:
        """The platform the users run on: that of the first device (``jax.devices()`` by default)."""
        return platform_of(self.devices)

    def replace(self, **changes) -> "Strategy":
        """A copy with some fields changed (validated again).

        Args:
          **changes: new values of fields.

        Returns:
          The new ``Strategy``.
        """
        return dataclasses.replace(self, **changes)


def choose(
    strategy: Optional[Strategy],
    num_users: int,
    multi_step: bool,
    users_per_chunk_for: Callable[[Strategy, int, str], int],
    platform: Optional[str] = None,
    examples_per_chunk_for: Optional[Callable[[Strategy], Optional[int]]] = None,
) -> Strategy:
    """``strategy`` with its open fields filled in for an aggregate of ``num_users`` users.

    What one user needs is the caller's to say (``users_per_chunk_for``): this function decides
    from it, the devices and the platform, and from nothing else, so the choice an accelerator
    would get runs on a CPU by naming its platform. ``fedjax_users.choose_strategy`` is the same
    choice for a model, its payload, users and config, as ``fu.aggregate`` makes it.

    Args:
      strategy: the fields already decided (``None``: none are).
      num_users: users in the aggregate.
      multi_step: whether each user takes several local steps (only those run im2col convolutions).
      users_per_chunk_for: ``(sizing strategy, users each device holds, platform)`` -> the most
        users a device should run at a time; called only when ``users_per_chunk`` is open.
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; default: that of the strategy's devices.
      examples_per_chunk_for: for users whose examples may run in chunks (``strategy.examples``),
        ``sizing strategy -> examples per chunk, or None for the whole batch``; called only when
        ``examples_per_chunk`` is open, before the users are sized.

    Returns:
      A strategy with ``devices``, ``users_per_chunk`` and ``per_user_convs`` set.

    Example::

        >>> from fedjax_users import strategy
        >>> chosen = strategy.choose(None, 10, True, lambda sizing, held, platform: 4, platform="gpu")
        >>> chosen.users_per_chunk <= 4, chosen.per_user_convs
        (True, False)
    """
    from fedjax_users.strategy import sharding

    strategy = strategy or Strategy()
    devices = strategy.devices or tuple(jax.devices())
    platform = platform or platform_of(devices)
    per_device = sharding.users_per_device(num_users, sharding.users_mesh(devices))
    per_user_convs = strategy.per_user_convs
    if per_user_convs is None:
        per_user_convs = platform == "cpu"  # measured only there
    if strategy.examples_per_chunk is None and examples_per_chunk_for is not None:
        strategy = strategy.replace(examples_per_chunk=examples_per_chunk_for(strategy))
    users_per_chunk = strategy.users_per_chunk
    if users_per_chunk is None:
        # Sized with the im2col steps when they may run: their patches take more memory.
        users_per_chunk = users_per_chunk_for(strategy.replace(per_user_convs=per_user_convs), per_device, platform)
    size = min(users_per_chunk, per_device)
    # One user per chunk has one set of kernels: vmap keeps its convolutions plain.
    per_user_convs = bool(per_user_convs) and size > 1 and multi_step
    return strategy.replace(devices=devices, users_per_chunk=size, per_user_convs=per_user_convs)


__all__ = ["Strategy", "choose", "compiler_options", "cpu", "jit", "platform_of"]
