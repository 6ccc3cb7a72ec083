"""Gradient inversion through the exact user: reconstruct a user's images from what it shares.

The attacker holds the server's model and payload, observes the user's shared update and runs the
*same* user function (``fu.local_gradient`` / ``fu.local_update``) on candidate images, moving them
by Adam on a distance between the candidates' update and the observed one, as "Inverting Gradients"
(Geiping et al., 2020; breaching's ``invertinggradients`` attack) does: cosine distance of the
whole update plus total variation, Adam with a decaying step, images kept in the data range
[0, 1], several random restarts (run side by side under ``jax.vmap``), the restart with the best
objective kept. Differentiating
through the user itself means every step the user took (clipping, local SGD steps, BatchNorm
modes) is part of the attacker's model of it; see ``docs/attacks.md``.

The attack is one ``lax.scan`` over its steps, each step batched over the observations and
restarts attacked together. On XLA:CPU the step's convolutions are rewritten into the form its
Eigen kernels run (``fedjax_users.convolutions``): left as XLA compiles them inside a loop they
made each step of the attack on lenet_zhu about twice as slow (docs/performance.md).

``python -m fedjax_users.attacks`` inverts a shipped digit image (``fedjax_users/data/digits.npz``)
from a ``local_gradient`` and a 2-step ``local_update`` of ``lenet_zhu``, once with the user's true
update and once with another image's, prints the PSNR of each reconstruction and writes the
originals and reconstructions as an image grid (``--out``; default
``runs/attack-<timestamp>/attack_grid.png``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

import fedjax_users as fu
from fedjax_users import convolutions, models, plots, runs
from fedjax_users.data.sources import embedded_digits
from fedjax_users.strategy.compilation import tracing
from fedjax_users.strategy.cpu import is_cpu

__all__ = [
    "GRID_COLUMNS",
    "GRID_FILE",
    "MODEL_SEED",
    "OBJECTIVES",
    "OPTIMIZERS",
    "SCHEDULES",
    "TRUE_INDEX",
    "USER_SEED",
    "AttackConfig",
    "Result",
    "UserUpdate",
    "brightness_blindness",
    "cosine_distance",
    "digit_images",
    "euclidean_distance",
    "example_server",
    "infer_label",
    "invert",
    "invert_each",
    "main",
    "mean_grey_psnr",
    "nearest_other_digit",
    "nearest_other_digit_psnr",
    "picture_output",
    "psnr",
    "run_example",
    "shared_update",
    "total_variation",
    "user_configs",
    "write_grid",
    "wrong_index",
]

Array = jax.Array
PyTree = Any
# (candidate images [N, H, W, C], context) -> the update the user would share for them; the
# context (e.g. the server's parameters and the labels) is traced, the function itself static.
UserUpdate = Callable[[Array, PyTree], PyTree]


# ----------------------------------------------------------------------------------------------
# Objective and score


def cosine_distance(a: PyTree, b: PyTree) -> Array:
    """``1 - <a, b> / (|a| |b|)`` over all leaves at once (breaching's ``CosineSimilarity`` objective).

    Args:
      a, b: two trees of the same structure (two updates).

    Returns:
      The distance, a scalar in [0, 2] (0: the same direction).

    Example::

        >>> float(cosine_distance({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}))
        1.0
    """
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    dot = sum(jnp.sum(x * y) for x, y in zip(leaves_a, leaves_b))
    norm_a = jnp.sqrt(sum(jnp.sum(x * x) for x in leaves_a))
    norm_b = jnp.sqrt(sum(jnp.sum(y * y) for y in leaves_b))
    return 1.0 - dot / (norm_a * norm_b)


def euclidean_distance(a: PyTree, b: PyTree) -> Array:
    """``0.5 * |a - b|^2`` over all leaves (breaching's ``Euclidean`` objective at scale 1).

    Args:
      a, b: two trees of the same structure (two updates).

    Returns:
      The distance, a scalar.

    Example::

        >>> float(euclidean_distance({"w": jnp.array([3.0, 0.0])}, {"w": jnp.array([0.0, 4.0])}))
        12.5
    """
    return 0.5 * sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def total_variation(images: Array) -> Array:
    """Mean absolute difference of horizontally and vertically adjacent pixels (NHWC).

    Args:
      images: ``[N, H, W, C]``.

    Returns:
      The horizontal mean plus the vertical mean, a scalar (0 for flat images).

    Example::

        >>> float(total_variation(jnp.array([[[[0.0], [1.0]], [[0.0], [1.0]]]])))  # vertical stripes
        1.0
    """
    dx = jnp.abs(images[:, :, 1:, :] - images[:, :, :-1, :])
    dy = jnp.abs(images[:, 1:, :, :] - images[:, :-1, :, :])
    return jnp.mean(dx) + jnp.mean(dy)


def psnr(reconstruction: Array, truth: Array, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``reconstruction`` against ``truth`` (both in [0, data_range]).

    Args:
      reconstruction, truth: images of the same shape (all of them scored as one).
      data_range: the images' range.

    Returns:
      ``10 log10(data_range^2 / MSE)``, the MSE floored at 1e-20 (equal images: 200 dB).

    Example::

        >>> round(psnr(np.full((2, 2), 0.5), np.zeros((2, 2))), 4)
        6.0206
    """
    mse = float(jnp.mean(jnp.square(jnp.asarray(reconstruction, jnp.float32) - jnp.asarray(truth, jnp.float32))))
    return float(10.0 * np.log10(data_range**2 / max(mse, 1e-20)))


def infer_label(update: PyTree, parameter_difference: bool = False,
                bias_path: Sequence[str] = ("fc", "0", "bias")) -> int:
    """The label of a single example from its softmax-cross-entropy update (iDLG, Zhao et al. 2020).

    The last layer's bias gradient is ``softmax - one_hot``: negative at the true label only. A
    parameter difference after local SGD steps on that one example is minus the learning rate
    times a sum of such gradients: positive at the label only.

    Args:
      update: the observed update of one example.
      parameter_difference: whether ``update`` is a parameter difference (multi-step users).
      bias_path: the keys of the last layer's bias in ``update`` (lenet_zhu's by default).

    Returns:
      The label.

    Example::

        >>> infer_label({"fc": {"0": {"bias": jnp.array([0.1, -0.9, 0.8])}}})
        1
    """
    bias = update
    for name in bias_path:
        bias = bias[name]
    return int(jnp.argmax(bias) if parameter_difference else jnp.argmin(bias))


# ----------------------------------------------------------------------------------------------
# The attack


OBJECTIVES = {"cosine": cosine_distance, "euclidean": euclidean_distance}
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("adam", "lbfgs")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Settings of ``invert`` (defaults: what ``python -m fedjax_users.attacks`` uses).

    ``objective``: ``"cosine"`` (Geiping et al., breaching's ``invertinggradients``) or
    ``"euclidean"`` (Zhu et al., breaching's ``deepleakage``). ``schedule``: the step size along
    the steps: ``"cosine"`` decay to 0, ``"step"`` (breaching's ``step-lr``: tenfold drops at 3/8,
    5/8 and 7/8 of the steps) or ``"constant"``. ``signed``: Adam on the signs of the candidate's
    gradient (breaching's ``signed: hard``). ``boxed``: keep the images in [0, 1] after every step.
    ``optimizer``: ``"adam"`` or ``"lbfgs"`` (optax's L-BFGS, whose zoom line search picks each
    step: ``learning_rate``, ``schedule`` and ``signed`` are then not used).

    Attributes:
      steps: the attack's steps.
      restarts: random starting images, attacked side by side; the best objective is kept.
      learning_rate: Adam's step size, in pixel units of [0, 1] images.
      tv_scale: the weight of ``total_variation`` in the objective.
      seed: the seed of the restarts' uniform [0, 1) starting images.
      objective: a key of ``OBJECTIVES``.
      schedule: one of ``SCHEDULES``.
      signed: Adam on the gradient's signs.
      boxed: clip the images to [0, 1] after every step.
      optimizer: one of ``OPTIMIZERS``.

    Raises:
      ValueError: an unknown optimizer, objective or schedule, ``steps`` or ``restarts`` not an int
        >= 1, ``learning_rate`` <= 0 or ``tv_scale`` < 0.

    Example::

        >>> AttackConfig(objective="euclidean", tv_scale=0.0).objective
        'euclidean'
    """

    steps: int = 400
    restarts: int = 3
    learning_rate: float = 0.1  # in pixel units of [0, 1] images
    tv_scale: float = 0.01
    seed: int = 0  # of the restarts' uniform [0, 1) starting images
    objective: str = "cosine"
    schedule: str = "cosine"
    signed: bool = False
    boxed: bool = True
    optimizer: str = "adam"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown attack optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown attack objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown attack schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        for name in ("steps", "restarts"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"attack {name} must be an int >= 1, got {getattr(self, name)!r}")
        if not (self.learning_rate > 0 and self.tv_scale >= 0):
            raise ValueError(f"attack learning_rate must be > 0 and tv_scale >= 0, got {self.learning_rate!r}, "
                             f"{self.tv_scale!r}")

    def step_sizes(self) -> optax.Schedule:
        """The step size at each step: ``schedule`` applied to ``learning_rate``.

        Returns:
          The optax schedule, step index -> step size.

        Example::

            >>> float(AttackConfig(steps=8, schedule="step", learning_rate=1.0).step_sizes()(7))  # after 3 drops
            0.0010000000474974513
        """
        if self.schedule == "cosine":
            return optax.cosine_decay_schedule(self.learning_rate, self.steps)
        if self.schedule == "step":
            # breaching's MultiStepLR milestones: max_iterations // 2.667, // 1.6, // 1.142 (floats,
            # floored); torch and optax both take the step at a milestone already decayed.
            drops = {int(self.steps // divisor): 0.1 for divisor in (2.667, 1.6, 1.142)}
            return optax.piecewise_constant_schedule(self.learning_rate, drops)
        return optax.constant_schedule(self.learning_rate)


def _objective(update: UserUpdate, observed: PyTree, context: PyTree, config: AttackConfig) -> Callable[[Array], Array]:
    """The distance (``config.objective``) of the candidates' update to the observed one, plus total variation."""
    distance = OBJECTIVES[config.objective]

    def objective(candidate: Array) -> Array:
        return distance(update(candidate, context), observed) + config.tv_scale * total_variation(candidate)

    return objective


def _step(update: UserUpdate, config: AttackConfig, optimizer: optax.GradientTransformation) -> Callable:
    """One step of one restart on one observation: ``(observed, context, candidate, state) -> (candidate, state)``."""
    lbfgs = config.optimizer == "lbfgs"

    def step(observed: PyTree, context: PyTree, candidate: Array, state: PyTree) -> tuple[Array, PyTree]:
        objective = _objective(update, observed, context, config)
        # Evaluated afresh rather than read from L-BFGS's line search: boxing moves the point.
        value, grad = jax.value_and_grad(objective)(candidate)
        if lbfgs:
            updates, state = optimizer.update(grad, state, candidate, value=value, grad=grad, value_fn=objective)
        else:
            grad = jnp.sign(grad) if config.signed else grad
            updates, state = optimizer.update(grad, state, candidate)
        candidate = optax.apply_updates(candidate, updates)
        if config.boxed:  # as breaching's boxed attacks: the images stay in the data range
            candidate = jnp.clip(candidate, 0.0, 1.0)
        return candidate, state

    return step


@functools.partial(jax.jit, static_argnames=("update", "config", "shape", "context_axes", "rewrite"))
def _invert_each(update: UserUpdate, observed: PyTree, context: PyTree, config: AttackConfig, shape: tuple[int, ...],
                 context_axes: Any, rewrite: bool) -> tuple[Array, Array]:
    """Every observation's every restart: final candidates ``[K, restarts, *shape]``, objectives ``[K, restarts]``.

    One loop over the steps of a step batched over observations and restarts (not a batch of
    loops), so that ``rewrite`` (``convolutions.canonical``) sees the batched program whose
    convolutions run in the loop.
    """
    # The default is a cosine decay, not breaching's tenfold drops at 3/8, 5/8 and 7/8 of the run:
    # it ended higher in the few-hundred-step runs tried for docs/attacks.md.
    optimizer = optax.lbfgs() if config.optimizer == "lbfgs" else optax.adam(config.step_sizes())
    restarts = jax.vmap(_step(update, config, optimizer), in_axes=(None, None, 0, 0))
    step = jax.vmap(restarts, in_axes=(0, context_axes, 0, 0))
    step = convolutions.canonical(step) if rewrite else step
    count = jax.tree_util.tree_leaves(observed)[0].shape[0]
    # Every observation starts from the same images: each is attacked as it would be alone.
    starts = jax.random.uniform(jax.random.key(config.seed), (config.restarts,) + shape)
    starts = jnp.broadcast_to(starts, (count,) + starts.shape)
    carry = (starts, jax.vmap(jax.vmap(optimizer.init))(starts))
    (finals, _), _ = jax.lax.scan(lambda carry, _: (step(observed, context, *carry), None), carry, None,
                                  length=config.steps)
    value = lambda o, c, x: _objective(update, o, c, config)(x)
    values = jax.vmap(jax.vmap(value, in_axes=(None, None, 0)), in_axes=(0, context_axes, 0))(observed, context, finals)
    return finals, values


def _rewrites() -> bool:
    """Whether the attack's convolutions are rewritten (``convolutions.canonical``): on XLA:CPU, whose loops need it."""
    return is_cpu()


def invert(update: UserUpdate, observed: PyTree, context: PyTree, shape: Sequence[int],
           config: AttackConfig = AttackConfig()) -> Array:
    """Candidate images of ``shape`` whose update ``update(candidate, context)`` best matches ``observed``.

    ``update`` is a static argument of the compiled attack: reuse one function object (not a fresh
    ``lambda`` per call) and the attack compiles once for all observations of that shape.

    Args:
      update: the attacker's model of the user, ``(candidate images, context) -> update``.
      observed: the observed update.
      context: what ``update`` takes besides the images (e.g. the server's parameters, the labels).
      shape: the candidate images' shape ``[N, H, W, C]``.
      config: the attack's settings.

    Returns:
      The restart with the lowest objective (the attacker does not know the true images), ``shape``.

    Example::

        >>> def update(candidate, weight):  # a user that shares its images times a weight
        ...     return {"w": candidate * weight}
        >>> observed = update(jnp.full((1, 2, 2, 1), 0.5), 2.0)
        >>> config = AttackConfig(steps=50, restarts=1, objective="euclidean")
        >>> found = invert(update, observed, 2.0, (1, 2, 2, 1), config)
        >>> bool(jnp.all(jnp.abs(found - 0.5) < 0.05))
        True
    """
    one = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf)[None], observed)
    finals, values = _invert_each(update, one, context, config, tuple(shape), None, _rewrites())
    return finals[0, jnp.argmin(values[0])]


def invert_each(update: UserUpdate, observed: PyTree, context: PyTree, shape: Sequence[int],
                config: AttackConfig = AttackConfig(), context_axes: Any = 0) -> tuple[Array, Array]:
    """``invert`` of several observations at once, side by side under ``jax.vmap``.

    Every observation is attacked through the same ``update`` (one compile for all of them), from
    the same starting images, as ``invert`` would attack it alone; on XLA:CPU the convolutions of
    observations and restarts that share the server's weights run as one batched convolution,
    the others one per observation (``convolutions.canonical``), and the observations are split
    into as many equal chunks as the process has cores, attacked side by side from threads.

    Args:
      update: the attacker's model of the user, as for ``invert``.
      observed: the observed updates stacked on a leading axis ``[K, ...]``.
      context: the context of each observation; ``context_axes`` says which of its leaves are
        stacked (``0``) and which are shared (``None``), as ``jax.vmap``'s ``in_axes``.
      shape: the candidate images' shape ``[N, H, W, C]`` (one observation's).
      config: the attack's settings.
      context_axes: ``in_axes`` of ``context`` (default: every leaf stacked); a tuple, not a list.

    Returns:
      ``(reconstructions [K, *shape], objective [K])``: each observation's best restart and its
      objective value.

    Example::

        >>> def update(candidate, weight):  # a user that shares its images times a weight
        ...     return {"w": candidate * weight}
        >>> weights, truths = jnp.array([1.0, 2.0]), jnp.array([0.2, 0.8])  # two users, each its own weight
        >>> observed = {"w": jnp.stack([update(jnp.full((1, 2, 2, 1), t), w)["w"] for t, w in zip(truths, weights)])}
        >>> config = AttackConfig(steps=50, restarts=1, objective="euclidean")
        >>> recs, values = invert_each(update, observed, weights, (1, 2, 2, 1), config)
        >>> recs.shape, bool(jnp.all(jnp.abs(recs - truths[:, None, None, None, None]) < 0.05))
        ((2, 1, 2, 2, 1), True)
    """
    rewrite = _rewrites()
    run = functools.partial(_invert_each, update, config=config, shape=tuple(shape), context_axes=context_axes,
                            rewrite=rewrite)
    count = jax.tree_util.tree_leaves(observed)[0].shape[0]
    parts = min(count, _cores()) if rewrite and not tracing(observed, context) else 1  # threads need values
    finals, values = run(observed, context) if parts == 1 else _in_parts(run, observed, context, context_axes, count,
                                                                         parts)
    best = jnp.argmin(values, axis=1)
    return jax.vmap(lambda f, b: f[b])(finals, best), jnp.min(values, axis=1)


def _cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _in_parts(run: Callable, observed: PyTree, context: PyTree, context_axes: Any, count: int,
              parts: int) -> tuple[Array, Array]:
    """``run(observed, context)`` on ``parts`` equal chunks of the rows at once, one thread each.

    XLA:CPU ran one attack program on one core (4 rows of lenet_zhu's attack: 0.55 ms a row and
    step); two programs of 2 rows called from two threads ran side by side, 0.44 ms (both under
    another job's load; docs/performance.md). The chunks are equal so that they share one compile:
    the last one is filled up by repeating the last row, whose results are dropped.
    """
    size = -(-count // parts)
    rows = np.minimum(np.arange(parts * size), count - 1).reshape(parts, size)

    def chunk(i: int) -> tuple[Array, Array]:
        take = lambda tree: jax.tree_util.tree_map(lambda leaf: leaf[rows[i]], tree)
        stacked = jax.tree_util.tree_map(lambda axis, sub: sub if axis is None else take(sub), context_axes, context,
                                         is_leaf=lambda x: x is None)
        return jax.block_until_ready(run(take(observed), stacked))

    with concurrent.futures.ThreadPoolExecutor(parts) as pool:
        finals, values = zip(*pool.map(chunk, range(parts)))
    return jnp.concatenate(finals)[:count], jnp.concatenate(values)[:count]


# ----------------------------------------------------------------------------------------------
# The worked example: a shipped digit, lenet_zhu, the exact user


# The digit to reconstruct: the first validation image (a 0). The wrong observation is the update
# of the first validation image of another class (a 1).
TRUE_INDEX = 0
# The server's lenet_zhu weights: model.init with this seed. How well one image's gradient pins
# down its mean brightness depends on the weights; seed 0 is a hard case (docs/attacks.md).
MODEL_SEED = 1
USER_SEED = 2


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The validation digits as 32x32x3 images in [0, 1] and their labels.

    Returns:
      ``(images [N, 32, 32, 3] float, labels [N] int32)``, from ``fedjax_users/data/digits.npz``.

    Example::

        >>> images, labels = digit_images()
        >>> images.shape[1:], int(labels[TRUE_INDEX])
        ((32, 32, 3), 0)
    """
    split = embedded_digits("validation")
    return split.decode(split.stored), np.asarray(split.labels, np.int32)


def user_configs() -> dict[str, fu.UserConfig]:
    """The two users of the example: one gradient, and two local SGD steps, of the one image.

    Returns:
      ``{"local_gradient": ..., "local_update": ...}``, user configs of one example each.

    Example::

        >>> user_configs()["local_update"].num_local_updates
        2
    """
    single = fu.UserConfig.from_dict(dict(user_type="local_gradient", num_data_points=1))
    multi = fu.UserConfig.from_dict(dict(
        user_type="local_update", num_data_points=1, num_local_updates=2, num_data_per_local_update_step=1,
        local_learning_rate=0.1,
    ))
    return {"local_gradient": single, "local_update": multi}


def shared_update(model, cfg: fu.UserConfig, candidate: Array, context: tuple[PyTree, Array]) -> PyTree:
    """What the user of ``cfg`` shares for ``candidate``; ``context`` = (server params, labels), no buffers sent.

    The attack's ``update`` is this with ``model`` and ``cfg`` bound (``functools.partial``): one
    function object per user, so that the attack compiles once.

    Args:
      model: the Flax model (:func:`example_server`'s).
      cfg: the user's config (one of :func:`user_configs`).
      candidate: the images ``[N, 32, 32, 3]``.
      context: ``(server params, labels [N])``.

    Returns:
      The shared gradient (or parameter difference), a params-shaped tree; the user's key is
      ``USER_SEED``.
    """
    params, labels = context
    run = fu.local_update if cfg.is_multi_step else fu.local_gradient
    shared, _, _ = run(model, fu.ServerPayload(params=params, batch_stats=None),
                       fu.UserData(inputs=candidate, labels=labels), cfg, jax.random.key(USER_SEED))
    return shared.gradients


@dataclasses.dataclass(frozen=True)
class Result:
    """One reconstruction: which user, which observation, its PSNR and the inferred label.

    Attributes:
      user: the user's name (a key of :func:`user_configs`).
      observed: ``"true"`` (the user's own update) or ``"wrong"`` (another image's).
      psnr: the reconstruction's PSNR against the true digit.
      label: the label the attacker read off the observed update.
      reconstruction: the images ``[1, 32, 32, 3]``.
    """

    user: str
    observed: str  # "true" (the user's own update) or "wrong" (another image's)
    psnr: float
    label: int
    reconstruction: np.ndarray


def wrong_index() -> int:
    """The digit behind the wrong observation: the first validation image of another class.

    Returns:
      Its index in :func:`digit_images`.
    """
    _, labels = digit_images()
    return int(np.flatnonzero(labels != labels[TRUE_INDEX])[0])


def nearest_other_digit(index: int = TRUE_INDEX) -> tuple[int, float]:
    """The other validation digit closest to digit ``index``, and its PSNR against it.

    A reconstruction scoring above that PSNR is closer to this image than any other real digit is.

    Args:
      index: the digit's index in :func:`digit_images`.

    Returns:
      ``(index of the closest other digit, its PSNR in dB)``.
    """
    images, _ = digit_images()
    scores = {i: psnr(images[i], images[index]) for i in range(len(images)) if i != index}
    nearest = max(scores, key=scores.get)
    return nearest, scores[nearest]


def nearest_other_digit_psnr(index: int = TRUE_INDEX) -> float:
    """The PSNR of ``nearest_other_digit`` against digit ``index``.

    Args:
      index: the digit's index in :func:`digit_images`.

    Returns:
      The PSNR in dB.
    """
    return nearest_other_digit(index)[1]


def mean_grey_psnr(index: int = TRUE_INDEX) -> float:
    """The PSNR against digit ``index`` of a constant image at its mean grey level (a blind guess).

    Args:
      index: the digit's index in :func:`digit_images`.

    Returns:
      The PSNR in dB.
    """
    images, _ = digit_images()
    return psnr(np.full_like(images[index], images[index].mean()), images[index])


def example_server(model_seed: int = MODEL_SEED) -> tuple[Any, PyTree]:
    """The example's model and the server's parameters.

    Args:
      model_seed: the seed of ``model.init``.

    Returns:
      ``(lenet_zhu for 10 classes of 32x32x3 images, its params)``.
    """
    model = models.get("lenet_zhu", num_classes=10, num_channels=3)
    example = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return model, model.init(jax.random.key(model_seed), example)["params"]


def brightness_blindness(model_seed: int = MODEL_SEED, user: str = "local_gradient", shift: float = 0.1) -> float:
    """Cosine distance between the user's update of the digit and of the digit ``shift`` brighter.

    How little the update tells about the image's mean brightness: the smaller, the flatter the
    attack's objective along that direction, and the slower a few hundred steps find it.

    Args:
      model_seed: the seed of the server's weights.
      user: a key of :func:`user_configs`.
      shift: the brightness added to every pixel.

    Returns:
      The cosine distance.
    """
    images, labels = digit_images()
    truth = jnp.asarray(images[TRUE_INDEX : TRUE_INDEX + 1])
    model, params = example_server(model_seed)
    context = (params, jnp.asarray(labels[TRUE_INDEX : TRUE_INDEX + 1]))
    update = functools.partial(shared_update, model, user_configs()[user])
    return float(cosine_distance(update(truth + shift, context), update(truth, context)))


def run_example(config: AttackConfig = AttackConfig(), users: Optional[Sequence[str]] = None,
                model_seed: int = MODEL_SEED) -> list[Result]:
    """Invert the digit ``TRUE_INDEX`` from each user's true update and from another image's.

    Args:
      config: the attack's settings.
      users: the users (keys of :func:`user_configs`) to attack; ``None``: both.
      model_seed: the seed of the server's weights.

    Returns:
      One :class:`Result` per user and observation (``"true"``, then ``"wrong"``).

    Example::

      results = run_example(AttackConfig(steps=100, restarts=1), users=["local_gradient"])
      [(r.observed, round(r.psnr, 1)) for r in results]
    """
    images, labels = digit_images()
    truth = jnp.asarray(images[TRUE_INDEX : TRUE_INDEX + 1])
    other = wrong_index()
    wrong = jnp.asarray(images[other : other + 1])
    model, params = example_server(model_seed)
    results = []
    for name, cfg in user_configs().items():
        if users is not None and name not in users:
            continue
        # One function object per user: the true and the wrong observation share one compile.
        update = functools.partial(shared_update, model, cfg)
        for observed_name, image, label in (("true", truth, labels[TRUE_INDEX]), ("wrong", wrong, labels[other])):
            observed = update(image, (params, jnp.asarray([label])))
            # The attacker reads the label off the observed update, then inverts through the user.
            inferred = infer_label(observed, parameter_difference=cfg.is_multi_step)
            reconstruction = invert(update, observed, (params, jnp.asarray([inferred])), truth.shape, config)
            results.append(Result(name, observed_name, psnr(reconstruction, truth), inferred, np.asarray(reconstruction)))
    return results


# The picture: one row per model seed and user, these columns.
GRID_FILE = "attack_grid.png"
GRID_COLUMNS = ("original", "from the true update", "from a wrong update")


def write_grid(path: str | os.PathLike, results: Sequence[tuple[int, Sequence[Result]]]) -> Figure:
    """Write the example's originals and reconstructions as an image grid (``plots.image_grid``).

    Args:
      path: the picture file.
      results: ``(model seed, run_example(...) of that seed)`` pairs; each user of each seed is a
        row: the true digit, its reconstruction from the user's true update, and from the wrong one.

    Returns:
      The drawn figure: one axes per panel, row by row.

    Example::

        write_grid("grid.png", [(MODEL_SEED, run_example())])
    """
    images, labels = digit_images()
    truth = images[TRUE_INDEX]
    rows, titles, row_labels = [], [], []
    for seed, seed_results in results:
        by_key = {(r.user, r.observed): r for r in seed_results}
        for user in dict.fromkeys(r.user for r in seed_results):
            true, wrong = by_key[(user, "true")], by_key[(user, "wrong")]
            rows.append([truth, true.reconstruction[0], wrong.reconstruction[0]])
            titles.append([f"digit {TRUE_INDEX} (a {labels[TRUE_INDEX]})",
                           f"PSNR {true.psnr:.2f} dB, label {true.label}",
                           f"PSNR {wrong.psnr:.2f} dB, label {wrong.label}"])
            row_labels.append(f"{user}\nmodel seed {seed}")
    return plots.image_grid(rows, path, titles=titles, row_labels=row_labels, column_labels=list(GRID_COLUMNS))


def picture_output(out: Optional[str], force: bool) -> tuple[str, Optional[runs.RunOutput]]:
    """Where ``main`` writes its picture, decided before the attack runs.

    Args:
      out: ``--out``: a picture file (a name with an extension, e.g. ``grid.png``), a folder, or
        ``None`` for a new run folder ``runs/attack-<timestamp>/``, as ``fedjax-users run`` makes.
        In a folder the picture is ``attack_grid.png``.
      force: write over an existing picture file, or into a folder that already holds files.

    Returns:
      The picture's path, and the run folder to create before writing it (``None`` for a file).

    Raises:
      ValueError: ``out`` exists and ``force`` is off, or cannot be written.
    """
    if out is not None and not os.path.isdir(out) and os.path.splitext(out)[1]:
        return plots.check_picture_path(out, force), None
    output = runs.prepare(out, "attack", force)
    return os.path.join(output.folder, GRID_FILE), output


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m fedjax_users.attacks``: print the example's PSNRs and write its image grid.

    Args:
      argv: the command's arguments (``None``: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = AttackConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--restarts", type=int, default=defaults.restarts)
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[MODEL_SEED],
                        help="seeds of the server's lenet_zhu weights, one run each")
    parser.add_argument("--out", default=None,
                        help=f"the picture (e.g. grid.png), or a folder for {GRID_FILE} "
                             "(default: a new runs/attack-<timestamp>/)")
    parser.add_argument("--force", action="store_true", help="write over an --out that already exists")
    args = parser.parse_args(argv)
    try:
        # Decided before the attack runs: a minute of computing must not end in "file exists".
        picture, folder = picture_output(args.out, args.force)
    except ValueError as err:
        parser.error(str(err))
    config = dataclasses.replace(defaults, steps=args.steps, restarts=args.restarts)
    _, labels = digit_images()
    nearest, nearest_psnr = nearest_other_digit()
    other = wrong_index()
    print(f"lenet_zhu, validation digit {TRUE_INDEX} (a {labels[TRUE_INDEX]}), {config}")
    print(f"closest other validation digit: {nearest} (a {labels[nearest]}), {nearest_psnr:.2f} dB; "
          f"a constant image at the digit's mean grey: {mean_grey_psnr():.2f} dB")
    legend = {
        "model seed": "the seed of the server's lenet_zhu weights",
        "user": "the user the attack inverts through (it shares one gradient, or a 2-step parameter difference)",
        "observed update": f"true: the user's own update of digit {TRUE_INDEX}; wrong: the update of digit {other} "
                           f"(a {labels[other]}), a control",
        "label": "the label the attacker reads off the observed update (iDLG)",
        "PSNR (dB)": f"the reconstruction against digit {TRUE_INDEX}: higher is closer, above {nearest_psnr:.2f} dB "
                     "closer than any other digit",
        "+0.1 brightness": f"cosine distance between the updates of digit {TRUE_INDEX} and of it made 0.1 brighter: "
                           "the smaller, the flatter the objective along brightness",
    }
    print("the table's columns:")
    for column, meaning in legend.items():
        print(f"  {column:<17}{meaning}")
    print(f"{'model seed':<12}{'user':<16}{'observed update':<17}{'label':>6}{'PSNR (dB)':>11}"
          f"{'  +0.1 brightness: cosine distance':>36}")
    collected = []
    for seed in args.model_seeds:
        results = run_example(config, model_seed=seed)
        collected.append((seed, results))
        for result in results:
            blindness = f"{brightness_blindness(seed, result.user):.2e}" if result.observed == "true" else ""
            print(f"{seed:<12}{result.user:<16}{result.observed:<17}{result.label:>6}{result.psnr:>11.2f}"
                  f"{blindness:>36}")
    if folder is not None:
        folder.create()
    write_grid(picture, collected)
    print(f"picture: {picture}, one row per model seed and user, {len(GRID_COLUMNS)} columns:")
    meanings = (f"digit {TRUE_INDEX} itself", "its reconstruction from the user's own update",
                f"the reconstruction from digit {other}'s update (a {labels[other]})")
    for column, meaning in zip(GRID_COLUMNS, meanings):
        print(f"  {column:<22}{meaning}")
    print(f"  each reconstruction is titled with its PSNR against digit {TRUE_INDEX} and the label read off its update")


if __name__ == "__main__":
    main()
