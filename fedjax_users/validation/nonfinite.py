"""Whether values are finite: the inputs before computing, the outputs after, and where a NaN began.

After computing (``check_outputs``): with ``check_finite`` on, one reduction says whether every
output is finite; only when one is not does a diagnosis run (which leaf, and by re-running the
user for fewer steps, the first local step that went non-finite). Under an outer ``jit`` the
check is ``jax.experimental.checkify``'s, decided by ``finite_check_mode``.

Example::

    >>> import numpy as np
    >>> from fedjax_users.validation import nonfinite
    >>> nonfinite.all_finite({"w": np.ones(3)}), nonfinite.first_non_finite({"w": np.array([1.0, np.nan])})
    (True, 'w holds NaN at [1]')
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from fedjax_users.config import UserConfig
from fedjax_users.strategy import compilation
from fedjax_users.validation.errors import InputError, NonFiniteError
from fedjax_users.validation.introspection import leaf_dtype

Array = jax.Array
PyTree = Any
# The outputs of a user after its first ``steps`` local steps, by name ("gradients", "batch_stats").
Rerun = Callable[[int], Mapping[str, PyTree]]
# An aggregate's: ``(user, steps) ->`` that user's outputs after its first ``steps`` local steps.
RunUser = Callable[[int, int], Mapping[str, PyTree]]


def is_concrete(*trees: Any) -> bool:
    """Whether no leaf of ``trees`` is a tracer, so that values can be read on the host.

    Args:
      *trees: pytrees.

    Returns:
      ``False`` if any leaf is a ``jax.core.Tracer``.

    Example::

        >>> seen = []
        >>> _ = jax.jit(lambda x: seen.append(is_concrete(x)) or x)(1.0)  # under jit, x is a tracer
        >>> is_concrete({"w": np.ones(2)}), seen
        (True, [False])
    """
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def on_host(*trees: Any) -> bool:
    """Whether values can be reduced eagerly: concrete, and no trace on (which would stage the reduction).

    Args:
      *trees: pytrees.

    Returns:
      ``True`` outside any trace when no leaf of ``trees`` is a tracer.
    """
    return not compilation.tracing() and is_concrete(*trees)


def all_finite(tree: PyTree) -> bool:
    """Whether every float leaf of ``tree`` is finite.

    Leaves in host memory (NumPy values, and JAX arrays on CPU devices, which NumPy reads without
    a copy) are checked there (min and max: no temporary of the data's size), the others in one
    jitted reduction (one device round trip).

    Args:
      tree: a pytree of arrays or numbers; integer leaves are finite.

    Returns:
      ``True`` if no float leaf holds NaN or infinity.

    Example::

        >>> all_finite({"a": np.ones(2), "b": jnp.array([0.0, jnp.inf]), "n": np.arange(3)})
        False
    """
    leaves = _inexact_leaves(tree)
    host, device = [], []
    for leaf in leaves:
        (host if _in_host_memory(leaf) else device).append(leaf)
    for leaf in host:
        values = np.asarray(leaf)
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            return False
    return not device or bool(_device_all_finite(device))


def first_non_finite(outputs: Mapping[str, PyTree]) -> Optional[str]:
    """Where the first non-finite value of ``outputs`` is (reads every leaf: a diagnosis, not a check).

    Args:
      outputs: named pytrees (``{"gradients": ..., "batch_stats": ...}``).

    Returns:
      ``"name['path'] holds NaN at [i, j]"`` (or ``inf``, ``-inf``) for the first such leaf, else ``None``.

    Example::

        >>> first_non_finite({"gradients": {"w": np.array([[1.0, -np.inf]])}})
        "gradients['w'] holds -inf at [0, 1]"
    """
    for name, tree in outputs.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            values = np.asarray(leaf)
            if not jnp.issubdtype(values.dtype, jnp.inexact) or np.isfinite(values).all():
                continue
            index = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
            value = values[index]
            what = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
            return f"{name}{jax.tree_util.keystr(path)} holds {what} at {list(index)}"
    return None


def check_finite_inputs(trees: Mapping[str, PyTree]) -> None:
    """Raise ``InputError`` naming the first input leaf holding NaN or infinity (concrete values only).

    Args:
      trees: named inputs (``{"data.inputs": ..., "payload": ..., "user_state": ...}``).

    Returns:
      ``None``.

    Example::

        >>> check_finite_inputs({"data.inputs": np.array([0.5, np.nan])})
        Traceback (most recent call last):
        ...
        fedjax_users.validation.errors.InputError: data.inputs holds NaN at [1]: inputs, payload and state must hold finite numbers
    """
    if all_finite(list(trees.values())):
        return
    raise InputError(f"{first_non_finite(trees)}: inputs, payload and state must hold finite numbers")


def finite_check_mode(check_finite: Optional[bool], *trees: Any) -> str:
    """How outputs are checked: ``"off"``, ``"eager"`` (on the host after the call) or ``"checkify"``.

    ``None`` checks eager calls only; ``True`` also checks under an outer ``jit`` through
    ``jax.experimental.checkify.check`` (the caller must wrap its program in ``checkify.checkify``).

    Args:
      check_finite: the caller's ``check_finite``.
      *trees: the call's arguments: any tracer among them means a trace.

    Returns:
      The mode to pass to ``check_outputs``.

    Example::

        >>> finite_check_mode(None, np.ones(2)), finite_check_mode(False, np.ones(2))
        ('eager', 'off')
    """
    traced = compilation.tracing() or not is_concrete(*trees)
    if check_finite is False or (check_finite is None and traced):
        return "off"
    return "checkify" if traced else "eager"


def first_failing_step(fails: Callable[[int], bool], num_steps: int) -> Optional[int]:
    """The smallest ``s`` in ``1..num_steps`` with ``fails(s)``, by bisection.

    Failure persists once reached (a NaN parameter stays NaN), so ``fails`` is monotone.

    Args:
      fails: whether the user's outputs after ``s`` local steps are not finite.
      num_steps: the user's number of local steps.

    Returns:
      The first failing step, or ``None`` if even ``fails(num_steps)`` is false.

    Example::

        >>> first_failing_step(lambda s: s >= 5, 8), first_failing_step(lambda s: False, 8)
        (5, None)
    """
    if not fails(num_steps):
        return None
    low, high = 1, num_steps  # fails(high) is known to be true
    while low < high:
        middle = (low + high) // 2
        if fails(middle):
            high = middle
        else:
            low = middle + 1
    return low


def check_outputs(
    mode: str,
    outputs: Mapping[str, PyTree],
    function: str,
    cfg: UserConfig,
    rerun: Optional[Rerun] = None,
    users: Optional[tuple[int, RunUser]] = None,
) -> None:
    """Raise ``NonFiniteError`` if an output is not finite.

    The success path is one reduction (eager) or one ``checkify.check`` per leaf (traced). On
    failure, ``rerun`` finds the first bad step of a multi-step user; for an aggregate, ``users``
    finds the first user whose own update is not finite, then its step.

    Args:
      mode: from ``finite_check_mode``.
      outputs: the user's named outputs (``{"gradients": ..., "batch_stats": ...}``).
      function: the public function that computed them (named in the message).
      cfg: the user config (its number of local steps and learning rate).
      rerun: ``steps -> outputs`` of the user after its first ``steps`` local steps.
      users: ``(num_users, run(user, steps))`` for an aggregate.

    Returns:
      ``None``.

    Example::

        >>> import fedjax_users as fu
        >>> cfg = fu.UserConfig(user_type="local_gradient", num_data_points=1)
        >>> check_outputs("eager", {"gradients": {"w": np.array([np.inf])}}, "local_gradient", cfg)
        Traceback (most recent call last):
        ...
        fedjax_users.validation.errors.NonFiniteError: local_gradient went non-finite: gradients['w'] holds inf at [0]; lower the learning rate or check the inputs (check_finite=False returns such results)
    """
    if mode == "off":
        return
    if mode == "checkify":
        for name, tree in outputs.items():
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                if jnp.issubdtype(leaf.dtype, jnp.inexact):
                    checkify.check(
                        jnp.all(jnp.isfinite(leaf)), f"{function}: {name}{jax.tree_util.keystr(path)} is not finite"
                    )
        return
    if all_finite(list(outputs.values())):
        return
    raise NonFiniteError(
        f"{function} went non-finite: {first_non_finite(outputs)}{_locate(cfg, rerun, users)}; lower the "
        "learning rate or check the inputs (check_finite=False returns such results)"
    )


def _inexact_leaves(tree: PyTree) -> list:
    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf_dtype(leaf), jnp.inexact)]


def _in_host_memory(leaf: Any) -> bool:
    """Whether NumPy can read ``leaf`` without a transfer: a NumPy value or a JAX array on CPU devices.

    On a CPU device, reading the array as NumPy and reducing it there costs about 20 us for 64
    CIFAR-sized images, where dispatching the jitted reduction and reading its flag back costs
    about 170 us (lenet_zhu's eager ``local_gradient``, this project's 2-core CPU): the eager
    check's cost is mostly that round trip, not the reduction.
    """
    if isinstance(leaf, (np.ndarray, np.generic, float)):
        return True
    return (isinstance(leaf, jax.Array) and leaf.is_fully_addressable
            and all(device.platform == "cpu" for device in leaf.devices()))


@jax.jit
def _device_all_finite(leaves: list) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _fails(run: Rerun) -> Callable[[int], bool]:
    """``steps -> whether run(steps)`` holds a non-finite value."""
    return lambda steps: not all_finite(list(run(steps).values()))


def _locate(cfg: UserConfig, rerun: Optional[Rerun],
            users: Optional[tuple[int, RunUser]]) -> str:
    """Where a non-finite result first appeared (``", first in user 3, first after local step 2 of 8 (...)"``)."""
    steps = cfg.num_local_updates if cfg.is_multi_step else None
    where = ""
    if users is not None:
        num_users, run_user = users
        bad = next((u for u in range(num_users) if _fails(functools.partial(run_user, u))(steps or 1)), None)
        if bad is None:
            return ", though every user's own update is finite (their sum overflowed)"
        where, rerun = f", first in user {bad}", functools.partial(run_user, bad)
    if steps is not None and rerun is not None:
        step = first_failing_step(_fails(rerun), steps)
        if step is not None:
            where += f", first after local step {step} of {steps} (local_learning_rate={cfg.local_learning_rate})"
    return where
