"""The three user computations of breaching as pure, jit-compiled JAX functions.

* ``local_gradient``: breaching's ``UserSingleStep`` (one gradient, optionally per-example clipped).
* ``local_update``: ``UserMultiStep`` (local SGD; shares the parameter difference).
* ``aggregate``: ``MultiUserAggregate`` (per-user work under ``vmap``; shares the *mean*).

Each public function validates its inputs (``fedjax_users.validation``), builds the user once
(``fedjax_users.user.User``: model, loss, config and execution strategy bound, its ``run`` pure and
compiled once), runs it, checks the result is finite, and assembles the metadata the server sees
(``fedjax_users.semantics``). The BatchNorm mode follows the reference: server buffers sent -> eval
mode with those buffers; none sent -> train mode with the user's own persistent statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users import semantics, validation
from fedjax_users.cohort import Cohort
from fedjax_users.config import ConfigError, UserConfig, UserKind
from fedjax_users.losses import LossFn, softmax_cross_entropy
from fedjax_users import strategy as strategy_lib
from fedjax_users.strategy import Strategy, chunking, examples, sharding, streaming
from fedjax_users.user import User
from fedjax_users.types import ServerPayload, SharedData, TrueUserData, UserData

__all__ = ["aggregate", "choose_strategy", "compute", "initial_batch_stats", "local_gradient", "local_update",
           "step_slices"]

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
    """The model's freshly initialised BatchNorm statistics (``{}`` when it has none).

    Args:
      model: a Flax module.
      example_inputs: inputs of the model's input shape (only their shape and dtype are read).

    Returns:
      The ``batch_stats`` collection of a fresh ``model.init``, computed once per model and shape.

    Example::

        >>> import jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> fu.users.initial_batch_stats(fu.models.get("linear", num_classes=3, num_channels=1), jnp.ones((1, 4, 4, 1)))
        {}
    """
    shape, dtype = (1,) + tuple(np.shape(example_inputs))[1:], jnp.asarray(example_inputs).dtype
    if "batch_stats" not in _variable_shapes(model, shape, dtype):
        return {}
    return _fresh_batch_stats(model, shape, dtype)


# ----------------------------------------------------------------------------------------------
# Public API

step_slices = semantics.step_slices


def _one_user(model, payload, data, cfg, key, user_state, loss, function, check_finite, strategy):
    """``local_gradient`` / ``local_update``: checks, the user's ``run``, the finite check, metadata."""
    data = validation.validate_user(model, payload, data, cfg, key, user_state, loss, function, check_finite)
    validation.check_strategy(strategy)
    finite_mode = validation.finite_check_mode(check_finite, payload, data, key, user_state)
    inputs, labels = (validation.first_examples(jnp.asarray(values), cfg.num_data_points)
                      for values in (data.inputs, data.labels))
    if payload.batch_stats is None and user_state is None:
        user_state = initial_batch_stats(model, inputs)
    user = User(model, cfg, loss, strategy)
    args = (payload.params, payload.batch_stats, user_state, inputs, labels, key)
    # An eager call's finite check is decided in the user's own program (one reduction, one
    # transfer); the diagnosis below runs only when it failed, or under a trace (checkify).
    if finite_mode == "eager":
        result, finite = user.run_checked(*args)
        if bool(finite):
            finite_mode = "off"
    else:
        result = user.run(*args)

    def first_steps(steps):  # the outputs after the first local steps: diagnoses a non-finite result only
        fewer = user.replace(cfg=cfg.replace(num_local_updates=steps)).run(*args)
        return {"gradients": fewer.gradients, "batch_stats": fewer.batch_stats}

    validation.check_outputs(finite_mode, {"gradients": result.gradients, "batch_stats": result.batch_stats},
                             function, cfg, first_steps if user.multi_step else None)
    train = payload.batch_stats is None
    # As the reference: multi-step users always report their buffers (the server's in eval mode),
    # single-step users only in train mode; a model without BatchNorm reports an empty tree.
    buffers = result.batch_stats if (user.multi_step or train) else None
    shared = SharedData(
        gradients=result.gradients,
        batch_stats=buffers if cfg.provide_buffers else None,
        metadata=semantics.user_metadata(cfg, labels, data.data_key),
    )
    true_data = TrueUserData(data=result.inputs, labels=labels, batch_stats=buffers, user_state=result.batch_stats)
    return shared, true_data, result.batch_stats


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

    Args:
      model: a Flax module of the zoo (``fedjax_users.models.get``).
      payload: the server's parameters, and its BatchNorm buffers (eval mode with them) or
        ``None`` (train mode with ``user_state``).
      data: the user's ``[examples, ...]`` inputs and labels; the first ``cfg.num_data_points`` are used.
      cfg: a ``local_gradient`` user config (clipping and noise in ``local_diff_privacy``).
      key: the user's PRNG key (input noise, gradient noise).
      user_state: the user's own BatchNorm statistics (default: freshly initialised).
      loss: per-example loss ``(logits, labels)``.
      check_finite: raise ``NonFiniteError`` for a non-finite gradient or statistic. ``None``
        checks eager calls (decided in the compiled program) and not calls under an outer ``jit``;
        ``True`` under a ``jit`` adds ``checkify.check``s (wrap the program in
        ``jax.experimental.checkify.checkify``); ``False`` checks nothing, inputs included. See
        ``docs/validation.md``.
      strategy: how to run it (``fedjax_users.strategy.Strategy``; the numbers do not depend on it).

    Returns:
      ``(shared, true_data, user_state)``: what the server sees (``SharedData``), what the user
      holds (``TrueUserData``) and its statistics after the query.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jnp.ones((2, 4, 4, 1)), jnp.array([0, 2])
        >>> payload = fu.ServerPayload(params=model.init(jax.random.key(0), x)["params"])
        >>> cfg = fu.UserConfig.from_yaml("local_gradient", overrides=["num_data_points=2"])
        >>> shared, true_data, _ = fu.local_gradient(model, payload, fu.UserData(x, y), cfg, jax.random.key(1))
        >>> shared.gradients["1"]["bias"].shape, true_data.labels.tolist()
        ((3,), [0, 2])
    """
    return _one_user(model, payload, data, cfg, key, user_state, loss, "local_gradient", check_finite, strategy)


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

    Args:
      model, payload, data, key, user_state, loss, strategy: as for ``local_gradient``.
      cfg: a ``local_update`` user config (``num_local_updates`` steps of
        ``num_data_per_local_update_step`` examples at ``local_learning_rate``).
      check_finite: as for ``local_gradient``; a non-finite result names the first local step
        that went non-finite (found by re-running fewer steps, only on that error path).

    Returns:
      ``(shared, true_data, user_state)`` as for ``local_gradient``, the update being the
      parameter difference after the local steps.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jnp.ones((4, 4, 4, 1)), jnp.array([0, 2, 1, 1])
        >>> payload = fu.ServerPayload(params=model.init(jax.random.key(0), x)["params"])
        >>> cfg = fu.UserConfig(user_type="local_update", num_data_points=4, num_local_updates=2,
        ...                     num_data_per_local_update_step=2, local_learning_rate=0.1,
        ...                     provide_local_hyperparams=True)
        >>> shared, _, _ = fu.local_update(model, payload, fu.UserData(x, y), cfg, jax.random.key(1))
        >>> shared.metadata.local_hyperparams.steps
        2
    """
    return _one_user(model, payload, data, cfg, key, user_state, loss, "local_update", check_finite, strategy)


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


def _choose(model, loss, cfg, payload, users, strategy: Optional[Strategy], platform: Optional[str] = None) -> Strategy:
    """``strategy`` with its open fields chosen for ``users`` = (own stats, inputs, labels, keys), all stacked."""
    first = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), users)

    def one_user(sizing: Strategy) -> tuple:
        # What one user needs: XLA's memory estimate of this very computation for one user.
        user = User(model, cfg, loss, sizing)
        convs = bool(sizing.per_user_convs) and user.multi_step  # single-step users have no such path
        fn = lambda shared, *rest: user._apply((*shared, *rest), convs)  # noqa: E731
        return fn, ((payload.params, payload.batch_stats),) + first, (user, convs)

    def users_per_chunk_for(sizing: Strategy, per_device: int, platform: str) -> int:
        fn, args, cache_key = one_user(sizing)
        return chunking.auto_users_per_chunk(fn, args, per_device, cache_key=cache_key, platform=platform)

    def examples_per_chunk_for(sizing: Strategy) -> Optional[int]:
        return examples.auto_examples_per_chunk(cfg.num_data_points, chunking.user_bytes(*one_user(sizing)))

    chunkable = examples.chunkable(cfg.is_multi_step, cfg.local_diff_privacy, payload.batch_stats is not None)
    return strategy_lib.choose(strategy, users[1].shape[0], cfg.is_multi_step, users_per_chunk_for, platform,
                               examples_per_chunk_for if chunkable else None)


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
    return _choose(model, loss or softmax_cross_entropy, cfg, payload, users, strategy, platform)


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

    Users are ``local_update`` users if ``num_local_updates > 1``, else ``local_gradient`` users.
    How they run is ``strategy``: the devices the users axis is split over (default every device,
    of every host after ``jax.distributed.initialize``), the users each device runs at a time,
    im2col convolutions for multi-step users, a user's examples a chunk at a time when one user
    would not fit; its open fields are chosen by ``fedjax_users.strategy.choose``, and
    ``fu.choose_strategy`` says what a call would use.

    Args:
      model, payload, key, loss, strategy: as for ``local_gradient`` (one key for the cohort,
        split into one per user).
      users_data: stacked ``[users, examples, ...]`` inputs and labels, or a
        ``fedjax_users.cohort.Cohort``, whose users are read a chunk at a time (decoded ahead in
        background threads) with the same result bit for bit: memory then follows the chunk, not
        the cohort, and ``true_data.data`` is ``None`` (the inputs are the cohort's).
      cfg: a ``multiuser_aggregate`` config (or one of the single-user kinds: every user is then one).
      users_state: the users' own BatchNorm statistics, stacked per user, used when the server
        sends no buffers.
      progress: ``progress(users done, users)``, called on the host as chunks finish (e.g.
        ``fedjax_users.progress.Progress().counter("users")``); not called under an outer ``jit``.
      check_finite: as for ``local_gradient``; a non-finite mean names the first user whose own
        update is non-finite, and its local step (found only on that error path).
      checkpoint: a ``fedjax_users.strategy.streaming.Checkpoint`` (a cohort only): the running sum
        saved every few chunks, resumed from a folder that holds one.

    Returns:
      ``(shared, true_data)``: the mean update with the aggregate's metadata, and what the users
      hold (their updated statistics in ``true_data.user_state``).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jnp.ones((3, 2, 4, 4, 1)), jnp.array([[0, 2], [1, 1], [2, 0]])
        >>> payload = fu.ServerPayload(params=model.init(jax.random.key(0), x[0])["params"])
        >>> cfg = fu.UserConfig(user_type="multiuser_aggregate", num_data_points=2, user_range=(0, 3))
        >>> shared, _ = fu.aggregate(model, payload, fu.UserData(x, y), cfg, jax.random.key(1))
        >>> shared.metadata.num_users
        3
    """
    streamed = isinstance(users_data, Cohort)
    # A cohort is checked on its first user (shapes, dtypes, labels), each chunk as it loads.
    sample = validation.validate_users(
        model, payload, users_data.first() if streamed else users_data, cfg, key, users_state, loss, check_finite,
        num_users=len(users_data) if streamed else None,
    )
    validation.check_strategy(strategy)
    finite_mode = validation.finite_check_mode(check_finite, payload, sample, key, users_state)
    cohort = _Cohort.prepare(model, payload, users_data if streamed else sample, sample, cfg, key, users_state, loss,
                             strategy)
    if streamed:
        total, users_stats, recorded, labels = cohort.stream(progress, checkpoint, check_finite)
    else:
        total, users_stats, recorded, labels = cohort.in_memory(progress)
    num_users = cohort.num_users
    mean_grads = jax.tree_util.tree_map(lambda t: t / num_users, total)
    validation.check_outputs(finite_mode, {"gradients": mean_grads, "batch_stats": users_stats}, "aggregate",
                             cfg, users=(num_users, cohort.one_user_alone))
    buffers = semantics.mean_over_users(users_stats, num_users) if cohort.train or cohort.user.multi_step else None
    # Under an outer jit the labels are tracers and must stay JAX arrays.
    traced = isinstance(labels, jax.core.Tracer)
    metadata = semantics.aggregate_metadata(cfg, labels, to_host=(lambda a: a) if traced else np.asarray)
    shared = SharedData(gradients=mean_grads, batch_stats=buffers if cfg.provide_buffers else None, metadata=metadata)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    true_data = TrueUserData(
        data=None if recorded is None else flat(recorded),
        labels=flat(labels),
        batch_stats=buffers,
        user_state=users_stats if cohort.train else None,
    )
    return shared, true_data


@dataclasses.dataclass(frozen=True)
class _Cohort:
    """An aggregate's users as they run: the user, its strategy and mesh, keys and statistics."""

    user: User
    payload: ServerPayload
    users_data: Any  # stacked ``UserData`` or a ``Cohort``
    keys: Array
    users_state: Optional[PyTree]  # the users' own statistics, stacked (train mode), or None
    fresh: Optional[PyTree]  # fresh statistics for every user (train mode without ``users_state``)
    mesh: Any
    shared: tuple  # the server's (params, buffers), placed on the mesh

    @classmethod
    def prepare(cls, model, payload, users_data, sample, cfg, key, users_state, loss, strategy) -> "_Cohort":
        """Keys, fresh statistics and the chosen strategy for these users; nothing computed."""
        num_users = len(users_data) if isinstance(users_data, Cohort) else np.shape(users_data.inputs)[0]
        train = payload.batch_stats is None
        example = jnp.asarray(sample.inputs)[0, : cfg.num_data_points]
        fresh = initial_batch_stats(model, example) if train and users_state is None else None
        keys = jax.random.split(key, num_users)
        users_spec = _stacked_users_spec(model, payload, sample, cfg, num_users)
        strategy = _choose(model, loss, cfg, payload, users_spec[:3] + (keys,), strategy)
        mesh = sharding.users_mesh(strategy.devices)
        shared = sharding.to_global((payload.params, payload.batch_stats), mesh)
        return cls(User(model, cfg, loss, strategy), payload, users_data, keys, users_state, fresh, mesh, shared)

    @property
    def num_users(self) -> int:
        return self.keys.shape[0]

    @property
    def train(self) -> bool:
        return self.payload.batch_stats is None

    @property
    def n(self) -> int:
        return self.user.cfg.num_data_points

    def run(self, users: tuple, valid: Array, first: Any, count: int) -> tuple:
        """Chunks of placed ``users`` through the user's compiled ``sum_chunks``."""
        return self.user.sum_chunks(self.mesh, self.user.strategy.users_per_chunk, self.shared, users, valid, first,
                                    count)

    def stats_of(self, positions: Any) -> Optional[PyTree]:
        """The own statistics of the users at ``positions`` (``None`` in eval mode)."""
        if not self.train:
            return None
        if self.users_state is not None:
            return jax.tree_util.tree_map(lambda s: s[positions], self.users_state)
        return _broadcast_users(self.fresh, len(positions))

    def in_memory(self, progress) -> tuple:
        """Every user from stacked arrays: (summed update, stats, recorded inputs, labels)."""
        n, strategy = self.n, self.user.strategy
        inputs, labels = jnp.asarray(self.users_data.inputs)[:, :n], jnp.asarray(self.users_data.labels)[:, :n]
        stats = self.stats_of(np.arange(self.num_users)) if self.users_state is None else self.users_state
        users_args, valid = sharding.place_users((inputs, labels, self.keys, stats if self.train else None), self.mesh)
        # Under an outer jit the loop below runs once, at trace time: no progress to report.
        traced = isinstance(inputs, jax.core.Tracer) or isinstance(labels, jax.core.Tracer)
        per_device = sharding.users_per_device(self.num_users, self.mesh)
        # Users without convolutions run all chunks in one scan (see chunking); others one per call.
        chunks_per_step = chunking.num_chunks(per_device, strategy.users_per_chunk) if strategy.per_user_convs else 1
        total, (users_stats, recorded) = chunking.sum_chunks(
            lambda first, count: self.run(users_args, valid, first, count), per_device, strategy.users_per_chunk,
            self.num_users, None if traced else progress, chunks_per_step,
        )
        if recorded is None:
            # The users' own inputs. Given as NumPy, they come back as a view of the caller's array
            # rather than a second copy of the whole cohort's data (938 MiB for 10,000 CIFAR users of 8).
            given = self.users_data.inputs
            recorded = given[:, :n] if isinstance(given, np.ndarray) else inputs
        return total, users_stats, recorded, labels

    def stream(self, progress, checkpoint, check_finite) -> tuple:
        """Every user read from the cohort a chunk at a time: (summed update, stats, None, labels)."""
        n, mesh, size = self.n, self.mesh, self.user.strategy.users_per_chunk
        plan = streaming.ChunkPlan(self.num_users, 1 if mesh is None else mesh.size,
                                   sharding.users_per_device(self.num_users, mesh), size)

        def chunk_step(chunk, examples, positions, kept, local):
            x, y = examples["inputs"][:, :n], examples["labels"][:, :n]
            placed, valid = sharding.place_chunk((x, y), (self.keys[positions], self.stats_of(positions)), kept, mesh)
            chunk_total, (chunk_stats, _) = self.run(placed, valid, 0, 1)
            # The labels travel with the outputs (for the metadata, and saved with a checkpoint);
            # noised inputs do not: kept for every user, memory would grow with the cohort.
            chunk_labels = placed[1].reshape((1, plan.groups, size) + placed[1].shape[1:])
            return chunk_total, (chunk_stats, None, chunk_labels)

        def check_chunk(examples):
            validation.check_chunk(self.user.model, self.payload, examples["inputs"][:, :n],
                                   examples["labels"][:, :n], self.user.loss, check_finite)

        total, (users_stats, _, labels) = streaming.stream_chunks(
            chunk_step, self.users_data, plan, self.user.strategy.devices if mesh is not None else None, progress,
            checkpoint, on_load=check_chunk,
        )
        if jax.process_count() > 1:  # each process read its own users: the metadata needs them all
            from jax.experimental import multihost_utils

            labels = jnp.asarray(multihost_utils.process_allgather(labels, tiled=True))
        return total, users_stats, None, labels

    def one_user_alone(self, user: int, steps: int) -> dict:
        """One user alone, after its first local steps: diagnoses a non-finite mean only."""
        if isinstance(self.users_data, Cohort):
            x, y = self.users_data.load_user(user)
        else:
            x, y = self.users_data.inputs[user], self.users_data.labels[user]
        # ``run`` is one user alone: the strategy's devices, chunks and per-user convolutions are not read.
        alone = self.user.replace(cfg=self.user.cfg.replace(num_local_updates=steps)) if self.user.multi_step else self.user
        own = None
        if self.train:
            own = self.fresh if self.users_state is None else jax.tree_util.tree_map(lambda s: s[user], self.users_state)
        result = alone.run(self.payload.params, self.payload.batch_stats, own, jnp.asarray(x[: self.n]),
                           jnp.asarray(y[: self.n]), self.keys[user])
        return {"gradients": result.gradients, "batch_stats": result.batch_stats}
