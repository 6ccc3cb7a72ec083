"""What a breaching user computes, as plain JAX: the contract of ``docs/semantics.md``.

This module is the definition, written to be read: one example at a time where breaching clips
per example, the local SGD steps as a loop over their static data slices, an aggregate as the
mean over its users of the single user. ``fedjax_users.users`` runs these semantics through the
execution strategy (``fedjax_users.strategy``), which may compute the same numbers another way
(per-example kernel gradients from im2col patches, chunks of examples or users, one summed
gradient for unclipped single-step users, a ``lax.scan`` over many steps, several devices); every
such path is tested against the functions here.

Randomness follows one convention, which every path keeps: a single-step user splits its key
into (input noise, gradient noise), and when it clips, splits the input-noise key into one key
per example; a multi-step user splits its key into one key per step and each step's key into
(input noise, gradient noise); an aggregate splits its key into one key per user.

Every function here is pure: no argument is changed, and the same arguments give the same numbers.
Shapes: ``inputs`` are ``[examples, ...]`` for one user and ``[users, examples, ...]`` for an
aggregate, ``labels`` likewise; a model's statistics are its ``batch_stats`` collection (``{}`` for a
model without BatchNorm). Example, one single-step user::

    >>> import jax, jax.numpy as jnp
    >>> import fedjax_users as fu
    >>> from fedjax_users import semantics
    >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
    >>> x, y = jnp.ones((2, 4, 4, 1)), jnp.array([0, 2])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> cfg = fu.UserConfig.from_yaml("local_gradient", ["num_data_points=2"])
    >>> run = jax.jit(semantics.single_step_user, static_argnums=(0, 1, 2))  # model, loss and config are static
    >>> result = run(model, fu.losses.softmax_cross_entropy, cfg, params, None, {}, x, y, jax.random.key(1))
    >>> result.gradients["1"]["kernel"].shape, result.batch_stats
    ((16, 3), {})
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_users import privacy
from fedjax_users.batchnorm import fold_batch_stats
from fedjax_users.config import LocalDiffPrivacy, UserConfig
from fedjax_users.losses import LossFn, mean_loss
from fedjax_users.types import LocalHyperparams, Metadata

__all__ = [
    "MULTI_STEP_MOMENTUM", "SINGLE_STEP_MOMENTUM", "ClippedMean", "LocalState", "Objective", "UserResult",
    "add_gradient_noise", "aggregate_metadata", "aggregate_users", "apply_model", "clip_batch_gradient",
    "clipped_example_gradients", "clipped_mean_gradient", "initial_local_state", "local_hyperparams",
    "local_optimizer", "local_step", "loss_and_grad", "mean_over_users", "multi_step_user", "noised_inputs",
    "parameter_difference", "single_step_keys", "single_step_loss", "single_step_user", "step_labels", "step_slices",
    "user", "user_metadata",
]

Array = jax.Array
PyTree = Any
# objective(params, example) -> (loss of that one example, aux); ``example`` is one slice of a batch.
Objective = Callable[[PyTree, PyTree], tuple[Array, PyTree]]
# clipped_mean(objective, params, examples, clip_value) -> (mean clipped gradient, stacked aux)
ClippedMean = Callable[[Objective, PyTree, PyTree, float], tuple[PyTree, PyTree]]

# A single-step user in train mode sets every BatchNorm's momentum to None (cumulative average);
# a multi-step user keeps PyTorch's default.
SINGLE_STEP_MOMENTUM = None
MULTI_STEP_MOMENTUM = 0.1


@flax.struct.dataclass
class UserResult:
    """One user's computation: what it shares and what it keeps.

    Attributes:
      gradients: the gradient (single step) or the parameter difference (multi step), in the
        parameters' structure: the update the server receives.
      batch_stats: the model's BatchNorm statistics after the query (``{}`` without BatchNorm).
      inputs: the inputs as the reference records them in the user's data (the noised ones for an
        unclipped single-step user, the clean ones otherwise).
    """

    gradients: PyTree  # the gradient (single step) or the parameter difference (multi step)
    batch_stats: PyTree  # the model's BatchNorm statistics after the query; ``{}`` without BatchNorm
    inputs: Array  # the inputs as the reference records them in the user's data


# ----------------------------------------------------------------------------------------------
# The model, the loss, the inputs


def apply_model(model, params: PyTree, stats: PyTree, inputs: Array, train: bool,
                mask: Optional[Array] = None, momentum: Optional[float] = MULTI_STEP_MOMENTUM) -> tuple[Array, PyTree]:
    """The model's logits on ``inputs``, and its BatchNorm statistics after the forward pass.

    In train mode, for a model with statistics, BatchNorm normalises with the batch's statistics and
    the running statistics are updated with them by PyTorch's rule at ``momentum``; otherwise the
    running statistics normalise and ``stats`` comes back as it was.

    Args:
      model: a Flax module of the zoo (its ``apply`` takes ``train``, ``mask`` and ``momentum``).
      params: the model's parameters.
      stats: its ``batch_stats`` collection; ``{}`` for a model without BatchNorm.
      inputs: a batch ``[examples, ...]``.
      train: train mode (batch statistics normalise) or eval mode (running statistics).
      mask: ``[examples]`` booleans, the examples BatchNorm's batch statistics count; ``None``: all.
      momentum: the running average's momentum; ``None`` is PyTorch's cumulative average.

    Returns:
      ``(logits, stats)``: the logits ``[examples, ...]`` and the statistics after the pass.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x = jnp.ones((2, 4, 4, 1))
        >>> logits, stats = apply_model(model, model.init(jax.random.key(0), x)["params"], {}, x, train=True)
        >>> logits.shape, stats
        ((2, 3), {})
    """
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    if train and stats:
        logits, updates = model.apply(
            variables, inputs, train=True, mask=mask, momentum=momentum, mutable=["batch_stats"]
        )
        return logits, updates["batch_stats"]
    return model.apply(variables, inputs, train=train, mask=mask, momentum=momentum), stats


def loss_and_grad(model, loss_fn: LossFn, params: PyTree, stats: PyTree, inputs: Array, labels: Array,
                  train: bool, mask: Optional[Array], momentum: Optional[float]) -> tuple[PyTree, PyTree]:
    """The gradient of the batch's mean loss with respect to ``params``, and the statistics after the pass.

    The mean is ``losses.mean_loss`` of ``loss_fn`` on ``apply_model``'s logits, over the examples
    ``mask`` keeps.

    Args:
      model, params, stats, inputs, train, mask, momentum: as for ``apply_model``.
      loss_fn: per-example loss ``(logits, labels)``.
      labels: the batch's labels ``[examples, ...]``.

    Returns:
      ``(grads, stats)``: the gradient, in ``params``' structure, and the statistics after the forward pass.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> run = jax.jit(loss_and_grad, static_argnums=(0, 1, 6, 8))
        >>> grads, _ = run(model, fu.losses.softmax_cross_entropy, params, {}, x, y, False, None, 0.1)
        >>> grads["1"]["kernel"].shape
        (16, 3)
    """

    def objective(p):
        logits, new_stats = apply_model(model, p, stats, inputs, train, mask, momentum)
        return mean_loss(loss_fn(logits, labels), mask), new_stats

    (_, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, new_stats


def noised_inputs(key: Array, inputs: Array, dp: LocalDiffPrivacy) -> Array:
    """``inputs`` plus the configured input noise (unchanged when ``input_noise`` is 0).

    Args:
      key: the input-noise key.
      inputs: the batch ``[examples, ...]``.
      dp: the local defences: i.i.d. noise of scale ``dp.input_noise`` from ``dp.distribution`` is
        drawn for every entry (``privacy.sample``).

    Returns:
      The noised inputs, shaped and typed as ``inputs``; ``inputs`` itself when ``input_noise <= 0``.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> x = jnp.zeros((2, 3))
        >>> noised_inputs(jax.random.key(0), x, LocalDiffPrivacy()) is x
        True
        >>> noised = noised_inputs(jax.random.key(0), x, LocalDiffPrivacy(input_noise=0.1, distribution="gaussian"))
        >>> noised.shape, bool(jnp.any(noised != 0))
        ((2, 3), True)
    """
    if dp.input_noise <= 0:
        return inputs
    return inputs + privacy.sample(key, inputs.shape, inputs.dtype, dp.input_noise, dp.distribution)


# ----------------------------------------------------------------------------------------------
# Single step (breaching's UserSingleStep)


def clipped_example_gradients(objective: Objective, params: PyTree, examples: PyTree,
                              clip_value: float) -> tuple[PyTree, PyTree]:
    """Every example's gradient, each clipped by breaching's rule, stacked on a leading axis.

    Example ``i``'s gradient ``g_i`` of ``objective(params, example_i)`` is scaled by
    ``C / (n_i + 1e-6)`` when its global norm ``n_i`` exceeds ``C = clip_value`` (strictly), and kept
    otherwise (``privacy.clip_by_global_norm``).

    Args:
      objective: ``objective(params, example) -> (loss, aux)`` of one example.
      params: the parameters differentiated.
      examples: a pytree whose leaves stack the examples on a leading axis.
      clip_value: the bound ``C`` on each example's gradient's global L2 norm.

    Returns:
      ``(grads, aux)``: the clipped gradients, each leaf ``[examples, *param.shape]``, and each
      example's ``aux`` stacked likewise.

    Example::

        >>> import jax.numpy as jnp
        >>> objective = lambda w, x: (jnp.sum(w * x), None)  # the gradient of example x is x
        >>> grads, _ = clipped_example_gradients(objective, jnp.zeros(2), jnp.array([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        >>> [[round(float(v), 4) for v in row] for row in grads]
        [[0.6, 0.8], [0.3, 0.4]]
    """

    def clipped(example):
        grads, aux = jax.grad(objective, has_aux=True)(params, example)
        return privacy.clip_by_global_norm(grads, clip_value), aux

    return jax.vmap(clipped)(examples)


def clipped_mean_gradient(objective: Objective, params: PyTree, examples: PyTree,
                          clip_value: float) -> tuple[PyTree, PyTree]:
    """The mean over examples of each example's clipped gradient, and the stacked ``aux``.

    ``sum_i clip(g_i) / B`` over the ``B`` examples, ``clip`` as in ``clipped_example_gradients``:
    what a clipping single-step user shares before noise.

    Args:
      objective, params, examples, clip_value: as for ``clipped_example_gradients``.

    Returns:
      ``(grads, aux)``: the mean clipped gradient, in ``params``' structure, and the stacked ``aux``.

    Example::

        >>> import jax.numpy as jnp
        >>> objective = lambda w, x: (jnp.sum(w * x), None)
        >>> grads, _ = clipped_mean_gradient(objective, jnp.zeros(2), jnp.array([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        >>> [round(float(v), 4) for v in grads]
        [0.45, 0.6]
    """
    grads, aux = clipped_example_gradients(objective, params, examples, clip_value)
    count = jax.tree_util.tree_leaves(examples)[0].shape[0]
    return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0) / count, grads), aux


def single_step_user(model, loss_fn: LossFn, cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
                     user_stats: PyTree, inputs: Array, labels: Array, key: Array,
                     clipped_mean: ClippedMean = clipped_mean_gradient,
                     batch_loss: Optional[Callable[..., tuple[Array, tuple[PyTree, Array]]]] = None) -> UserResult:
    """breaching's ``UserSingleStep``: one gradient of the user's examples, clipped and noised.

    Server buffers sent (``server_stats``): eval mode with them. None sent: train mode with the
    user's own ``user_stats`` and a cumulative running average. With per-example clipping every
    example is its own batch of one (train-mode BatchNorm normalises it with its own statistics),
    its gradient is clipped, and the mean over examples is shared; its batch statistics are
    folded into the running average in order, as the reference's loop over examples does.
    ``clipped_mean`` is how the mean of clipped gradients is formed, ``batch_loss`` (default
    ``single_step_loss``) the loss an unclipped user differentiates; any replacement must equal them.

    In order: ``key`` splits into (input noise, gradient noise) keys (``single_step_keys``). Without
    clipping, the gradient of ``single_step_loss`` (the mean loss of the noised inputs). With
    ``per_example_clipping = C > 0``, the input-noise key splits into one key per example, each
    example is noised with its key and run alone, and the gradient is
    ``clipped_mean(objective, params, (inputs, labels, keys), C)``. Then gradient noise of scale
    ``gradient_noise`` on every entry (``privacy.add_noise``).

    Args:
      model: a Flax module of the zoo.
      loss_fn: per-example loss ``(logits, labels)``.
      cfg: the user's config (its ``local_diff_privacy`` is read).
      params: the server's parameters.
      server_stats: the server's BatchNorm buffers (eval mode), or ``None`` (train mode).
      user_stats: the user's own statistics, used in train mode (``{}`` without BatchNorm).
      inputs: the user's examples ``[examples, ...]``.
      labels: their labels ``[examples, ...]``.
      key: the user's PRNG key.
      clipped_mean: ``(objective, params, examples, C) -> (mean clipped gradient, stacked aux)``.
      batch_loss: ``single_step_loss``'s replacement for an unclipped user (``None``: itself).

    Returns:
      The ``UserResult``: the noised gradient; the statistics after the query (train mode: the
      running statistics updated, with momentum ``None``; eval mode: ``server_stats``); the
      recorded inputs (noised without clipping, clean with it, as the reference keeps them).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> cfg = fu.UserConfig.from_yaml("local_gradient", ["num_data_points=4",
        ...                                                  "local_diff_privacy.per_example_clipping=0.5"])
        >>> run = jax.jit(single_step_user, static_argnums=(0, 1, 2))
        >>> result = run(model, fu.losses.softmax_cross_entropy, cfg, params, None, {}, x, y, jax.random.key(2))
        >>> bool(fu.privacy.global_norm(result.gradients) <= 0.5), bool(jnp.all(result.inputs == x))
        (True, True)
    """
    train = server_stats is None
    stats = user_stats if train else server_stats
    dp = cfg.local_diff_privacy
    input_key, grad_key = single_step_keys(key)
    if dp.per_example_clipping > 0:

        def per_example(p, example):
            x, y, k = example
            # Momentum 1 records the example's own batch statistics, folded in order below.
            logits, batch = apply_model(model, p, stats, noised_inputs(k, x[None], dp), train, None, 1.0)
            return mean_loss(loss_fn(logits, y[None])), batch

        keys = jax.random.split(input_key, inputs.shape[0])
        grads, per_batch = clipped_mean(per_example, params, (inputs, labels, keys), dp.per_example_clipping)
        new_stats = fold_batch_stats(stats, per_batch, SINGLE_STEP_MOMENTUM) if train and stats else stats
        recorded = inputs
    else:
        grads, (new_stats, recorded) = jax.grad(batch_loss or single_step_loss, argnums=3, has_aux=True)(
            model, loss_fn, dp, params, stats, train, inputs, labels, input_key)
    grads = privacy.add_noise(grad_key, grads, dp.gradient_noise, dp.distribution)
    return UserResult(gradients=grads, batch_stats=new_stats, inputs=recorded)


def single_step_loss(model, loss_fn: LossFn, dp: LocalDiffPrivacy, params: PyTree, stats: PyTree, train: bool,
                     inputs: Array, labels: Array, input_key: Array) -> tuple[Array, tuple[PyTree, Array]]:
    """The loss an unclipped single-step user differentiates: the mean loss of its noised inputs.

    The gradient of a sum of these losses over users is the sum of their gradients:
    ``fedjax_users.users``' aggregate takes that one gradient. The forward pass runs with
    ``SINGLE_STEP_MOMENTUM`` (``None``, the cumulative average) in train mode.

    Args:
      model: a Flax module of the zoo.
      loss_fn: per-example loss ``(logits, labels)``.
      dp: the local defences (``input_noise`` and ``distribution`` are read).
      params: the parameters, differentiated (argument 3).
      stats: the statistics the forward pass uses (the server's in eval mode, the user's in train mode).
      train: train mode or eval mode.
      inputs: the user's examples ``[examples, ...]``.
      labels: their labels.
      input_key: the input-noise key.

    Returns:
      ``(loss, (stats, recorded))``: the mean loss (``losses.mean_loss``), the statistics after the
      forward pass, and the noised inputs, which the reference writes back into the user's data.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> loss, (_, recorded) = single_step_loss(model, fu.losses.softmax_cross_entropy, fu.LocalDiffPrivacy(),
        ...                                        params, {}, False, x, y, jax.random.key(2))
        >>> loss.shape, bool(jnp.all(recorded == x))
        ((), True)
    """
    recorded = noised_inputs(input_key, inputs, dp)
    logits, new_stats = apply_model(model, params, stats, recorded, train, None, SINGLE_STEP_MOMENTUM)
    return mean_loss(loss_fn(logits, labels)), (new_stats, recorded)


def single_step_keys(key: Array) -> tuple[Array, Array]:
    """A single-step user's (input noise, gradient noise) keys.

    Args:
      key: the user's PRNG key.

    Returns:
      ``jax.random.split(key)``'s two keys, in that order.

    Example::

        >>> import jax
        >>> input_key, grad_key = single_step_keys(jax.random.key(0))
        >>> first, second = jax.random.split(jax.random.key(0))
        >>> same = lambda a, b: bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
        >>> same(input_key, first), same(grad_key, second)
        (True, True)
    """
    return tuple(jax.random.split(key))


# ----------------------------------------------------------------------------------------------
# Multi step (breaching's UserMultiStep): local SGD as optax transformations


def clip_batch_gradient(clip_value: float) -> optax.GradientTransformation:
    """breaching's clipping rule on the whole gradient: ``* C / (norm + 1e-6)`` only if ``norm > C``.

    Not ``optax.clip_by_global_norm``: that scales by ``C / norm`` (no ``1e-6``), and breaching's
    numbers are the contract.

    Args:
      clip_value: the bound ``C`` on the gradient's global L2 norm.

    Returns:
      A stateless ``optax.GradientTransformation`` that clips the updates it is given.

    Example:
      >>> import jax.numpy as jnp
      >>> clip = clip_batch_gradient(1.0)
      >>> updates, _ = clip.update({"w": jnp.array([3.0, 4.0])}, clip.init(None))
      >>> [round(float(v), 4) for v in updates["w"]]
      [0.6, 0.8]
    """
    return optax.stateless(lambda updates, params: privacy.clip_by_global_norm(updates, clip_value))


def add_gradient_noise(scale: float, distribution: str) -> optax.GradientTransformationExtraArgs:
    """i.i.d. noise on every gradient entry, drawn from the ``noise_key`` passed to ``update``.

    Written out rather than ``optax.stateless`` (which passes no extra arguments) or
    ``optax.add_noise`` (its own key schedule and decay): each step's noise comes from the step's
    key, as the randomness convention above says.

    Args:
      scale: the noise's scale (standard deviation, or Laplace's ``b``); 0 adds nothing.
      distribution: ``"gaussian"`` or ``"laplacian"``.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the keyword
      ``noise_key`` and returns the updates with noise added (``privacy.add_noise``).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> noise = add_gradient_noise(0.1, "gaussian")
        >>> updates, _ = noise.update({"w": jnp.zeros(3)}, noise.init(None), noise_key=jax.random.key(0))
        >>> updates["w"].shape, bool(jnp.any(updates["w"] != 0))
        ((3,), True)
    """

    def update(updates, state, params=None, *, noise_key: Array, **extra_args):
        del params, extra_args
        return privacy.add_noise(noise_key, updates, scale, distribution), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def local_optimizer(cfg: UserConfig) -> optax.GradientTransformationExtraArgs:
    """A local step's gradient processing: clip the batch gradient, add noise, plain SGD.

    ``optax.chain`` of ``clip_batch_gradient(per_example_clipping)`` (only when it is > 0),
    ``add_gradient_noise(gradient_noise, distribution)`` and ``optax.sgd(local_learning_rate)``
    (no momentum, no weight decay).

    Args:
      cfg: a multi-step user's config.

    Returns:
      The transformation; its ``update`` takes ``noise_key`` and returns ``-lr`` times the processed gradient.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> cfg = UserConfig.from_yaml("local_updates", ["local_learning_rate=0.5"])
        >>> opt = local_optimizer(cfg)
        >>> grads = {"w": jnp.array([1.0, -2.0])}
        >>> updates, _ = opt.update(grads, opt.init(grads), grads, noise_key=jax.random.key(0))
        >>> updates["w"].tolist()
        [-0.5, 1.0]
    """
    dp = cfg.local_diff_privacy
    stages = [clip_batch_gradient(dp.per_example_clipping)] if dp.per_example_clipping > 0 else []
    stages += [add_gradient_noise(dp.gradient_noise, dp.distribution), optax.sgd(cfg.local_learning_rate)]
    return optax.chain(*stages)


def step_slices(num_data_points: int, per_step: int, num_steps: int) -> list[tuple[int, int]]:
    """(start, length) of each local step: ``data[seen:seen+k]``, never wrapping, shorter at the end.

    ``seen`` starts at 0 and becomes ``(seen + k) % num_data_points`` after each step, as breaching's
    ``UserMultiStep`` reads its data.

    Args:
      num_data_points: the user's examples.
      per_step: ``k``, ``num_data_per_local_update_step``.
      num_steps: ``num_local_updates``.

    Returns:
      One ``(start, length)`` per step.

    Example::

        >>> step_slices(5, 2, 4)
        [(0, 2), (2, 2), (4, 1), (1, 2)]
    """
    slices, seen = [], 0
    for _ in range(num_steps):
        slices.append((seen, min(per_step, num_data_points - seen)))
        seen = (seen + per_step) % num_data_points
    return slices


class LocalState(NamedTuple):
    """What a multi-step user carries from one local step to the next.

    Attributes:
      params: the parameters after the steps so far.
      opt_state: ``local_optimizer``'s state.
      batch_stats: the BatchNorm statistics after the steps so far (``{}`` without BatchNorm).
    """

    params: PyTree
    opt_state: optax.OptState
    batch_stats: PyTree


def local_step(model, loss_fn: LossFn, cfg: UserConfig, train: bool, state: LocalState, inputs: Array,
               labels: Array, step_key: Array, mask: Optional[Array] = None) -> LocalState:
    """One local SGD step on this step's examples (``mask``: which of them are real).

    ``step_key`` splits into (input noise, gradient noise) keys; the inputs are noised
    (``noised_inputs``), the gradient of the mean loss taken at ``MULTI_STEP_MOMENTUM``
    (``loss_and_grad``), processed by ``local_optimizer`` (clip, noise, SGD) and applied.

    Args:
      model: a Flax module of the zoo.
      loss_fn: per-example loss ``(logits, labels)``.
      cfg: the multi-step user's config.
      train: train mode (the server sent no buffers) or eval mode.
      state: the state before the step.
      inputs: this step's examples.
      labels: their labels.
      step_key: this step's key.
      mask: ``[examples]`` booleans, the real examples of a padded step; ``None``: all.

    Returns:
      The ``LocalState`` after the step.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> cfg = fu.UserConfig.from_yaml("local_updates", ["num_data_points=4"])
        >>> run = jax.jit(local_step, static_argnums=(0, 1, 2, 3))
        >>> state = run(model, fu.losses.softmax_cross_entropy, cfg, False, initial_local_state(cfg, params, {}, {}),
        ...             x[:2], y[:2], jax.random.key(2))
        >>> bool(jnp.any(state.params["1"]["kernel"] != params["1"]["kernel"]))
        True
    """
    input_key, noise_key = jax.random.split(step_key)
    x = noised_inputs(input_key, inputs, cfg.local_diff_privacy)
    grads, new_stats = loss_and_grad(model, loss_fn, state.params, state.batch_stats, x, labels, train, mask,
                                     MULTI_STEP_MOMENTUM)
    updates, opt_state = local_optimizer(cfg).update(grads, state.opt_state, state.params, noise_key=noise_key)
    return LocalState(optax.apply_updates(state.params, updates), opt_state, new_stats)


def initial_local_state(cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
                        user_stats: PyTree) -> LocalState:
    """The state before the first local step (the server's buffers in eval mode, the user's own otherwise).

    Args:
      cfg: the multi-step user's config.
      params: the server's parameters.
      server_stats: the server's buffers, or ``None`` (train mode).
      user_stats: the user's own statistics, used when ``server_stats`` is ``None``.

    Returns:
      ``LocalState(params, local_optimizer(cfg).init(params), statistics)``.

    Example::

        >>> import jax.numpy as jnp
        >>> cfg = UserConfig.from_yaml("local_updates")
        >>> initial_local_state(cfg, {"w": jnp.zeros(2)}, None, {}).batch_stats
        {}
    """
    return LocalState(params, local_optimizer(cfg).init(params), user_stats if server_stats is None else server_stats)


def multi_step_user(model, loss_fn: LossFn, cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
                    user_stats: PyTree, inputs: Array, labels: Array, key: Array) -> UserResult:
    """breaching's ``UserMultiStep``: local SGD over ``step_slices``; shares ``params_after - params``.

    ``key`` splits into one key per step; step ``s`` runs ``local_step`` on
    ``inputs[start:start + length]`` of ``step_slices``' ``s``-th slice, from ``initial_local_state``.

    Args:
      model, loss_fn, params, server_stats, user_stats, inputs, labels, key: as for ``single_step_user``.
      cfg: the config: ``num_data_points``, ``num_local_updates``, ``num_data_per_local_update_step``,
        ``local_learning_rate`` and ``local_diff_privacy`` are read.

    Returns:
      The ``UserResult``: the parameter difference, the statistics after the last step (the
      server's in eval mode), and the clean ``inputs``.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> cfg = fu.UserConfig.from_yaml("local_updates", ["num_data_points=4"])
        >>> run = jax.jit(multi_step_user, static_argnums=(0, 1, 2))
        >>> result = run(model, fu.losses.softmax_cross_entropy, cfg, params, None, {}, x, y, jax.random.key(2))
        >>> result.gradients["1"]["bias"].shape
        (3,)
    """
    state = initial_local_state(cfg, params, server_stats, user_stats)
    slices = step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
    for (start, length), step_key in zip(slices, jax.random.split(key, cfg.num_local_updates)):
        stop = start + length
        state = local_step(model, loss_fn, cfg, server_stats is None, state, inputs[start:stop], labels[start:stop],
                           step_key)
    return UserResult(gradients=parameter_difference(state.params, params), batch_stats=state.batch_stats,
                      inputs=inputs)


def parameter_difference(after: PyTree, before: PyTree) -> PyTree:
    """``after - before``, leaf by leaf: what a multi-step user shares.

    Args:
      after: the parameters after the local steps.
      before: the server's parameters, in the same structure.

    Returns:
      The difference, in that structure.

    Example::

        >>> import jax.numpy as jnp
        >>> parameter_difference({"w": jnp.array([1.0, 3.0])}, {"w": jnp.array([0.5, 1.0])})["w"].tolist()
        [0.5, 2.0]
    """
    return jax.tree_util.tree_map(jnp.subtract, after, before)


# ----------------------------------------------------------------------------------------------
# Aggregate (breaching's MultiUserAggregate, as intended)


def user(model, loss_fn: LossFn, cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
         user_stats: PyTree, inputs: Array, labels: Array, key: Array) -> UserResult:
    """One user of the config's kind: multi-step users train, single-step users take one gradient.

    Args:
      model, loss_fn, cfg, params, server_stats, user_stats, inputs, labels, key: as for
        ``single_step_user``; ``cfg.is_multi_step`` picks ``multi_step_user`` or ``single_step_user``.

    Returns:
      That user's ``UserResult``.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> cfg = fu.UserConfig.from_yaml("multiuser_aggregate", ["num_data_points=4"])
        >>> run = jax.jit(user, static_argnums=(0, 1, 2))
        >>> result = run(model, fu.losses.softmax_cross_entropy, cfg, params, None, {}, x, y, jax.random.key(2))
        >>> result.gradients["1"]["kernel"].shape
        (16, 3)
    """
    run = multi_step_user if cfg.is_multi_step else single_step_user
    return run(model, loss_fn, cfg, params, server_stats, user_stats, inputs, labels, key)


def mean_over_users(tree: PyTree, num_users: int) -> PyTree:
    """Mean over the leading users axis; integer leaves (``num_batches_tracked``) stay integers.

    A float leaf's mean is ``sum / num_users``; an integer leaf's is rounded to the nearest integer
    (half to even) in its own dtype.

    Args:
      tree: a pytree whose leaves stack the users on a leading axis.
      num_users: the divisor (the leading axis's length).

    Returns:
      The mean, each leaf without the users axis.

    Example::

        >>> import jax.numpy as jnp
        >>> mean = mean_over_users({"g": jnp.array([[1.0], [2.0]]), "n": jnp.array([1, 2])}, 2)
        >>> mean["g"].tolist(), int(mean["n"])
        ([1.5], 2)
    """

    def mean(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.round(jnp.sum(leaf, axis=0) / num_users).astype(leaf.dtype)
        return jnp.sum(leaf, axis=0) / num_users

    return jax.tree_util.tree_map(mean, tree)


def aggregate_users(model, loss_fn: LossFn, cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
                    users_stats: Optional[PyTree], inputs: Array, labels: Array, key: Array) -> tuple[PyTree, PyTree]:
    """The aggregate's update and buffers: the mean over users ``[users, examples, ...]`` of ``user``.

    ``users_stats`` (stacked per user) are the users' own statistics, used when the server sends
    no buffers. breaching 0.1.2's ``MultiUserAggregate`` computes an exponential average instead
    (see ``docs/semantics.md``); this is the mean it intends.

    ``key`` splits into one key per user; user ``u`` is ``user`` on ``inputs[u]``, ``labels[u]``
    with its own statistics; the results are averaged by ``mean_over_users``.

    Args:
      model, loss_fn, cfg, params, server_stats, key: as for ``single_step_user``.
      users_stats: each user's own statistics, stacked ``[users, ...]``, or ``None``.
      inputs: ``[users, examples, ...]``.
      labels: ``[users, examples, ...]``.

    Returns:
      ``(update, batch_stats)``: the mean over users of their updates and of their statistics.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 1)), jnp.array([[0, 1, 2], [2, 2, 0]])
        >>> params = model.init(jax.random.key(1), x[0])["params"]
        >>> cfg = fu.UserConfig.from_yaml("multiuser_aggregate", ["num_data_points=3"])
        >>> run = jax.jit(aggregate_users, static_argnums=(0, 1, 2))
        >>> mean, _ = run(model, fu.losses.softmax_cross_entropy, cfg, params, None, None, x, y, jax.random.key(2))
        >>> mean["1"]["kernel"].shape
        (16, 3)
    """
    num_users = inputs.shape[0]
    results = []
    for u, user_key in enumerate(jax.random.split(key, num_users)):
        own = None if users_stats is None else jax.tree_util.tree_map(lambda s: s[u], users_stats)
        results.append(user(model, loss_fn, cfg, params, server_stats, own, inputs[u], labels[u], user_key))
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *results)
    return mean_over_users(stacked.gradients, num_users), mean_over_users(stacked.batch_stats, num_users)


# ----------------------------------------------------------------------------------------------
# What a user reveals besides its update


def step_labels(labels: Array, cfg: UserConfig) -> list[Array]:
    """Each local step's labels, sorted: what ``local_hyperparams.labels`` reveals.

    Args:
      labels: the user's labels ``[examples, ...]``.
      cfg: a multi-step user's config (its ``step_slices``).

    Returns:
      One array per step: ``labels[start:start + length]`` sorted along the last axis.

    Example::

        >>> import jax.numpy as jnp
        >>> cfg = UserConfig.from_yaml("local_updates", ["num_data_points=3", "num_data_per_local_update_step=2",
        ...                                              "num_local_updates=2"])
        >>> [step.tolist() for step in step_labels(jnp.array([2, 0, 1]), cfg)]
        [[0, 2], [1]]
    """
    slices = step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
    return [jnp.sort(labels[start : start + length], axis=-1) for start, length in slices]


def local_hyperparams(cfg: UserConfig, step_labels: Optional[list]) -> Optional[LocalHyperparams]:
    """The local schedule a multi-step user reports when ``provide_local_hyperparams`` is set.

    Args:
      cfg: a multi-step user's config.
      step_labels: each step's sorted labels (``step_labels``), as they go in the metadata.

    Returns:
      ``LocalHyperparams(lr, steps, data_per_step, labels)`` from ``cfg``, or ``None`` when
      ``cfg.provide_local_hyperparams`` is not set.

    Example::

        >>> cfg = UserConfig.from_yaml("local_updates", ["provide_local_hyperparams=true"])
        >>> local_hyperparams(cfg, []).steps == cfg.num_local_updates
        True
        >>> local_hyperparams(cfg.replace(provide_local_hyperparams=False), []) is None
        True
    """
    if not cfg.provide_local_hyperparams:
        return None
    return LocalHyperparams(
        lr=cfg.local_learning_rate,
        steps=cfg.num_local_updates,
        data_per_step=cfg.num_data_per_local_update_step,
        labels=step_labels,
    )


def user_metadata(cfg: UserConfig, labels: Array, data_key: str) -> Metadata:
    """What one user reveals besides the update, as breaching's user classes report it.

    ``num_data_points`` when ``provide_num_data_points``, the labels when ``provide_labels``
    (sorted along the last axis for a single-step user, as given for a multi-step one); a
    multi-step user adds ``data_key`` and ``local_hyperparams`` (``local_hyperparams`` of its
    ``step_labels``).

    Args:
      cfg: the user's config.
      labels: the labels it used ``[examples, ...]``.
      data_key: the key its data is told under (``"inputs"`` or ``"input_ids"``).

    Returns:
      The ``Metadata``.

    Example::

        >>> import jax.numpy as jnp
        >>> cfg = UserConfig.from_yaml("local_gradient", ["num_data_points=3", "provide_labels=true"])
        >>> meta = user_metadata(cfg, jnp.array([2, 0, 1]), "inputs")
        >>> meta.num_data_points, meta.labels.tolist()
        (3, [0, 1, 2])
    """
    num_points = cfg.num_data_points if cfg.provide_num_data_points else None
    if not cfg.is_multi_step:
        return Metadata(
            num_data_points=num_points,
            labels=jnp.sort(labels, axis=-1) if cfg.provide_labels else None,
        )
    return Metadata(
        num_data_points=num_points,
        labels=labels if cfg.provide_labels else None,
        local_hyperparams=local_hyperparams(cfg, step_labels(labels, cfg)),
        data_key=data_key,
    )


def aggregate_metadata(cfg: UserConfig, labels: Array, to_host: Callable[[Array], Any] = lambda a: a) -> Metadata:
    """What an aggregate of users ``labels`` ``[users, examples, ...]`` reveals besides the mean update.

    The examples' count and sorted labels over all users; with ``provide_local_hyperparams`` the
    schedule and each user's sorted labels of each step, one array per user and step, user-major
    (breaching's format). ``to_host`` turns each step's sorted labels of all users into what the
    per-user arrays are views of (``np.asarray``: one transfer a step instead of one a user).

    Args:
      cfg: the aggregate's config.
      labels: every user's labels ``[users, examples, ...]``.
      to_host: applied to each step's ``[users, length]`` sorted labels (default: kept as they are).

    Returns:
      The ``Metadata``: ``num_data_points * users`` and all labels sorted (each when provided),
      the local schedule (when provided) and ``num_users``.

    Example::

        >>> import jax.numpy as jnp
        >>> cfg = UserConfig.from_yaml("multiuser_aggregate", ["num_data_points=2", "provide_labels=true"])
        >>> meta = aggregate_metadata(cfg, jnp.array([[3, 1], [2, 0]]))
        >>> meta.num_data_points, meta.labels.tolist(), meta.num_users
        (4, [0, 1, 2, 3], 2)
    """
    num_users = labels.shape[0]
    step_labels = []
    if cfg.provide_local_hyperparams and cfg.is_multi_step:
        slices = step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
        per_step = [to_host(jnp.sort(labels[:, start : start + length], axis=-1)) for start, length in slices]
        step_labels = [step[u] for u in range(num_users) for step in per_step]
    return Metadata(
        num_data_points=cfg.num_data_points * num_users if cfg.provide_num_data_points else None,
        labels=jnp.sort(labels.reshape((-1,) + labels.shape[2:]), axis=-1) if cfg.provide_labels else None,
        local_hyperparams=local_hyperparams(cfg, step_labels) if cfg.provide_local_hyperparams else None,
        num_users=num_users,
    )
