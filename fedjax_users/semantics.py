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
    """One user's computation: what it shares and what it keeps."""

    gradients: PyTree  # the gradient (single step) or the parameter difference (multi step)
    batch_stats: PyTree  # the model's BatchNorm statistics after the query; ``{}`` without BatchNorm
    inputs: Array  # the inputs as the reference records them in the user's data


# ----------------------------------------------------------------------------------------------
# The model, the loss, the inputs


def apply_model(model, params: PyTree, stats: PyTree, inputs: Array, train: bool,
                mask: Optional[Array] = None, momentum: Optional[float] = MULTI_STEP_MOMENTUM) -> tuple[Array, PyTree]:
    """Logits and (in train mode) updated batch stats; ``stats`` is ``{}`` for models without them."""
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    if train and stats:
        logits, updates = model.apply(
            variables, inputs, train=True, mask=mask, momentum=momentum, mutable=["batch_stats"]
        )
        return logits, updates["batch_stats"]
    return model.apply(variables, inputs, train=train, mask=mask, momentum=momentum), stats


def loss_and_grad(model, loss_fn: LossFn, params: PyTree, stats: PyTree, inputs: Array, labels: Array,
                  train: bool, mask: Optional[Array], momentum: Optional[float]) -> tuple[PyTree, PyTree]:
    """Gradient of the (masked) mean loss, and the batch stats after the forward pass."""

    def objective(p):
        logits, new_stats = apply_model(model, p, stats, inputs, train, mask, momentum)
        return mean_loss(loss_fn(logits, labels), mask), new_stats

    (_, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, new_stats


def noised_inputs(key: Array, inputs: Array, dp: LocalDiffPrivacy) -> Array:
    """``inputs`` plus the configured input noise (unchanged when ``input_noise`` is 0)."""
    if dp.input_noise <= 0:
        return inputs
    return inputs + privacy.sample(key, inputs.shape, inputs.dtype, dp.input_noise, dp.distribution)


# ----------------------------------------------------------------------------------------------
# Single step (breaching's UserSingleStep)


def clipped_example_gradients(objective: Objective, params: PyTree, examples: PyTree,
                              clip_value: float) -> tuple[PyTree, PyTree]:
    """Every example's gradient, each clipped by breaching's rule, stacked on a leading axis."""

    def clipped(example):
        grads, aux = jax.grad(objective, has_aux=True)(params, example)
        return privacy.clip_by_global_norm(grads, clip_value), aux

    return jax.vmap(clipped)(examples)


def clipped_mean_gradient(objective: Objective, params: PyTree, examples: PyTree,
                          clip_value: float) -> tuple[PyTree, PyTree]:
    """The mean over examples of each example's clipped gradient, and the stacked ``aux``."""
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

    Returns the loss and (the statistics after the forward pass, the noised inputs, which the
    reference writes back into the user's data). The gradient of a sum of these losses over users
    is the sum of their gradients: ``fedjax_users.users``' aggregate takes that one gradient.
    """
    recorded = noised_inputs(input_key, inputs, dp)
    logits, new_stats = apply_model(model, params, stats, recorded, train, None, SINGLE_STEP_MOMENTUM)
    return mean_loss(loss_fn(logits, labels)), (new_stats, recorded)


def single_step_keys(key: Array) -> tuple[Array, Array]:
    """A single-step user's (input noise, gradient noise) keys."""
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
    """

    def update(updates, state, params=None, *, noise_key: Array, **extra_args):
        del params, extra_args
        return privacy.add_noise(noise_key, updates, scale, distribution), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def local_optimizer(cfg: UserConfig) -> optax.GradientTransformationExtraArgs:
    """A local step's gradient processing: clip the batch gradient, add noise, plain SGD."""
    dp = cfg.local_diff_privacy
    stages = [clip_batch_gradient(dp.per_example_clipping)] if dp.per_example_clipping > 0 else []
    stages += [add_gradient_noise(dp.gradient_noise, dp.distribution), optax.sgd(cfg.local_learning_rate)]
    return optax.chain(*stages)


def step_slices(num_data_points: int, per_step: int, num_steps: int) -> list[tuple[int, int]]:
    """(start, length) of each local step: ``data[seen:seen+k]``, never wrapping, shorter at the end."""
    slices, seen = [], 0
    for _ in range(num_steps):
        slices.append((seen, min(per_step, num_data_points - seen)))
        seen = (seen + per_step) % num_data_points
    return slices


class LocalState(NamedTuple):
    """What a multi-step user carries from one local step to the next."""

    params: PyTree
    opt_state: optax.OptState
    batch_stats: PyTree


def local_step(model, loss_fn: LossFn, cfg: UserConfig, train: bool, state: LocalState, inputs: Array,
               labels: Array, step_key: Array, mask: Optional[Array] = None) -> LocalState:
    """One local SGD step on this step's examples (``mask``: which of them are real)."""
    input_key, noise_key = jax.random.split(step_key)
    x = noised_inputs(input_key, inputs, cfg.local_diff_privacy)
    grads, new_stats = loss_and_grad(model, loss_fn, state.params, state.batch_stats, x, labels, train, mask,
                                     MULTI_STEP_MOMENTUM)
    updates, opt_state = local_optimizer(cfg).update(grads, state.opt_state, state.params, noise_key=noise_key)
    return LocalState(optax.apply_updates(state.params, updates), opt_state, new_stats)


def initial_local_state(cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
                        user_stats: PyTree) -> LocalState:
    """The state before the first local step (the server's buffers in eval mode, the user's own otherwise)."""
    return LocalState(params, local_optimizer(cfg).init(params), user_stats if server_stats is None else server_stats)


def multi_step_user(model, loss_fn: LossFn, cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
                    user_stats: PyTree, inputs: Array, labels: Array, key: Array) -> UserResult:
    """breaching's ``UserMultiStep``: local SGD over ``step_slices``; shares ``params_after - params``."""
    state = initial_local_state(cfg, params, server_stats, user_stats)
    slices = step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
    for (start, length), step_key in zip(slices, jax.random.split(key, cfg.num_local_updates)):
        stop = start + length
        state = local_step(model, loss_fn, cfg, server_stats is None, state, inputs[start:stop], labels[start:stop],
                           step_key)
    return UserResult(gradients=parameter_difference(state.params, params), batch_stats=state.batch_stats,
                      inputs=inputs)


def parameter_difference(after: PyTree, before: PyTree) -> PyTree:
    """``after - before``, leaf by leaf: what a multi-step user shares."""
    return jax.tree_util.tree_map(jnp.subtract, after, before)


# ----------------------------------------------------------------------------------------------
# Aggregate (breaching's MultiUserAggregate, as intended)


def user(model, loss_fn: LossFn, cfg: UserConfig, params: PyTree, server_stats: Optional[PyTree],
         user_stats: PyTree, inputs: Array, labels: Array, key: Array) -> UserResult:
    """One user of the config's kind: multi-step users train, single-step users take one gradient."""
    run = multi_step_user if cfg.is_multi_step else single_step_user
    return run(model, loss_fn, cfg, params, server_stats, user_stats, inputs, labels, key)


def mean_over_users(tree: PyTree, num_users: int) -> PyTree:
    """Mean over the leading users axis; integer leaves (``num_batches_tracked``) stay integers."""

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
    """Each local step's labels, sorted: what ``local_hyperparams.labels`` reveals."""
    slices = step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
    return [jnp.sort(labels[start : start + length], axis=-1) for start, length in slices]


def local_hyperparams(cfg: UserConfig, step_labels: Optional[list]) -> Optional[LocalHyperparams]:
    """The local schedule a multi-step user reports when ``provide_local_hyperparams`` is set."""
    if not cfg.provide_local_hyperparams:
        return None
    return LocalHyperparams(
        lr=cfg.local_learning_rate,
        steps=cfg.num_local_updates,
        data_per_step=cfg.num_data_per_local_update_step,
        labels=step_labels,
    )


def user_metadata(cfg: UserConfig, labels: Array, data_key: str) -> Metadata:
    """What one user reveals besides the update, as breaching's user classes report it."""
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
