"""Differentiability contract: the users are differentiable in ``data.inputs`` and ``payload.params``.

Gradient-inversion attacks written in JAX differentiate *through the user*:
``jax.grad(lambda x: distance(fu.local_update(model, payload, fu.UserData(inputs=x, labels=y), cfg,
key)[0].gradients, observed))``. This file holds ``local_gradient``, ``local_update`` and
``aggregate`` to that, under ``jax.grad``, ``jax.jvp``, ``jax.jit`` and ``jax.vmap``, with every
defence (clipping, noise under a fixed key), both BatchNorm modes, ragged and scanned local steps,
and every fast path the code may take:

* in float64, forward mode (``jvp``), reverse mode (``grad``) and central differences along a
  random direction of (inputs, params) agree;
* each fast path gives the derivatives of the plain path: im2col convolutions, chunks of users, the
  summed single-step gradient and several devices in ``aggregate`` against the users one by one;
  chunked and ``vmap`` clipping against one chunk of the fast clipping; scanned local steps
  against unrolled ones. Each path is forced with a ``fedjax_users.strategy.Strategy``, and the
  test checks that it is the one that ran;
* ``vmap`` over candidate batches and over server models equals one call per candidate / model.

What is differentiated is a fixed random linear functional of everything the user shares (its
update and buffers): every shared entry contributes with its own weight, so a wrong derivative of
any one of them shows, where a distance such as an attack's could average it away.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_users as fu
from fedjax_users import losses, models, users
from fedjax_users.models import resnets
from fedjax_users.strategy import Strategy, clipping

Array = jax.Array
PyTree = Any
# (inputs, params, labels, key) -> every float array the user shares
UserFn = Callable[[Array, PyTree, Array, Array], list]
GradFn = Callable[[Array, PyTree, Array, Array], tuple[Array, PyTree]]

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

CLASSES = 3
LEARNING_RATE = 0.3
USER_KEY = 3
# Central-difference step. In float64 its truncation error (step^2 times the third derivative)
# and its rounding error (1e-16 / step of the objective) both stay near 1e-9 of the derivative.
STEP = 1e-5
# jvp against central differences: the errors measured here are 1e-10..1e-8 of the derivative; a
# missing or wrong term of the chain rule is of the derivative's own size.
CENTRAL_RTOL = 1e-6
# jvp against grad: both exact, they differ by float64 rounding only.
MODES_RTOL = 1e-10
# Fast path against plain path: float64 summation order only (relative to the largest entry).
PATH_RTOL = 1e-9

# Clipping bounds (single-step users, multi-step users). Single-step users clip each example's
# gradient, whose norms on this data lie within ~1.0..1.7 ("bn") and ~2.1..4.7 ("conv");
# multi-step users clip each step's batch gradient, ~0.5..1.1 and ~0.8..4.6 for the first steps.
# So the bounds clip some gradients and not others (test_clip_bounds_clip_some_gradients_and_not_others).
CLIP = {"bn": (1.3, 0.8), "conv": (3.0, 2.0)}
SHAPES = {"bn": (5, 5, 2), "conv": (8, 8, 3)}


# The programs here are tiny and run once, and XLA:CPU's LLVM optimisations took most of their
# compile time (1.5-3x less without, measured on two of them). The option changes how a program is
# compiled, not what it computes; the users' own jits are inlined into these outer programs.
TEST_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit(fn: Callable) -> Callable:
    """``jax.jit`` with ``TEST_COMPILER_OPTIONS``."""
    return jax.jit(fn, compiler_options=TEST_COMPILER_OPTIONS)


@pytest.fixture(autouse=True)
def x64():
    """Every test of this file runs in float64."""
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------------------------
# Cases: a tiny float64 model, data, and the user as a function of (inputs, params)


def make_model(kind: str):
    """``bn``: conv -> BatchNorm -> ReLU -> mean -> Dense (a ResNet stem alone); ``conv``: LeNetZhu."""
    if kind == "bn":
        return resnets.ResNet(num_classes=CLASSES, num_channels=2, stage_sizes=(), width=3, param_dtype=jnp.float64)
    # Sigmoid convolutions: smooth, so no kink lies between the central-difference points.
    return models.get("lenet_zhu", num_classes=CLASSES, param_dtype=jnp.float64)


@dataclasses.dataclass(frozen=True)
class Case:
    """One user computation to differentiate."""

    user: str  # "local_gradient" | "local_update" | "aggregate"
    model: str = "bn"
    buffers: bool = False  # the server sends BatchNorm buffers: eval mode; else train mode
    steps: int = 1
    per_step: int = 2
    points: int = 4
    clip: bool = False
    noise: float = 0.0  # gradient and input noise, drawn from the fixed user key
    users: int = 3  # an aggregate's; single users are user 0 of the same data
    # How it runs; an aggregate's devices and chunk default to one device and all users (strategy_for).
    strategy: Strategy = Strategy()

    def config(self) -> fu.UserConfig:
        """The user config of this case."""
        fields = dict(
            user_type="multiuser_aggregate" if self.user == "aggregate" else self.user,
            num_data_points=self.points,
            provide_buffers=True,
            local_diff_privacy=dict(
                per_example_clipping=CLIP[self.model][self.steps > 1] if self.clip else 0.0,
                gradient_noise=self.noise,
                input_noise=self.noise,
                distribution="gaussian",
            ),
        )
        if self.user == "aggregate":
            fields["user_range"] = [0, self.users]
        if self.steps > 1 or self.user == "local_update":
            fields.update(
                num_local_updates=self.steps,
                num_data_per_local_update_step=self.per_step,
                local_learning_rate=LEARNING_RATE,
            )
        return fu.UserConfig.from_dict(fields)

    def strategy_for(self) -> Strategy:
        """The strategy the user runs with: an aggregate on one device, whatever the test process
        holds, and its users in one chunk unless the case says otherwise (no chunk-sizing compile)."""
        if self.user != "aggregate":
            return self.strategy
        return self.strategy.replace(
            devices=self.strategy.devices or tuple(jax.devices()[:1]),
            users_per_chunk=self.strategy.users_per_chunk or self.users,
        )

    def alone(self) -> "Case":
        """One of this aggregate's users on its own, run the default way."""
        user = "local_update" if self.steps > 1 else "local_gradient"
        return dataclasses.replace(self, user=user, strategy=Strategy())


@functools.lru_cache(maxsize=None)
def init_variables(model, shape: tuple[int, ...]) -> PyTree:
    """``model``'s variables for float64 inputs of ``shape`` (one jitted init per model and shape)."""
    return jax.jit(model.init)(jax.random.key(2), jnp.zeros((1,) + tuple(shape), jnp.float64))


@functools.lru_cache(maxsize=None)
def case_data(case: Case) -> tuple[fu.ServerPayload, Array, Array]:
    """Server payload, inputs and labels: ``[users, points, ...]`` for an aggregate, user 0's otherwise."""
    model = make_model(case.model)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.standard_normal((case.users, case.points) + SHAPES[case.model]))
    labels = jnp.asarray(rng.integers(0, CLASSES, (case.users, case.points)), jnp.int32)
    variables = init_variables(model, inputs.shape[2:])
    stats = None
    if case.buffers and "batch_stats" in variables:
        # Non-trivial server statistics: those of other data.
        other = jnp.asarray(1.5 * rng.standard_normal(inputs.shape[1:]) + 0.5)
        batch = lambda v, x: model.apply(v, x, train=True, momentum=1.0, mutable=["batch_stats"])[1]  # noqa: E731
        stats = jax.jit(batch)(variables, other)["batch_stats"]
    payload = fu.ServerPayload(params=variables["params"], batch_stats=stats)
    if case.user != "aggregate":
        inputs, labels = inputs[0], labels[0]
    return payload, inputs, labels


def case_args(case: Case) -> tuple[Array, PyTree, Array, Array]:
    """The arguments of ``user_fn(case)``: inputs, server params, labels, key."""
    payload, inputs, labels = case_data(case)
    return inputs, payload.params, labels, jax.random.key(USER_KEY)


def float_leaves(tree: PyTree) -> list:
    """The floating-point leaves of ``tree`` (``num_batches_tracked`` is an integer count)."""
    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]


def user_fn(case: Case) -> UserFn:
    """The user of ``case`` as a function of (inputs, params, labels, key): every float array it shares."""
    model, cfg, strategy = make_model(case.model), case.config(), case.strategy_for()
    stats = case_data(case)[0].batch_stats

    def shared(inputs: Array, params: PyTree, labels: Array, key: Array) -> list:
        server = fu.ServerPayload(params=params, batch_stats=stats)
        data = fu.UserData(inputs=inputs, labels=labels)
        if case.user == "aggregate":
            out, _ = fu.aggregate(model, server, data, cfg, key, strategy=strategy)
        else:
            out, _, _ = getattr(fu, case.user)(model, server, data, cfg, key, strategy=strategy)
        return float_leaves((out.gradients, out.batch_stats))

    return shared


def probe(outputs: list) -> Array:
    """A fixed random linear functional of ``outputs`` (each leaf's weights drawn from its index and shape)."""
    total = jnp.zeros((), jnp.float64)
    for index, leaf in enumerate(outputs):
        # NumPy draws at trace time: constants in the program, where jax.random would add a
        # threefry hash per leaf for XLA to compile.
        weights = np.random.default_rng([index, *leaf.shape]).standard_normal(leaf.shape)
        total = total + jnp.vdot(jnp.asarray(weights, leaf.dtype), leaf)
    return total


def probe_grad(fn: UserFn) -> GradFn:
    """``grad`` of the probed user with respect to (inputs, params), not jitted."""
    return jax.grad(lambda x, p, y, k: probe(fn(x, p, y, k)), argnums=(0, 1))


def tree_vdot(a: PyTree, b: PyTree) -> Array:
    """Sum of the leaves' inner products."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def random_like(tree: PyTree, seed: int) -> PyTree:
    """A standard normal tree shaped like ``tree`` (NumPy: no program to compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype), tree)


def assert_same_derivatives(got: PyTree, want: PyTree, rtol: float = PATH_RTOL) -> None:
    """Equal trees up to ``rtol`` of the largest entry (an exactly-zero derivative holds only rounding)."""
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(want))
    assert scale > 0
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=rtol * scale)


def has_scan(fn: Callable, *args) -> bool:
    """Whether ``fn``'s program holds a ``lax.scan`` (nested jaxprs included)."""
    return " scan[" in str(jax.make_jaxpr(fn)(*args))


# ----------------------------------------------------------------------------------------------
# jvp, grad and central differences


DERIVATIVE_CASES = {
    "local_gradient/conv": Case("local_gradient", model="conv"),
    "local_gradient/conv/clip": Case("local_gradient", model="conv", clip=True),
    "local_gradient/bn-train/clip": Case("local_gradient", clip=True),
    "local_gradient/bn-eval/noise": Case("local_gradient", buffers=True, noise=0.1),
    # 5 points in steps of 2: the third step holds one example.
    "local_update/bn-train/ragged/clip": Case("local_update", steps=3, points=5, clip=True),
    "local_update/bn-eval/ragged/noise": Case("local_update", buffers=True, steps=3, points=5, noise=0.1),
    # The summed single-step gradient; 3 users in chunks of 2: the last chunk repeats a user.
    "aggregate/single/bn-train/noise": Case("aggregate", noise=0.1, strategy=Strategy(users_per_chunk=2)),
    "aggregate/single/bn-eval/clip": Case("aggregate", buffers=True, clip=True, strategy=Strategy(users_per_chunk=2)),
    # im2col convolutions, both chunks in one scan.
    "aggregate/multi/bn-train/ragged/im2col": Case(
        "aggregate", steps=3, points=5, strategy=Strategy(users_per_chunk=2, per_user_convs=True)
    ),
}
# Noise (gradient and input, from the fixed key) is in a few cases only: each noise draw is a
# threefry hash that doubles the time XLA takes to compile a user.
# More local steps than the default strategy unrolls run as a lax.scan over masked steps; 17 steps
# of 2 over 5 points are ragged and wrap around the data several times.
SCANNED_STEPS = Strategy().max_unrolled_steps + 1
SCANNED_CASES = {
    "local_update/bn-train/scanned/clip": Case("local_update", steps=SCANNED_STEPS, points=5, clip=True),
    "aggregate/multi/bn-eval/scanned/im2col": Case(
        "aggregate", buffers=True, steps=SCANNED_STEPS, points=5, users=2, strategy=Strategy(per_user_convs=True)
    ),
}


def check_against_central_differences(case: Case, seed: int = 6) -> None:
    """jvp, grad and central differences of the probed user along one random direction agree."""
    fn = user_fn(case)
    inputs, params, labels, key = case_args(case)
    primal = (inputs, params)
    tangent = random_like(primal, seed)

    @jit
    def measure(primal, tangent):
        objective = lambda p: probe(fn(*p, labels, key))  # noqa: E731
        shifted = lambda s: jax.tree_util.tree_map(lambda p, t: p + s * t, primal, tangent)  # noqa: E731
        _, forward = jax.jvp(objective, (primal,), (tangent,))
        reverse = tree_vdot(jax.grad(objective)(primal), tangent)
        central = (objective(shifted(STEP)) - objective(shifted(-STEP))) / (2 * STEP)
        return forward, reverse, central

    forward, reverse, central = (float(v) for v in measure(primal, tangent))
    assert abs(central) > 1e-3, "the direction should see a derivative"
    assert abs(forward - central) <= CENTRAL_RTOL * abs(central), (forward, central)
    assert abs(reverse - forward) <= MODES_RTOL * abs(central), (reverse, forward)


@pytest.mark.parametrize("name", list(DERIVATIVE_CASES))
def test_derivatives_match_central_differences(name):
    check_against_central_differences(DERIVATIVE_CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCANNED_CASES))
def test_scanned_steps_match_central_differences(name):
    check_against_central_differences(SCANNED_CASES[name])


@pytest.mark.parametrize("kind,buffers", [("bn", False), ("bn", True), ("conv", False)])
def test_clip_bounds_clip_some_gradients_and_not_others(kind, buffers):
    # The clipping cases test clipping only if their bounds lie inside the range of the norms:
    # those of single examples, and of the first two steps' batches of 2, over all users' data.
    model = make_model(kind)
    payload, inputs, labels = case_data(Case("aggregate", model=kind, buffers=buffers, points=5))
    stats = payload.batch_stats if buffers else users.initial_batch_stats(model, inputs[0])

    @jit
    def norm(x, y):
        def loss(p):
            variables = {"params": p, "batch_stats": stats} if stats else {"params": p}
            logits, _ = model.apply(variables, x, train=not buffers, mutable=["batch_stats"])
            return jnp.mean(losses.softmax_cross_entropy(logits, y))

        return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(jax.grad(loss)(payload.params))))

    per_example = jax.vmap(jax.vmap(lambda x, y: norm(x[None], y[None])))(inputs, labels)
    per_step = jax.vmap(lambda x, y: jnp.stack([norm(x[:2], y[:2]), norm(x[2:4], y[2:4])]))(inputs, labels)
    for norms, bound in ((per_example, CLIP[kind][0]), (per_step, CLIP[kind][1])):
        assert float(jnp.min(norms)) < bound < float(jnp.max(norms)), (kind, norms)


# ----------------------------------------------------------------------------------------------
# aggregate's paths against the users one by one


MULTI = Case("aggregate", steps=3, points=5)
# The summed path adds each user's gradient noise to the summed gradient itself: noise on.
SINGLE = Case("aggregate", noise=0.1)


def with_strategy(case: Case, **fields) -> Case:
    """``case`` run with a strategy of these fields."""
    return dataclasses.replace(case, strategy=Strategy(**fields))


# name: (case, what aggregate must choose: users per chunk, im2col convolutions)
AGGREGATE_PATHS = {
    "multi/one-chunk/im2col": (with_strategy(MULTI, per_user_convs=True), (3, True)),
    "multi/one-chunk/grouped-convs": (with_strategy(MULTI, per_user_convs=False), (3, False)),
    # One user per chunk has one set of kernels: plain convolutions even when im2col is asked for.
    "multi/chunks-of-1": (with_strategy(MULTI, users_per_chunk=1, per_user_convs=True), (1, False)),
    "multi/chunks-of-2/im2col": (with_strategy(MULTI, users_per_chunk=2, per_user_convs=True), (2, True)),
    # The last chunk repeats a user, who must count once.
    "single/summed/chunks-of-2": (with_strategy(SINGLE, users_per_chunk=2), (2, False)),
    "single/clip/chunks-of-2": (
        with_strategy(dataclasses.replace(SINGLE, buffers=True, clip=True), users_per_chunk=2), (2, False)
    ),
}


def users_one_by_one(case: Case) -> tuple[Array, PyTree]:
    """The plain path: derivatives of the mean of each user computed alone, with the key aggregate gives it."""
    inputs, params, labels, key = case_args(case)
    grad = jit(probe_grad(user_fn(case.alone())))
    keys = jax.random.split(key, case.users)
    # The probe is linear: the probe of the mean of the users' updates is the mean of their probes.
    per_user = [grad(inputs[u], params, labels[u], keys[u]) for u in range(case.users)]
    d_inputs = jnp.stack([d for d, _ in per_user]) / case.users
    d_params = jax.tree_util.tree_map(lambda *ds: sum(ds) / case.users, *[d for _, d in per_user])
    return d_inputs, d_params


@functools.lru_cache(maxsize=None)
def plain_derivatives(case: Case) -> tuple[Array, PyTree]:
    """``users_one_by_one`` of ``case`` whatever its strategy, computed once."""
    return users_one_by_one(dataclasses.replace(case, strategy=Strategy()))


def params_marking_slow(names, slow: set) -> list:
    """``names`` as pytest params, those in ``slow`` marked ``slow``."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


@pytest.mark.parametrize("name", params_marking_slow(AGGREGATE_PATHS, {"multi/chunks-of-1"}))
def test_aggregate_paths_give_the_derivatives_of_the_users_one_by_one(name):
    case, expected = AGGREGATE_PATHS[name]
    inputs, params, labels, key = case_args(case)
    payload = fu.ServerPayload(params=params, batch_stats=case_data(case)[0].batch_stats)
    chosen = fu.choose_strategy(make_model(case.model), payload, fu.UserData(inputs=inputs, labels=labels),
                                case.config(), case.strategy_for())
    assert (chosen.users_per_chunk, chosen.per_user_convs) == expected
    got = jit(probe_grad(user_fn(case)))(inputs, params, labels, key)
    assert_same_derivatives(got, plain_derivatives(case))


def check_four_devices_equal_one() -> None:
    """``aggregate``'s derivatives with its users sharded over 4 devices equal those on one device."""
    assert jax.device_count() >= 4, "needs XLA_FLAGS=--xla_force_host_platform_device_count=4"
    with jax.enable_x64(True):
        # 5 users over 4 devices: padded to 8, the padding users carry no weight.
        for case in (with_strategy(dataclasses.replace(MULTI, users=5), users_per_chunk=2, per_user_convs=True),
                     with_strategy(dataclasses.replace(SINGLE, users=5, noise=0.0), users_per_chunk=1)):
            args = case_args(case)
            one = jit(probe_grad(user_fn(case)))(*args)
            four_devices = dataclasses.replace(case, strategy=case.strategy.replace(devices=jax.devices()[:4]))
            four = jit(probe_grad(user_fn(four_devices)))(*args)
            assert_same_derivatives(four, one)


@pytest.mark.slow
def test_four_devices_give_the_derivatives_of_one():
    if jax.device_count() >= 4:  # the test command's XLA_FLAGS
        check_four_devices_equal_one()
        return
    # JAX fixes the device count at start-up: a child process with four CPU devices.
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    script = (
        f"import sys; sys.path[:0] = [{TESTS!r}, {REPO!r}]; import test_differentiability as t; "
        "t.check_four_devices_equal_one(); print('four devices ok')"
    )
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and "four devices ok" in child.stdout, (child.stdout + child.stderr)[-4000:]


# ----------------------------------------------------------------------------------------------
# Clipping and local steps: forced paths against the default ones


CLIPPED = Case("local_gradient", points=5, clip=True)


def recorded(fn: Callable, log: list) -> Callable:
    """``fn`` that also appends each call's result to ``log``."""

    def call(*args, **kwargs):
        log.append(fn(*args, **kwargs))
        return log[-1]

    return call


def test_chunked_and_vmap_clipping_give_the_derivatives_of_one_chunk(monkeypatch):
    args = case_args(CLIPPED)
    # Spies, to see which path each strategy took (each strategy traces its own program).
    bounds, layers = [], []
    monkeypatch.setattr(clipping, "chunk_bounds", recorded(clipping.chunk_bounds, bounds))
    monkeypatch.setattr(clipping, "fast_layers", recorded(clipping.fast_layers, layers))
    whole = jit(probe_grad(user_fn(CLIPPED)))(*args)
    # One chunk of the 5 examples, the conv and dense kernels on the fast path.
    assert bounds == [[(0, 5)]] and len(layers[-1]) == 2

    # Chunks of 2 examples (the last one short), as auto_examples_per_chunk makes of large batches.
    chunked = jit(probe_grad(user_fn(with_strategy(CLIPPED, examples_per_chunk=2))))(*args)
    assert bounds[-1] == [(0, 2), (2, 4), (4, 5)]
    assert_same_derivatives(chunked, whole)

    # Every parameter's per-example gradient from vmap(grad).
    layers.clear()
    plain = jit(probe_grad(user_fn(with_strategy(CLIPPED, fast_clipping=False))))(*args)
    assert not layers and bounds[-1] == [(0, 5)]
    assert_same_derivatives(plain, whole)


def test_scanned_steps_give_the_derivatives_of_unrolled_steps():
    # 4 ragged steps of 2 over 5 points (the fourth wraps to the start); batch clipping in every step.
    case = Case("local_update", steps=4, points=5, clip=True)
    args = case_args(case)
    unrolled_fn, scanned_fn = user_fn(case), user_fn(with_strategy(case, max_unrolled_steps=1))
    assert not has_scan(unrolled_fn, *args) and has_scan(scanned_fn, *args)
    assert_same_derivatives(jit(probe_grad(scanned_fn))(*args), jit(probe_grad(unrolled_fn))(*args))


# ----------------------------------------------------------------------------------------------
# vmap over candidate batches and over server models


def perturbed(tree: PyTree, count: int, seed: int) -> PyTree:
    """``count`` copies of ``tree`` stacked, each moved by 10% noise."""
    return jax.tree_util.tree_map(
        lambda leaf, *noise: jnp.stack([leaf + 0.1 * n for n in noise]),
        tree, *[random_like(tree, seed + i) for i in range(count)],
    )


VMAP_CASES = {
    # name: (case, vmap over inputs, vmap over params)
    "local_gradient/bn-train/clip/candidates": (CLIPPED, True, False),
    "local_update/bn-eval/ragged/server-models": (Case("local_update", buffers=True, steps=3, points=5), False, True),
    "aggregate/multi/im2col/candidates+server-models": (
        with_strategy(MULTI, users_per_chunk=2, per_user_convs=True), True, True,
    ),
}


@pytest.mark.parametrize("name", params_marking_slow(VMAP_CASES, {"aggregate/multi/im2col/candidates+server-models"}))
def test_vmap_equals_one_call_per_candidate_and_server_model(name):
    case, over_inputs, over_params = VMAP_CASES[name]
    inputs, params, labels, key = case_args(case)
    inputs = perturbed(inputs, 2, 10) if over_inputs else inputs
    params = perturbed(params, 2, 20) if over_params else params
    grad = probe_grad(user_fn(case))
    axes = (0 if over_inputs else None, 0 if over_params else None, None, None)
    batched = jit(jax.vmap(grad, in_axes=axes))(inputs, params, labels, key)
    take = lambda tree, i, batched_axis: jax.tree_util.tree_map(lambda a: a[i], tree) if batched_axis else tree  # noqa: E731
    single = jit(grad)
    for i in range(2):
        each = single(take(inputs, i, over_inputs), take(params, i, over_params), labels, key)
        assert_same_derivatives(jax.tree_util.tree_map(lambda a: a[i], batched), each)
