"""Checks that run before a user computes, and the check that what it computed is finite.

Before computing (``validate_user`` for ``local_gradient`` / ``local_update``, ``validate_users``
for ``aggregate``): the argument types, the config's user type against the function, the ranks
and shapes of inputs and labels, the payload against the model's variables for these inputs, and,
when they are concrete (not tracers of an outer ``jit``), the labels against the model's number of
outputs and the inputs for NaN and infinity. Shape checks need no data, so they also run under an
outer ``jit``; they trace the model once per (model, input shape, dtype), cached.

After computing (``check_outputs``): with ``check_finite`` on, one reduction says whether every
output is finite; only when one is not does a diagnosis run (which leaf, and by re-running the
user for fewer steps, the first local step that went non-finite).

Errors: ``InputError`` (a ``ValueError``) for inputs, labels and payloads, ``InputTypeError`` (also
a ``TypeError``) for arguments of the wrong Python type, ``fedjax_users.ConfigError`` for configs
and ``NonFiniteError`` (a ``FloatingPointError`` and a ``ValueError``) for non-finite results.
Every message is one line naming the input and what was expected. See ``docs/validation.md``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

from flax.errors import InvalidRngError
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from fedjax_users import losses

from fedjax_users.strategy import compilation
from fedjax_users.config import ConfigError, UserConfig
from fedjax_users.types import ServerPayload, UserData

Array = jax.Array
PyTree = Any

# The package's losses take integer class indices of the logits' shape without the class axis.
INTEGER_LABEL_LOSSES = (losses.softmax_cross_entropy, losses.causal_lm_loss, losses.masked_lm_loss)
# Losses for which a label of ``losses.IGNORE_INDEX`` means "no loss here" (torch's ignore_index).
IGNORING_LOSSES = (losses.masked_lm_loss,)
# What a function expects, by input kind: float inputs are NHWC images, integer ones token ids.
LAYOUTS = {
    "local_gradient": {"float": "[examples, H, W, C]", "int": "[examples, T]", "labels": "[examples]"},
    "local_update": {"float": "[examples, H, W, C]", "int": "[examples, T]", "labels": "[examples]"},
    "aggregate": {
        "float": "[users, examples, H, W, C]", "int": "[users, examples, T]", "labels": "[users, examples]"
    },
}


class InputError(ValueError):
    """Inputs, labels, a payload or an argument that do not fit the model, the config or the function."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong Python type (a dict for a ``ServerPayload``, an int for a key)."""


class NonFiniteError(FloatingPointError, ValueError):
    """A user's update or statistics went NaN or infinite (for example a learning rate that diverges)."""


# ----------------------------------------------------------------------------------------------
# The model's shapes (cached per model and input shape)


def cached_by_model(fn: Callable) -> Callable:
    """``functools.lru_cache`` for (model, shape, dtype) keys, bypassed for an unhashable model."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def call(model, shape, dtype):
        try:
            hash(model)
        except TypeError:
            return fn(model, shape, dtype)
        return cached(model, shape, dtype)

    return call


@cached_by_model
def variable_shapes(model, shape: tuple[int, ...], dtype) -> PyTree:
    """The shapes of ``model``'s variables for inputs of ``shape`` (cached: each trace costs ~5 ms)."""
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, dtype))


@cached_by_model
def output_shape(model, shape: tuple[int, ...], dtype) -> Any:
    """The shape of ``model.apply`` (eval mode) for inputs of ``shape``, from its variables' shapes."""
    variables = variable_shapes(model, shape, dtype)
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jax.ShapeDtypeStruct(shape, dtype))


@cached_by_model
def draws_in_train_mode(model, shape: tuple[int, ...], dtype) -> bool:
    """Whether ``model`` in train mode asks for an RNG stream (dropout, stochastic depth) for inputs of ``shape``."""
    variables = variable_shapes(model, shape, dtype)

    def train_forward(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    try:
        jax.eval_shape(train_forward, variables, jax.ShapeDtypeStruct(shape, dtype))
    except InvalidRngError:
        return True
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _model_shapes(model, shape: tuple[int, ...], dtype, what: Callable = variable_shapes) -> Any:
    """``what(model, shape, dtype)``, with a model that fails on such inputs reported as an ``InputError``."""
    try:
        return what(model, shape, dtype)
    except Exception as err:  # noqa: BLE001  (any failure of the model on these inputs; the cause is chained)
        raise InputError(
            f"the model cannot take examples of shape {shape[1:]} ({jnp.dtype(dtype).name}): {_first_line(err)}"
        ) from err


def _try_shapes(model, shape: tuple[int, ...], dtype) -> Optional[PyTree]:
    """Variable shapes for ``shape``, or ``None`` where the model cannot take it (diagnosis only)."""
    try:
        return variable_shapes(model, shape, dtype)
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------
# Arguments


def is_concrete(*trees: Any) -> bool:
    """Whether no leaf of ``trees`` is a tracer (values can be read on the host)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _on_host(*trees: Any) -> bool:
    """Whether values can be reduced eagerly: concrete, and no trace on (which would stage the reduction)."""
    return not compilation.tracing() and is_concrete(*trees)


def as_array(value: Any, name: str) -> Any:
    """``value`` if it is an array, else ``np.asarray(value)`` (nested lists); ragged or odd input is an error."""
    if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
        return value
    if not isinstance(value, (list, tuple, int, float, np.generic)) or isinstance(value, bool):
        raise InputTypeError(f"{name} must be an array (JAX, NumPy or nested lists of numbers), got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.dtype == object:
        raise InputError(f"{name} is ragged: its entries have shapes {_entry_shapes(value)}; {name} must be one array")
    return array


def _entry_shapes(value: Sequence) -> str:
    """The first two different shapes among the entries of a ragged sequence, with their indices."""
    seen: dict = {}
    for index, entry in enumerate(value):
        try:
            shape = np.shape(entry)
        except ValueError:
            shape = "ragged"
        seen.setdefault(shape, index)
        if len(seen) == 2:
            break
    return ", ".join(f"[{index}] {shape}" for shape, index in seen.items())


def _kind(dtype) -> str:
    return "int" if jnp.issubdtype(dtype, jnp.integer) else "float"


def _check_types(model, payload, data, cfg, key, loss, check_finite, data_name: str) -> None:
    if not isinstance(payload, ServerPayload):
        raise InputTypeError(f"payload must be a fedjax_users.ServerPayload, got {type(payload).__name__}")
    if not isinstance(data, UserData):
        raise InputTypeError(f"{data_name} must be a fedjax_users.UserData, got {type(data).__name__}")
    if not isinstance(cfg, UserConfig):
        raise InputTypeError(
            f"cfg must be a fedjax_users.UserConfig (UserConfig.from_yaml / from_dict), got {type(cfg).__name__}"
        )
    if not callable(loss):
        raise InputTypeError(f"loss must be a function loss(logits, labels) -> [examples] or losses.SummedLosses, "
                             f"got {type(loss).__name__}")
    if not callable(getattr(model, "apply", None)) or not callable(getattr(model, "init", None)):
        raise InputTypeError(f"model must be a Flax module (with init and apply), got {type(model).__name__}")
    if check_finite is not None and not isinstance(check_finite, bool):
        raise InputTypeError(f"check_finite must be None, True or False, got {check_finite!r}")
    _check_key(key)


def _check_key(key: Any) -> None:
    dtype, shape = getattr(key, "dtype", None), np.shape(key) if hasattr(key, "shape") else None
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype is not None and dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        described = f"{getattr(dtype, 'name', dtype)} array of shape {shape}" if dtype is not None else type(key).__name__
        raise InputTypeError(f"key must be one PRNG key (jax.random.key(seed)), got {described}")


def check_user_kind(cfg: UserConfig, function: str) -> None:
    """Raise ``ConfigError`` if ``cfg`` describes another kind of user than ``function`` computes.

    ``local_gradient`` takes ``local_gradient`` configs, ``local_update`` takes ``local_update``
    configs; a ``multiuser_aggregate`` config describes a cohort and goes to ``aggregate``, which
    also takes the two single-user kinds (every user of ``users_data`` is then one of them).
    """
    if function == "aggregate" or cfg.user_type == function:
        return
    one_user = "local_update" if cfg.is_multi_step else "local_gradient"
    if cfg.is_aggregate:
        raise ConfigError(
            f"{function} runs one user, but cfg is a multiuser_aggregate config (a cohort, user_range "
            f"{None if cfg.user_range is None else list(cfg.user_range)}): call aggregate, or pass "
            f"cfg.replace(user_type='{one_user}', user_range=None) to {one_user} for one of its users"
        )
    if function == "local_gradient":
        raise ConfigError(
            f"local_gradient takes one gradient, but cfg is a {cfg.user_type} config "
            f"(num_local_updates={cfg.num_local_updates}, local_learning_rate={cfg.local_learning_rate}): "
            "call local_update, or use user_type local_gradient"
        )
    raise ConfigError(
        f"local_update trains local steps, but cfg is a {cfg.user_type} config: call local_gradient, or use "
        "user_type local_update with num_local_updates, num_data_per_local_update_step and local_learning_rate"
    )


# ----------------------------------------------------------------------------------------------
# Inputs and labels


def _check_dtypes(inputs, labels, loss, name: str) -> None:
    if not (jnp.issubdtype(inputs.dtype, jnp.floating) or jnp.issubdtype(inputs.dtype, jnp.integer)):
        raise InputError(
            f"{name}.inputs have dtype {inputs.dtype}; expected floats (images) or integers (token ids)"
        )
    if not (jnp.issubdtype(labels.dtype, jnp.number) or labels.dtype == jnp.bool_):
        raise InputError(f"{name}.labels have dtype {labels.dtype}; expected numbers")
    if loss in INTEGER_LABEL_LOSSES and not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputError(f"{name}.labels have dtype {labels.dtype}; {loss.__name__} takes integer class indices")


def _check_ranks(inputs, labels, function: str, name: str, lead: int) -> None:
    """``lead`` leading axes (examples, or users and examples) on both, and at least one feature axis."""
    layout = LAYOUTS[function]
    expected = f"{function} expects {name}.inputs {layout[_kind(inputs.dtype)]} and {name}.labels {layout['labels']}"
    if np.ndim(labels) < lead:
        raise InputError(f"{name}.labels have shape {tuple(np.shape(labels))}: {expected}")
    if np.ndim(inputs) < lead + 1:
        raise InputError(f"{name}.inputs have shape {tuple(np.shape(inputs))}: {expected}")


def _check_lengths(num_inputs: int, num_labels: int, dtype, cfg: UserConfig, who: str,
                   hint: Callable[[], str] = lambda: "") -> None:
    """Examples of inputs and labels (``num_*``: their leading axis) against each other and the config."""
    if num_inputs != num_labels:
        raise InputError(f"inputs and labels of {who} have different lengths: {num_inputs} and {num_labels}{hint()}")
    if num_inputs < cfg.num_data_points:
        raise InputError(f"{who} holds {num_inputs} examples, fewer than num_data_points={cfg.num_data_points}")
    if cfg.local_diff_privacy.input_noise > 0 and jnp.issubdtype(dtype, jnp.integer):
        raise ConfigError(
            "input_noise > 0 asks for float noise on integer token inputs (input_ids); set input_noise to 0"
        )


def _class_bounds(model, example_shape: tuple[int, ...], dtype, labels_shape: tuple[int, ...]) -> Optional[int]:
    """The number of classes (the logits' last axis) when labels of ``labels_shape`` per example index it."""
    out = _model_shapes(model, (1,) + example_shape, dtype, output_shape)
    if not hasattr(out, "shape") or len(out.shape) < 2 or tuple(out.shape[1:-1]) != labels_shape:
        return None
    return int(out.shape[-1])


def _check_label_shape(model, example_shape, dtype, labels, loss, name: str, lead: int) -> None:
    """The package's losses need labels of the logits' shape without the class axis."""
    if loss not in INTEGER_LABEL_LOSSES:
        return
    out = _model_shapes(model, (1,) + example_shape, dtype, output_shape)
    want = tuple(out.shape[1:-1])
    if tuple(np.shape(labels))[lead:] != want:
        raise InputError(
            f"{name}.labels have shape {tuple(np.shape(labels))}: the model's logits per example have shape "
            f"{tuple(out.shape[1:])}, so {loss.__name__} takes labels of {want or 'one class index'} per example"
        )


def _first_outside(values: np.ndarray, low: int, high: int) -> Optional[tuple]:
    """Index of the first entry outside ``[low, high)``, or ``None`` (one pass for min and max)."""
    if values.size == 0 or (values.min() >= low and values.max() < high):
        return None
    return tuple(int(i) for i in np.argwhere((values < low) | (values >= high))[0])


def _check_label_values(model, example_shape, dtype, inputs, labels, name: str, lead: int, loss=None) -> None:
    """Integer labels (and a language model's token ids) must index the model's outputs.

    A loss of ``IGNORING_LOSSES`` also takes ``losses.IGNORE_INDEX`` (no loss at that label).
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        return
    classes = _class_bounds(model, example_shape, dtype, tuple(np.shape(labels))[lead:])
    if classes is None:
        return
    expected = f"class indices in [0, {classes}) for a model with {classes} outputs"
    if loss in IGNORING_LOSSES:
        labels = np.where(np.asarray(labels) == losses.IGNORE_INDEX, 0, np.asarray(labels))
        expected += f", or {losses.IGNORE_INDEX} (ignored)"
    _check_indices(labels, classes, f"{name}.labels", expected)
    # Per-token logits of a language model: the token ids index the same vocabulary.
    if jnp.issubdtype(inputs.dtype, jnp.integer) and tuple(np.shape(labels)) == tuple(np.shape(inputs)):
        _check_indices(inputs, classes, f"{name}.inputs (token ids)", f"in [0, {classes}), the model's vocabulary")


def _check_indices(values: Any, classes: int, what: str, expected: str) -> None:
    """Raise naming the first entry of ``values`` outside ``[0, classes)``."""
    host = np.asarray(values)
    bad = _first_outside(host, 0, classes)
    if bad is not None:
        where = what.split(" ")[0]
        raise InputError(f"{what} must be {expected}; {where}[{', '.join(map(str, bad))}] is {host[bad]}")


# ----------------------------------------------------------------------------------------------
# Payload and state against the model


def _dtype(leaf: Any) -> np.dtype:
    """A leaf's dtype (arrays, tracers and ShapeDtypeStructs have one; Python numbers get NumPy's)."""
    return leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)


def _leaves_by_path(tree: PyTree) -> dict:
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def _first_mismatch(want: PyTree, given: PyTree, name: str, lead: tuple[int, ...] = ()) -> Optional[tuple]:
    """``(message, path, given shape, wanted shape)`` of the first leaf of ``given`` that does not fit ``want``."""
    want_paths, given_paths = _leaves_by_path(want), _leaves_by_path(given)
    for path, leaf in want_paths.items():
        entry = f"{name}{jax.tree_util.keystr(path)}"
        if path not in given_paths:
            return f"{entry} is missing", path, None, None
        shape, wanted = tuple(np.shape(given_paths[path])), lead + tuple(leaf.shape)
        if shape != wanted:
            return f"{entry} has shape {shape}, the model expects {wanted}", path, shape, wanted
        dtype = _dtype(given_paths[path])
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not jnp.issubdtype(dtype, jnp.floating):
            return f"{entry} has dtype {dtype}, the model expects floats", path, None, None
    extra = [p for p in given_paths if p not in want_paths]
    if extra:
        return f"unexpected entry {name}{jax.tree_util.keystr(extra[0])}", extra[0], None, None
    return None


def _depends_on_inputs(model, shape: tuple[int, ...], dtype, collection: str, path, wanted: tuple) -> bool:
    """Whether the variable at ``path`` changes shape with the size of an input axis (a Dense after a flatten)."""
    for axis in range(1, len(shape)):
        other = shape[:axis] + (2 * shape[axis],) + shape[axis + 1 :]
        shapes = _try_shapes(model, other, dtype)
        leaf = None if shapes is None else _leaves_by_path(shapes.get(collection, {})).get(path)
        if leaf is not None and tuple(leaf.shape) != wanted:
            return True
    return False


def _fits(model, shape: tuple[int, ...], dtype, payload: ServerPayload) -> bool:
    """Whether ``payload`` fits the model's variables for inputs of ``shape``."""
    shapes = _try_shapes(model, shape, dtype)
    return shapes is not None and _first_mismatch(shapes.get("params", {}), payload.params, "params") is None


def _one_example_hint(model, payload: ServerPayload, inputs, dtype, function: str) -> str:
    """A hint when ``inputs`` are one example without the leading axis (diagnosis on an error path only)."""
    if function == "aggregate" or not _fits(model, (1,) + tuple(np.shape(inputs)), dtype, payload):
        return ""
    layout = LAYOUTS[function][_kind(dtype)]
    return (
        f"; inputs of shape {tuple(np.shape(inputs))} look like one example without its examples axis: "
        f"{function} expects {layout} (use inputs[None] and labels[None])"
    )


def check_payload(model, payload: ServerPayload, example_shape: tuple[int, ...], dtype, function: str,
                  inputs=None) -> None:
    """The payload's params (and buffers, if sent) against the model's variables for examples of ``example_shape``.

    A parameter whose expected shape follows the inputs' size (a Dense layer after a flatten, a
    convolution's input channels) blames the inputs, naming both shapes; others blame the payload.
    """
    shape = (1,) + tuple(example_shape)
    expected = _model_shapes(model, shape, dtype)
    for collection, given in (("params", payload.params), ("batch_stats", payload.batch_stats)):
        if collection == "batch_stats" and given is None:
            continue
        mismatch = _first_mismatch(expected.get(collection, {}), given, collection)
        if mismatch is None:
            continue
        message, path, given_shape, wanted = mismatch
        hint = "" if inputs is None else _one_example_hint(model, payload, inputs, dtype, function)
        if given_shape is not None and _depends_on_inputs(model, shape, dtype, collection, path, wanted):
            raise InputError(
                f"examples of shape {tuple(example_shape)} do not fit the payload: {collection}"
                f"{jax.tree_util.keystr(path)} has shape {given_shape}, examples of shape {tuple(example_shape)} "
                f"make it {wanted}; the payload's parameters were made for inputs of another shape{hint}"
            )
        raise InputError(f"payload does not fit the model: {message}{hint}")
    if payload.batch_stats is None and draws_in_train_mode(model, shape, dtype):
        # breaching's user draws these masks from torch's generator, which no JAX draw reproduces, and
        # the users here take no key for them: refuse rather than fail inside Flax mid-trace.
        raise ConfigError(
            f"{function}: the model draws random masks in train mode (dropout or stochastic depth), which "
            "this user does not draw; send the server's buffers (payload.batch_stats, eval mode, as "
            "breaching's default server does) or use a model without dropout"
        )


def _check_state(model, state: PyTree, example_shape, dtype, name: str, lead: tuple[int, ...] = ()) -> None:
    """A caller's BatchNorm state (``user_state`` / ``users_state``) against the model's statistics."""
    expected = _model_shapes(model, (1,) + tuple(example_shape), dtype).get("batch_stats", {})
    mismatch = _first_mismatch(expected, state, name, lead)
    if mismatch is not None:
        raise InputError(f"{name} does not fit the model's BatchNorm statistics: {mismatch[0]}")


# ----------------------------------------------------------------------------------------------
# Finite values


def _inexact_leaves(tree: PyTree) -> list:
    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(_dtype(leaf), jnp.inexact)]


@jax.jit
def _device_all_finite(leaves: list) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def all_finite(tree: PyTree) -> bool:
    """Whether every float leaf of ``tree`` is finite: NumPy leaves on the host (min and max, no
    temporary of the data's size), the others in one jitted reduction (one device round trip)."""
    leaves = _inexact_leaves(tree)
    host = [leaf for leaf in leaves if isinstance(leaf, (np.ndarray, np.generic, float))]
    device = [leaf for leaf in leaves if not isinstance(leaf, (np.ndarray, np.generic, float))]
    for leaf in host:
        values = np.asarray(leaf)
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            return False
    return not device or bool(_device_all_finite(device))


def first_non_finite(outputs: Mapping[str, PyTree]) -> Optional[str]:
    """``"name['path'] holds NaN at [i, j]"`` for the first non-finite leaf of ``outputs``, else ``None``."""
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
    """Raise ``InputError`` naming the first input leaf holding NaN or infinity (concrete values only)."""
    if all_finite(list(trees.values())):
        return
    raise InputError(f"{first_non_finite(trees)}: inputs, payload and state must hold finite numbers")


def finite_check_mode(check_finite: Optional[bool], *trees: Any) -> str:
    """``"off"``, ``"eager"`` (check on the host after the call) or ``"checkify"`` (under a trace).

    ``None`` checks eager calls only; ``True`` also checks under an outer ``jit`` through
    ``jax.experimental.checkify.check`` (the caller must wrap its program in ``checkify.checkify``).
    """
    traced = compilation.tracing() or not is_concrete(*trees)
    if check_finite is False or (check_finite is None and traced):
        return "off"
    return "checkify" if traced else "eager"


def first_failing_step(fails: Callable[[int], bool], num_steps: int) -> Optional[int]:
    """The smallest ``s`` in ``1..num_steps`` with ``fails(s)``, by bisection (failure persists once
    reached: a NaN parameter stays NaN); ``None`` if even ``fails(num_steps)`` is false."""
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
    rerun: Optional[Callable[[int], Mapping[str, PyTree]]] = None,
    users: Optional[tuple[int, Callable[[int, int], Mapping[str, PyTree]]]] = None,
) -> None:
    """Raise ``NonFiniteError`` if an output is not finite (``mode`` from ``finite_check_mode``).

    The success path is one reduction (eager) or one ``checkify.check`` per leaf (traced). On
    failure, ``rerun(steps)`` (the user's outputs after its first ``steps`` local steps) finds the
    first bad step of a multi-step user; for an aggregate, ``users = (num_users, run(user, steps))``
    finds the first user whose own update is not finite, then its step.
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


def _fails(run: Callable[[int], Mapping[str, PyTree]]) -> Callable[[int], bool]:
    """``steps -> whether run(steps)`` holds a non-finite value."""
    return lambda steps: not all_finite(list(run(steps).values()))


def _locate(cfg: UserConfig, rerun, users) -> str:
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


# ----------------------------------------------------------------------------------------------
# Entry points


def _checked_data(data: UserData, name: str) -> UserData:
    """``data`` with sequences made arrays (a new ``UserData``; the caller's is not changed)."""
    inputs, labels = as_array(data.inputs, f"{name}.inputs"), as_array(data.labels, f"{name}.labels")
    if inputs is data.inputs and labels is data.labels:
        return data
    return UserData(inputs=inputs, labels=labels)


def validate_user(model, payload, data, cfg, key, user_state, loss, function: str,
                  check_finite: Optional[bool]) -> UserData:
    """Every check of ``local_gradient`` / ``local_update`` before computing; returns ``data`` as arrays."""
    _check_types(model, payload, data, cfg, key, loss, check_finite, "data")
    check_user_kind(cfg, function)
    data = _checked_data(data, "data")
    inputs, labels = data.inputs, data.labels
    _check_dtypes(inputs, labels, loss, "data")
    _check_ranks(inputs, labels, function, "data", lead=1)
    dtype = jax.dtypes.canonicalize_dtype(inputs.dtype)
    _check_lengths(np.shape(inputs)[0], np.shape(labels)[0], dtype, cfg, "the user",
                   lambda: _one_example_hint(model, payload, inputs, dtype, function))
    example_shape = tuple(np.shape(inputs))[1:]
    check_payload(model, payload, example_shape, dtype, function, inputs)
    if payload.batch_stats is None and user_state is not None:
        _check_state(model, user_state, example_shape, dtype, "user_state")
    _check_label_shape(model, example_shape, dtype, labels, loss, "data", lead=1)
    used = (inputs[: cfg.num_data_points], labels[: cfg.num_data_points])
    if is_concrete(*used):
        _check_label_values(model, example_shape, dtype, *used, "data", lead=1, loss=loss)
    if check_finite is not False and _on_host(used[0], payload, user_state):
        check_finite_inputs({"data.inputs": used[0], "payload": payload, "user_state": user_state})
    return data


def check_strategy(strategy: Any) -> None:
    """``strategy`` is ``None`` or a ``fedjax_users.strategy.Strategy`` (which checks its own fields)."""
    from fedjax_users.strategy import Strategy

    if strategy is not None and not isinstance(strategy, Strategy):
        raise InputTypeError(f"strategy must be a fedjax_users.strategy.Strategy or None, got {type(strategy).__name__}")


def validate_users(model, payload, users_data, cfg, key, users_state, loss, check_finite: Optional[bool],
                   num_users: Optional[int] = None) -> UserData:
    """Every check of ``aggregate`` before computing; returns ``users_data`` as arrays.

    ``num_users``: ``users_data`` is the first user of a cohort of that many (``fedjax_users.cohort``),
    whose other users ``check_chunk`` checks as they load.
    """
    _check_types(model, payload, users_data, cfg, key, loss, check_finite, "users_data")
    check_user_kind(cfg, "aggregate")
    users_data = _checked_data(users_data, "users_data")
    inputs, labels = users_data.inputs, users_data.labels
    _check_dtypes(inputs, labels, loss, "users_data")
    _check_ranks(inputs, labels, "aggregate", "users_data", lead=2)
    num_users = num_users or np.shape(inputs)[0]
    if cfg.is_aggregate and cfg.user_range is not None and cfg.num_users != num_users:
        raise InputError(
            f"user_range {list(cfg.user_range)} names {cfg.num_users} users, users_data holds {num_users}"
        )
    if np.shape(labels)[0] != np.shape(inputs)[0]:
        raise InputError(f"inputs hold {np.shape(inputs)[0]} users, labels hold {np.shape(labels)[0]}")
    dtype = jax.dtypes.canonicalize_dtype(inputs.dtype)
    _check_lengths(np.shape(inputs)[1], np.shape(labels)[1], dtype, cfg, "each user")
    example_shape = tuple(np.shape(inputs))[2:]
    check_payload(model, payload, example_shape, dtype, "aggregate")
    if payload.batch_stats is None and users_state is not None:
        _check_state(model, users_state, example_shape, dtype, "users_state", lead=(num_users,))
    _check_label_shape(model, example_shape, dtype, labels, loss, "users_data", lead=2)
    used = (inputs[:, : cfg.num_data_points], labels[:, : cfg.num_data_points])
    if is_concrete(*used):
        _check_label_values(model, example_shape, dtype, *used, "users_data", lead=2, loss=loss)
    if check_finite is not False and _on_host(used[0], payload, users_state):
        check_finite_inputs({"users_data.inputs": used[0], "payload": payload, "users_state": users_state})
    return users_data


def check_chunk(model, payload, inputs, labels, loss, check_finite: Optional[bool]) -> None:
    """A streamed chunk's examples ``[users, examples, ...]`` (host arrays) as ``validate_users`` checks a cohort's.

    The shapes are those of the first user, checked before computing; a later user may still
    hold a label outside the model's classes or a non-finite input, found here before its chunk runs.
    """
    example_shape, dtype = tuple(np.shape(inputs))[2:], jax.dtypes.canonicalize_dtype(inputs.dtype)
    _check_label_values(model, example_shape, dtype, inputs, labels, "users_data", lead=2, loss=loss)
    if check_finite is not False:
        check_finite_inputs({"users_data.inputs": inputs})
