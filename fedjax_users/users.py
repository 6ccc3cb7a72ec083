"""The three user computations of breaching as pure, jit-compiled JAX functions.

* ``local_gradient``: breaching's ``UserSingleStep`` (one gradient, optionally per-example clipped).
* ``local_update``: ``UserMultiStep`` (local SGD; shares the parameter difference).
* ``aggregate``: ``MultiUserAggregate`` (per-user work under ``vmap``; shares the *mean*).

Each public function validates its inputs (``fedjax_users.validation``), computes what
``fedjax_users.semantics`` defines in one jitted core whose config, model, loss and execution
strategy (``fedjax_users.strategy``) are static, and assembles the metadata the server sees. The BatchNorm mode follows the reference: server buffers sent -> eval mode
with those buffers; none sent -> train mode with the user's own persistent statistics.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users import privacy, semantics, validation
from fedjax_users.cohort import Cohort
from fedjax_users.config import ConfigError, UserConfig, UserKind
from fedjax_users.losses import LossFn, softmax_cross_entropy
from fedjax_users import strategy as strategy_lib
from fedjax_users.strategy import Strategy, chunking, clipping, compilation, patches, sharding, streaming
from fedjax_users.types import ServerPayload, SharedData, TrueUserData, UserData

Array = jax.Array
PyTree = Any

# Cached per (model, input shape, dtype); validation traces the model with them before computing.
_cached = validation.cached_by_model
_variable_shapes = validation.variable_shapes


@_cached
def _fresh_batch_stats(model, shape: tuple[int, ...], dtype) -> PyTree:
    # Statistics depend on neither the PRNG nor the inputs: one concrete init of zeros, computed
    # eagerly even when first asked for under an outer jit, so that the cache holds no tracer.
    with jax.ensure_compile_time_eval():
        return model.init(jax.random.key(0), jnp.zeros(shape, dtype))["batch_stats"]


def initial_batch_stats(model, example_inputs: Array) -> PyTree:
    """The model's freshly initialised BatchNorm statistics (``{}`` when it has none)."""
    shape, dtype = (1,) + tuple(np.shape(example_inputs))[1:], jnp.asarray(example_inputs).dtype
    if "batch_stats" not in _variable_shapes(model, shape, dtype):
        return {}
    return _fresh_batch_stats(model, shape, dtype)


# ----------------------------------------------------------------------------------------------
# The user as the strategy runs it (the semantics: fedjax_users.semantics)

step_slices = semantics.step_slices


def _step_indices(cfg: UserConfig) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Static [steps, k] gather indices and a validity mask (``None`` when no step is short)."""
    slices = step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
    width = max(length for _, length in slices)
    offsets = np.arange(width)
    valid = np.stack([offsets < length for _, length in slices])
    index = np.stack([np.where(offsets < length, start + offsets, start) for start, length in slices])
    return index, None if valid.all() else valid




def _multi_step(model, loss_fn, cfg, strategy, params, server_stats, user_stats, inputs, labels, key):
    """``semantics.multi_step_user``, its steps unrolled or (past ``strategy.max_unrolled_steps``) a ``lax.scan``.

    ``strategy.per_user_convs``: the caller ``vmap``s over users, so after the first step every user's
    kernels differ; the steps then run their convolutions as im2col matmuls
    (``fedjax_users.strategy.patches``) instead of the grouped convolutions ``vmap`` would make. The first
    step too: it costs about the same, and leaves no convolution to slow a loop over chunks.
    """
    with patches.convolutions_as_matmuls() if strategy.per_user_convs else contextlib.nullcontext():
        index, valid = _step_indices(cfg)
        if cfg.num_local_updates <= strategy.max_unrolled_steps:
            # A Python loop over static slices, each step exactly its examples (no padding or mask).
            # Not ``lax.scan(unroll=True)``: it keeps a one-trip loop and gathers for a single step,
            # which ran 4x slower than this on XLA:CPU.
            return semantics.multi_step_user(model, loss_fn, cfg, params, server_stats, user_stats, inputs, labels, key)
        train = server_stats is None

        def step(state, xs):
            idx, mask, step_key = xs
            return semantics.local_step(model, loss_fn, cfg, train, state, inputs[idx], labels[idx], step_key, mask), None

        state = semantics.initial_local_state(cfg, params, server_stats, user_stats)
        masks = None if valid is None else jnp.asarray(valid)
        steps = (jnp.asarray(index), masks, jax.random.split(key, cfg.num_local_updates))
        state, _ = jax.lax.scan(step, state, steps)
    return semantics.UserResult(
        gradients=semantics.parameter_difference(state.params, params), batch_stats=state.batch_stats, inputs=inputs
    )


def _per_user_config(cfg: UserConfig, multi_step: bool) -> UserConfig:
    """``cfg`` as one user of its kind runs it (an aggregate's users are local users)."""
    return cfg.replace(user_type="local_update" if multi_step else "local_gradient", user_range=None)


def compute_config(cfg: UserConfig) -> UserConfig:
    """Only the keys the computation depends on: metadata-only keys are reset so they share a compile."""
    return _per_user_config(cfg, cfg.is_multi_step).replace(
        user_idx=None, provide_buffers=False, provide_labels=False, provide_num_data_points=True,
        provide_local_hyperparams=False if cfg.is_multi_step else None,
    )


def _user_core(model, loss_fn, cfg, strategy, params, server_stats, user_stats, inputs, labels, key):
    """``semantics.user`` with the strategy's fast paths: per-example kernel gradients for clipping,
    and (see ``_multi_step``) im2col convolutions and scanned steps. Returns (gradients, stats, recorded inputs)."""
    if cfg.is_multi_step:
        result = _multi_step(model, loss_fn, cfg, strategy, params, server_stats, user_stats, inputs, labels, key)
    else:
        clipped_mean = functools.partial(
            clipping.clipped_mean_gradient, fast=strategy.fast_clipping, examples_per_chunk=strategy.examples_per_chunk
        )
        result = semantics.single_step_user(
            model, loss_fn, cfg, params, server_stats, user_stats, inputs, labels, key, clipped_mean=clipped_mean
        )
    return result.gradients, result.batch_stats, result.inputs


def _clips_examples(model, loss_fn, cfg: UserConfig, *args, **kwargs) -> bool:
    """Whether the user clips per example, in chunks of examples (see ``fedjax_users.strategy.compilation``)."""
    return not cfg.is_multi_step and cfg.local_diff_privacy.per_example_clipping > 0


@functools.partial(
    compilation.top_level_jit, wants_options=_clips_examples, static_argnames=("model", "loss_fn", "cfg", "strategy")
)
def _user_jit(model, loss_fn, cfg, params, server_stats, user_stats, inputs, labels, key, strategy):
    return _user_core(model, loss_fn, cfg, strategy, params, server_stats, user_stats, inputs, labels, key)


def _single_user_strategy(strategy: Optional[Strategy]) -> Strategy:
    """What of ``strategy`` a single user (not ``vmap``ped over users) uses; the rest reset to share compiles."""
    return (strategy or Strategy()).replace(devices=None, users_per_chunk=None, per_user_convs=False)


# ----------------------------------------------------------------------------------------------
# Public API


def _run_user(model, payload, data, cfg, key, user_state, loss, expect_multi_step, check_finite, strategy):
    function = "local_update" if expect_multi_step else "local_gradient"
    data = validation.validate_user(model, payload, data, cfg, key, user_state, loss, function, check_finite)
    validation.check_strategy(strategy)
    finite_mode = validation.finite_check_mode(check_finite, payload, data, key, user_state)
    inputs = jnp.asarray(data.inputs)[: cfg.num_data_points]
    labels = jnp.asarray(data.labels)[: cfg.num_data_points]
    if payload.batch_stats is None and user_state is None:
        user_state = initial_batch_stats(model, inputs)
    user_cfg = _per_user_config(cfg, expect_multi_step)
    strategy = _single_user_strategy(strategy)
    grads, new_stats, recorded = _user_jit(
        model, loss, compute_config(user_cfg), payload.params, payload.batch_stats, user_state, inputs, labels, key,
        strategy=strategy,
    )

    def first_steps(steps):  # the outputs after the first local steps: diagnoses a non-finite result only
        g, s, _ = _user_jit(model, loss, compute_config(user_cfg.replace(num_local_updates=steps)), payload.params,
                            payload.batch_stats, user_state, inputs, labels, key, strategy=strategy)
        return {"gradients": g, "batch_stats": s}

    validation.check_outputs(finite_mode, {"gradients": grads, "batch_stats": new_stats}, function, user_cfg,
                             first_steps if expect_multi_step else None)
    train = payload.batch_stats is None
    # As the reference: multi-step users always report their buffers (the server's in eval mode),
    # single-step users only in train mode; a model without BatchNorm reports an empty tree.
    buffers = new_stats if (expect_multi_step or train) else None
    shared = SharedData(
        gradients=grads,
        batch_stats=buffers if cfg.provide_buffers else None,
        metadata=semantics.user_metadata(user_cfg, labels, data.data_key),
    )
    true_data = TrueUserData(data=recorded, labels=labels, batch_stats=buffers, user_state=new_stats)
    return shared, true_data, new_stats


def local_gradient(
    model,
    payload: ServerPayload,
    data: UserData,
    cfg: UserConfig,
    key: Array,
    user_state: Optional[PyTree] = None,
    loss: LossFn = softmax_cross_entropy,
    check_finite: Optional[bool] = None,
    strategy: Optional[Strategy] = None,
) -> tuple[SharedData, TrueUserData, PyTree]:
    """breaching's ``UserSingleStep.compute_local_updates``: one (clipped, noised) gradient.

    ``check_finite``: raise ``NonFiniteError`` for a non-finite gradient or statistic. ``None``
    checks eager calls (one reduction) and not calls under an outer ``jit``; ``True`` under a
    ``jit`` adds ``checkify.check``s (wrap the program in ``jax.experimental.checkify.checkify``);
    ``False`` checks nothing, inputs included. See ``docs/validation.md``.
    ``strategy``: how to run it (``fedjax_users.strategy.Strategy``; the numbers do not depend on it).
    """
    return _run_user(model, payload, data, cfg, key, user_state, loss, False, check_finite, strategy)


def local_update(
    model,
    payload: ServerPayload,
    data: UserData,
    cfg: UserConfig,
    key: Array,
    user_state: Optional[PyTree] = None,
    loss: LossFn = softmax_cross_entropy,
    check_finite: Optional[bool] = None,
    strategy: Optional[Strategy] = None,
) -> tuple[SharedData, TrueUserData, PyTree]:
    """breaching's ``UserMultiStep.compute_local_updates``: local SGD, shares ``params - server params``.

    ``check_finite`` as in ``local_gradient``; a non-finite result names the first local step
    that went non-finite (found by re-running fewer steps, only on that error path).
    """
    return _run_user(model, payload, data, cfg, key, user_state, loss, True, check_finite, strategy)


def compute(
    model,
    payload: ServerPayload,
    data: UserData | Cohort,
    cfg: UserConfig,
    key: Array,
    state: Optional[PyTree] = None,
    loss: LossFn = softmax_cross_entropy,
    check_finite: Optional[bool] = None,
    strategy: Optional[Strategy] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    checkpoint: Optional[streaming.Checkpoint] = None,
) -> tuple[SharedData, TrueUserData, PyTree]:
    """The user ``cfg`` describes, whatever its kind: the one dispatch on ``cfg.kind``.

    Args:
      model, payload, data, cfg, key, loss, check_finite, strategy: as for ``local_gradient``,
        ``local_update`` or ``aggregate`` (``data`` stacked per user, or a cohort, for an aggregate).
      state: the user's own BatchNorm statistics (stacked per user for an aggregate), used when
        the server sends no buffers.
      progress, checkpoint: an aggregate's (``aggregate``); an error for a single user.

    Returns:
      ``(shared, true_data, state)``: what the server sees, what the user holds, and its own
      statistics after the query (to pass to the next one).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jnp.ones((2, 4, 4, 1)), jnp.array([0, 2])
        >>> payload = fu.ServerPayload(params=model.init(jax.random.key(0), x)["params"])
        >>> cfg = fu.UserConfig.from_yaml("local_gradient", overrides=["num_data_points=2"])
        >>> shared, _, _ = fu.compute(model, payload, fu.UserData(x, y), cfg, jax.random.key(1))
        >>> shared.gradients["1"]["kernel"].shape
        (16, 3)
    """
    if cfg.is_aggregate:
        shared, true = aggregate(model, payload, data, cfg, key, users_state=state, loss=loss, strategy=strategy,
                                 progress=progress, check_finite=check_finite, checkpoint=checkpoint)
        return shared, true, true.user_state
    if progress is not None or checkpoint is not None:
        raise ConfigError(f"progress and checkpoint follow an aggregate's users; cfg is a {cfg.kind.value} config")
    one_user = {UserKind.LOCAL_GRADIENT: local_gradient, UserKind.LOCAL_UPDATE: local_update}[cfg.kind]
    return one_user(model, payload, data, cfg, key, user_state=state, loss=loss, check_finite=check_finite,
                    strategy=strategy)


@functools.partial(jax.jit, static_argnames=("model", "loss_fn", "cfg", "strategy", "mesh", "count"))
def _aggregate_chunks_jit(model, loss_fn, cfg, strategy, mesh, shared, users, valid, first, count):
    """Chunks of users on every device: their summed update, and per user the stats and noised inputs.

    ``users`` = (inputs, labels, keys, own stats) as placed by ``sharding.place_users``; each device
    runs blocks ``first .. first + count - 1`` of ``strategy.users_per_chunk`` of its users, one
    after another, so memory grows with the chunk, not with the number of users.
    """
    dp = cfg.local_diff_privacy
    # Only a single-step user without clipping records noised inputs; otherwise they are the inputs
    # themselves, which the caller already holds (returning them would copy every user's data).
    records_noise = not cfg.is_multi_step and dp.per_example_clipping <= 0 and dp.input_noise > 0

    def one_user(shared, user_inputs, user_labels, user_key, user_stats):
        grads, stats, recorded = _user_core(
            model, loss_fn, cfg, strategy, *shared, user_stats, user_inputs, user_labels, user_key
        )
        return grads, (stats, recorded if records_noise else None)

    def single_step_chunk(shared, users, keep):
        # The users' unclipped gradients are all taken at the server's parameters, so their sum is
        # ONE gradient of the summed losses: one weight gradient over the chunk's examples instead
        # of one per user (which vmap lowers to grouped convolutions). Each user's forward pass
        # stays its own (vmap), so train-mode BatchNorm still uses that user's batch statistics.
        # Each user's loss, keys and noise are semantics.single_step_user's own.
        server_params, shared_stats = shared
        user_inputs, user_labels, user_keys, user_stats = users

        def user_loss(p, x, y, key, own_stats):
            stats = own_stats if shared_stats is None else shared_stats
            loss, (new_stats, noised) = semantics.single_step_loss(
                model, loss_fn, dp, p, stats, shared_stats is None, x, y, semantics.single_step_keys(key)[0])
            return loss, (new_stats, noised if records_noise else None)

        def kept_loss(p):
            losses, outputs = jax.vmap(user_loss, in_axes=(None, 0, 0, 0, 0))(p, *users)
            return jnp.sum(jnp.where(keep, losses, jnp.zeros((), losses.dtype))), outputs

        grads, outputs = jax.grad(kept_loss, has_aux=True)(server_params)

        def user_noise(key):
            grad_key = semantics.single_step_keys(key)[1]
            zeros = jax.tree_util.tree_map(jnp.zeros_like, server_params)
            return privacy.add_noise(grad_key, zeros, dp.gradient_noise, dp.distribution)

        if dp.gradient_noise > 0:
            noise = chunking.masked_sum(jax.vmap(user_noise)(user_keys), keep)
            grads = jax.tree_util.tree_map(jnp.add, grads, noise)
        return grads, outputs

    per_user = cfg.is_multi_step or dp.per_example_clipping > 0
    chunk_fn = chunking.vmap_sum(one_user) if per_user else single_step_chunk
    return chunking.scan_chunks(
        lambda chunk: sharding.run_chunk(chunk_fn, shared, users, valid, chunk, strategy.users_per_chunk, mesh),
        first, count,
    )


def _choose(model, loss, user_cfg, payload, users, strategy: Optional[Strategy],
            platform: Optional[str] = None) -> Strategy:
    """``strategy`` with its open fields chosen for ``users`` = (own stats, inputs, labels, keys), all stacked."""

    def users_per_chunk_for(sizing: Strategy, per_device: int, platform: str) -> int:
        # What one user needs: XLA's memory estimate of this very computation for one user.
        cfg = compute_config(user_cfg)
        one_user = functools.partial(_user_core, model, loss, cfg, sizing)
        first = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), users)
        return chunking.auto_users_per_chunk(
            one_user, (payload.params, payload.batch_stats) + first, per_device, cache_key=(model, loss, cfg, sizing),
            platform=platform,
        )

    return strategy_lib.choose(strategy, users[1].shape[0], user_cfg.is_multi_step, users_per_chunk_for, platform)


def _stacked_users_spec(model, payload: ServerPayload, users_data: UserData, cfg: UserConfig,
                        num_users: Optional[int] = None) -> tuple:
    """Shapes of (own stats, inputs, labels, keys) for ``aggregate``'s users, nothing computed
    (``num_users``: of a cohort whose first user ``users_data`` is; default: as many as it holds)."""
    inputs, labels = users_data.inputs, users_data.labels
    num_users, n = num_users or np.shape(inputs)[0], cfg.num_data_points
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    stats = None
    if payload.batch_stats is None:
        one = _variable_shapes(model, (1,) + tuple(np.shape(inputs))[2:], jnp.result_type(inputs))
        stats = jax.tree_util.tree_map(lambda s: spec((num_users,) + s.shape, s.dtype), one.get("batch_stats", {}))
    return (
        stats,
        spec((num_users, n) + tuple(np.shape(inputs))[2:], jnp.result_type(inputs)),
        spec((num_users, n) + tuple(np.shape(labels))[2:], jnp.result_type(labels)),
        jax.eval_shape(lambda: jax.random.split(jax.random.key(0), num_users)),
    )


def choose_strategy(model, payload: ServerPayload, users_data: UserData, cfg: UserConfig,
                    strategy: Optional[Strategy] = None, loss: Optional[LossFn] = None,
                    platform: Optional[str] = None) -> Strategy:
    """The strategy ``aggregate`` would run these users with; nothing is computed.

    Args:
      model, payload, users_data, cfg, loss: as for ``aggregate``.
      strategy: the fields already decided; the open ones are chosen (``fedjax_users.strategy.choose``).
      platform: choose as for this platform (``"gpu"``, ``"tpu"``) instead of the devices' own:
        what an accelerator would run, checked on a CPU.

    Returns:
      The ``fedjax_users.strategy.Strategy`` with every field set.
    """
    users = _stacked_users_spec(model, payload, users_data, cfg)
    return _choose(model, loss or softmax_cross_entropy, _per_user_config(cfg, cfg.is_multi_step), payload, users,
                   strategy, platform)


def _broadcast_users(stats: Optional[PyTree], count: int) -> Optional[PyTree]:
    """The same statistics for ``count`` users, stacked (``None`` stays ``None``)."""
    if stats is None:
        return None
    return jax.tree_util.tree_map(lambda s: jnp.broadcast_to(s, (count,) + s.shape), stats)


def aggregate(
    model,
    payload: ServerPayload,
    users_data: UserData | Cohort,
    cfg: UserConfig,
    key: Array,
    users_state: Optional[PyTree] = None,
    loss: LossFn = softmax_cross_entropy,
    strategy: Optional[Strategy] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    check_finite: Optional[bool] = None,
    checkpoint: Optional[streaming.Checkpoint] = None,
) -> tuple[SharedData, TrueUserData]:
    """breaching's ``MultiUserAggregate`` as intended: the mean of the users' shared updates.

    ``users_data`` has a leading users axis, or is a ``fedjax_users.cohort.Cohort`` whose users are
    read a chunk at a time (decoded ahead in background threads) with the same result bit for bit:
    memory then follows the chunk, not the cohort, and ``true_data.data`` is ``None`` (the inputs
    are the cohort's). ``checkpoint`` (``fedjax_users.strategy.streaming.Checkpoint``, a cohort
    only) saves the running sum every few chunks and resumes from a folder that holds one. Users are ``local_update`` users if
    ``num_local_updates > 1``, else ``local_gradient`` users. ``users_state`` (stacked per user)
    are their own BatchNorm statistics, used when the server sends no buffers; the updated ones
    come back in ``true_data.user_state``.

    How the users run is ``strategy`` (``fedjax_users.strategy.Strategy``): the devices the users
    axis is split over (default every device, of every host after ``jax.distributed.initialize``),
    the users each device runs at a time, im2col convolutions for multi-step users; its open fields
    are chosen by ``fedjax_users.strategy.choose``; ``fu.choose_strategy`` says what a call would use.
    ``progress(users done, users)`` is called on the host as chunks finish (for example
    ``fedjax_users.progress.Progress().counter("users")``); it is not called under an outer ``jit``.
    ``check_finite`` as in ``local_gradient``; a non-finite mean names the first user whose own
    update is non-finite, and its local step (found only on that error path).
    """
    streamed = isinstance(users_data, Cohort)
    # A cohort is checked on its first user (shapes, dtypes, labels), each chunk as it loads.
    sample = validation.validate_users(
        model, payload, users_data.first() if streamed else users_data, cfg, key, users_state, loss, check_finite,
        num_users=len(users_data) if streamed else None,
    )
    users_data = users_data if streamed else sample
    validation.check_strategy(strategy)
    finite_mode = validation.finite_check_mode(check_finite, payload, sample, key, users_state)
    num_users = len(users_data) if streamed else np.shape(users_data.inputs)[0]
    n = cfg.num_data_points
    user_cfg = _per_user_config(cfg, cfg.is_multi_step)
    train = payload.batch_stats is None
    example = jnp.asarray(sample.inputs)[0, :n]
    fresh = initial_batch_stats(model, example) if train and users_state is None else None
    keys = jax.random.split(key, num_users)
    users_spec = _stacked_users_spec(model, payload, sample, cfg, num_users)
    strategy = _choose(model, loss, user_cfg, payload, users_spec[:3] + (keys,), strategy)
    mesh = sharding.users_mesh(strategy.devices)
    per_device, size = sharding.users_per_device(num_users, mesh), strategy.users_per_chunk
    shared_args = sharding.to_global((payload.params, payload.batch_stats), mesh)
    run = functools.partial(_aggregate_chunks_jit, model, loss, compute_config(user_cfg), strategy, mesh, shared_args)

    if streamed:
        plan = streaming.ChunkPlan(num_users, 1 if mesh is None else mesh.size, per_device, size)

        def chunk_step(chunk, examples, positions, kept, local):
            x, y = examples["inputs"][:, :n], examples["labels"][:, :n]
            if users_state is not None and train:
                stats = jax.tree_util.tree_map(lambda s: s[positions], users_state)
            else:
                stats = _broadcast_users(fresh, len(positions))
            placed, valid = sharding.place_chunk((x, y), (keys[positions], stats), kept, mesh)
            chunk_total, (chunk_stats, _) = run(placed, valid, 0, 1)
            # The labels travel with the outputs (for the metadata, and saved with a checkpoint);
            # noised inputs do not: kept for every user, memory would grow with the cohort.
            chunk_labels = placed[1].reshape((1, plan.groups, size) + placed[1].shape[1:])
            return chunk_total, (chunk_stats, None, chunk_labels)

        def check_chunk(examples):
            validation.check_chunk(model, payload, examples["inputs"][:, :n], examples["labels"][:, :n], loss,
                                   check_finite)

        total, (users_stats, recorded, labels) = streaming.stream_chunks(
            chunk_step, users_data, plan, strategy.devices if mesh is not None else None, progress, checkpoint,
            on_load=check_chunk,
        )
        traced = False
        if jax.process_count() > 1:  # each process read its own users: the metadata needs them all
            from jax.experimental import multihost_utils

            labels = jnp.asarray(multihost_utils.process_allgather(labels, tiled=True))

        def user_inputs(user):
            x, y = users_data.load_user(user)
            return jnp.asarray(x[:n]), jnp.asarray(y[:n])
    else:
        inputs, labels = jnp.asarray(users_data.inputs)[:, :n], jnp.asarray(users_data.labels)[:, :n]
        users_stats_in = (users_state if users_state is not None else _broadcast_users(fresh, num_users)) if train else None
        users_args, valid = sharding.place_users((inputs, labels, keys, users_stats_in), mesh)
        # Under an outer jit the loop below runs once, at trace time: no progress to report.
        traced = isinstance(inputs, jax.core.Tracer) or isinstance(labels, jax.core.Tracer)
        # Users without convolutions run all chunks in one scan (see chunking); others one per call.
        chunks_per_step = chunking.num_chunks(per_device, size) if strategy.per_user_convs else 1
        total, (users_stats, recorded) = chunking.sum_chunks(
            lambda first, count: run(users_args, valid, first, count), per_device, size, num_users,
            None if traced else progress, chunks_per_step,
        )
        if recorded is None:
            # The users' own inputs. Given as NumPy, they come back as a view of the caller's array
            # rather than a second copy of the whole cohort's data (938 MiB for 10,000 CIFAR users of 8).
            given = users_data.inputs
            recorded = given[:, :n] if isinstance(given, np.ndarray) else inputs

        def user_inputs(user):
            return inputs[user], labels[user]

    mean_grads = jax.tree_util.tree_map(lambda t: t / num_users, total)
    mean_stats = semantics.mean_over_users(users_stats, num_users)

    def one_user(user, steps):  # one user alone, after its first local steps: diagnoses a non-finite mean only
        own_cfg = user_cfg.replace(num_local_updates=steps) if user_cfg.is_multi_step else user_cfg
        own_stats = None
        if train:
            own_stats = fresh if users_state is None else jax.tree_util.tree_map(lambda s: s[user], users_state)
        x, y = user_inputs(user)
        g, s, _ = _user_jit(model, loss, compute_config(own_cfg), payload.params, payload.batch_stats, own_stats,
                            x, y, keys[user], strategy=_single_user_strategy(strategy))
        return {"gradients": g, "batch_stats": s}

    validation.check_outputs(finite_mode, {"gradients": mean_grads, "batch_stats": users_stats}, "aggregate",
                             user_cfg, users=(num_users, one_user))
    users_share_buffers = train or user_cfg.is_multi_step
    buffers = mean_stats if users_share_buffers else None
    # Under an outer jit the labels are tracers and must stay JAX arrays.
    metadata = semantics.aggregate_metadata(cfg, labels, to_host=(lambda a: a) if traced else np.asarray)
    shared = SharedData(
        gradients=mean_grads, batch_stats=buffers if cfg.provide_buffers else None, metadata=metadata
    )
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    true_data = TrueUserData(
        data=None if recorded is None else flat(recorded),
        labels=flat(labels),
        batch_stats=buffers,
        user_state=users_stats if train else None,
    )
    return shared, true_data
