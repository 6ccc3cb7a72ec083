"""One user computation, built once: ``User(model, cfg, loss, strategy)`` and its pure ``run``.

In the manner of optax's transformations, a ``User`` binds what does not change from call to call
(the model, the loss, breaching's user config, the execution strategy) and is then applied as a
pure function of what does (parameters, statistics, data, key). It is hashable by what its
computation depends on, and nothing else: two users whose configs differ only in what the server
is told (``provide_labels``, ``user_idx``, ...) or whose strategies differ only in what an
aggregate's chunking reads are equal, so they share one compiled program per input shape.

What a user computes is ``fedjax_users.semantics``; ``User`` runs it through the strategy's fast
paths (``fedjax_users.strategy``): per-example kernel gradients for clipping, im2col convolutions
and a ``lax.scan`` over long local schedules, and for an aggregate's chunks of users either a
``vmap`` of the user or (unclipped single-step users) one gradient of their summed losses.
``fedjax_users.users`` (``local_gradient``, ``local_update``, ``aggregate``) adds the checks and
the metadata around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_users import privacy, semantics
from fedjax_users.config import UserConfig
from fedjax_users.losses import LossFn, softmax_cross_entropy
from fedjax_users.strategy import Strategy, chunking, clipping, compilation, examples, patches, sharding

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class User:
    """One breaching user, bound to its model, loss, config and execution strategy.

    Attributes:
      model: a Flax module (``fedjax_users.models.get``); its ``apply`` takes ``train``, ``mask``
        and ``momentum`` as the zoo's models do.
      cfg: breaching's user config. A ``local_gradient`` config (or an aggregate's with one local
        update) is a single-step user, a ``local_update`` config (or an aggregate's with several)
        a multi-step user: ``cfg.is_multi_step`` decides, here and nowhere else.
      loss: per-example loss ``(logits, labels) -> [examples]``.
      strategy: how to run it; the numbers do not depend on it beyond float rounding.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import fedjax_users as fu
        >>> model = fu.models.get("linear", num_classes=3, num_channels=1)
        >>> x, y = jnp.ones((2, 4, 4, 1)), jnp.array([0, 2])
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> user = fu.User(model, fu.UserConfig.from_yaml("local_gradient", overrides=["num_data_points=2"]))
        >>> result = user.run(params, None, {}, x, y, jax.random.key(1))
        >>> result.gradients["1"]["kernel"].shape
        (16, 3)
        >>> user == fu.User(model, user.cfg.replace(provide_labels=not user.cfg.provide_labels))
        True
    """

    model: Any
    cfg: UserConfig
    loss: LossFn = softmax_cross_entropy
    strategy: Strategy = dataclasses.field(default_factory=Strategy)

    def __post_init__(self):
        if self.strategy is None:
            object.__setattr__(self, "strategy", Strategy())

    @property
    def multi_step(self) -> bool:
        """Whether the user trains several local steps (breaching's ``UserMultiStep``)."""
        return self.cfg.is_multi_step

    @property
    def clips_examples(self) -> bool:
        """Whether the user clips per example (a single-step user with ``per_example_clipping``)."""
        return not self.multi_step and self.cfg.local_diff_privacy.per_example_clipping > 0

    @property
    def records_noise(self) -> bool:
        """Whether the inputs the user records differ from its inputs: an unclipped single-step
        user with input noise writes its noised inputs back into its data, as the reference does."""
        dp = self.cfg.local_diff_privacy
        return not self.multi_step and dp.per_example_clipping <= 0 and dp.input_noise > 0

    def _computation(self) -> tuple:
        """Everything ``apply`` reads: the identity of the compiled program."""
        cfg, strategy = self.cfg, self.strategy
        if self.multi_step:
            how = (cfg.num_data_points, cfg.num_local_updates, cfg.num_data_per_local_update_step,
                   cfg.local_learning_rate, strategy.max_unrolled_steps)
        else:
            how = (strategy.fast_clipping if self.clips_examples else None, strategy.examples_per_chunk)
        return (self.model, self.loss, self.multi_step, cfg.local_diff_privacy, how)

    def __hash__(self) -> int:
        return hash(self._computation())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, User) and self._computation() == other._computation()

    def replace(self, **changes: Any) -> "User":
        """A copy with some fields changed.

        Args:
          **changes: new values of ``model``, ``cfg``, ``loss`` or ``strategy``, e.g.
            ``user.replace(cfg=user.cfg.replace(num_local_updates=2))``.

        Returns:
          The new ``User``.
        """
        return dataclasses.replace(self, **changes)

    def apply(self, params: PyTree, server_stats: Optional[PyTree], user_stats: PyTree, inputs: Array,
              labels: Array, key: Array) -> semantics.UserResult:
        """The user's computation, traceable (``run`` is this, compiled once).

        Args:
          params: the server's parameters.
          server_stats: the server's BatchNorm buffers (eval mode with them), or ``None`` (train
            mode with ``user_stats``).
          user_stats: the user's own BatchNorm statistics (``{}`` for a model without them).
          inputs, labels: the user's ``cfg.num_data_points`` examples.
          key: the user's PRNG key (split as ``fedjax_users.semantics`` says).

        Returns:
          ``semantics.UserResult``: the shared update, the statistics after the query and the
          inputs the user records.
        """
        return self._apply((params, server_stats, user_stats, inputs, labels, key), convs_as_matmuls=False)

    def _apply(self, args: tuple, convs_as_matmuls: bool) -> semantics.UserResult:
        """``apply``; ``convs_as_matmuls``: run a multi-step user's convolutions as im2col matmuls."""
        if self.multi_step:
            return self._multi_step(*args, convs_as_matmuls=convs_as_matmuls)
        clipped_mean = functools.partial(clipping.clipped_mean_gradient, fast=self.strategy.fast_clipping,
                                         examples_per_chunk=self.strategy.examples_per_chunk)
        return semantics.single_step_user(self.model, self.loss, self.cfg, *args, clipped_mean=clipped_mean,
                                          batch_loss=self._batch_loss())

    def _batch_loss(self):
        """The loss an unclipped single-step user differentiates: ``semantics.single_step_loss``, or
        the same a chunk of examples at a time (``strategy.examples``, eval mode only) when the
        strategy sets ``examples_per_chunk``."""
        if self.strategy.examples_per_chunk is None or self.clips_examples:
            return semantics.single_step_loss
        return examples.chunked_single_step_loss(self.strategy.examples_per_chunk)

    def run(self, params: PyTree, server_stats: Optional[PyTree], user_stats: PyTree, inputs: Array,
            labels: Array, key: Array) -> semantics.UserResult:
        """``apply``, jit-compiled once per input shape for every user equal to this one (pure).

        An eager call of a clipping user takes XLA:CPU's memory-optimized schedule where that pays
        (``fedjax_users.strategy.compilation``).

        Args:
          params, server_stats, user_stats, inputs, labels, key: as in ``apply``.

        Returns:
          ``semantics.UserResult``, as ``apply``.
        """
        return _run(self, params, server_stats, user_stats, inputs, labels, key)

    def run_checked(self, params: PyTree, server_stats: Optional[PyTree], user_stats: PyTree, inputs: Array,
                    labels: Array, key: Array) -> tuple[semantics.UserResult, Array]:
        """``run``, and whether every update and statistic is finite, decided in the same program.

        The check is one fused reduction and one scalar to transfer: an eager call's finite check
        costs next to nothing, and only a failure pays for the diagnosis
        (``fedjax_users.validation.check_outputs``).

        Args:
          params, server_stats, user_stats, inputs, labels, key: as in ``apply``.

        Returns:
          ``(result, all_finite)``, ``all_finite`` a boolean scalar array.
        """
        return _run_checked(self, params, server_stats, user_stats, inputs, labels, key)

    def _multi_step(self, params, server_stats, user_stats, inputs, labels, key,
                    convs_as_matmuls: bool) -> semantics.UserResult:
        """``semantics.multi_step_user``, its steps unrolled or (past ``max_unrolled_steps``) a ``lax.scan``.

        ``convs_as_matmuls`` (an aggregate's ``strategy.per_user_convs``): an aggregate ``vmap``s over users, so after the first step every
        user's kernels differ; the steps then run their convolutions as im2col matmuls
        (``fedjax_users.strategy.patches``) instead of the grouped convolutions ``vmap`` would make.
        The first step too: it costs about the same, and leaves no convolution to slow a loop over chunks.
        """
        cfg, model, loss = self.cfg, self.model, self.loss
        with patches.convolutions_as_matmuls() if convs_as_matmuls else contextlib.nullcontext():
            if cfg.num_local_updates <= self.strategy.max_unrolled_steps:
                # A Python loop over static slices, each step exactly its examples (no padding or mask).
                # Not ``lax.scan(unroll=True)``: it keeps a one-trip loop and gathers for a single step,
                # which ran 4x slower than this on XLA:CPU.
                return semantics.multi_step_user(model, loss, cfg, params, server_stats, user_stats, inputs, labels, key)
            index, valid = _step_indices(cfg)
            train = server_stats is None

            def step(state, xs):
                idx, mask, step_key = xs
                return semantics.local_step(model, loss, cfg, train, state, inputs[idx], labels[idx], step_key, mask), None

            state = semantics.initial_local_state(cfg, params, server_stats, user_stats)
            masks = None if valid is None else jnp.asarray(valid)
            steps = (jnp.asarray(index), masks, jax.random.split(key, cfg.num_local_updates))
            state, _ = jax.lax.scan(step, state, steps)
        return semantics.UserResult(
            gradients=semantics.parameter_difference(state.params, params), batch_stats=state.batch_stats,
            inputs=inputs,
        )

    def sum_chunks(self, mesh: Any, users_per_chunk: int, shared: tuple, users: tuple, valid: Array,
                   first: Array, count: int) -> tuple[PyTree, tuple]:
        """Chunks of an aggregate's users on every device: their summed update, and per user the
        statistics and recorded inputs (``None`` unless ``records_noise``). Compiled once per shape.

        Args:
          mesh: the users' device mesh (``strategy.sharding.users_mesh``), or ``None``.
          users_per_chunk: users each device runs at a time.
          shared: ``(server params, server buffers or None)``, placed on the mesh.
          users: ``(inputs, labels, keys, own stats)`` as ``strategy.sharding.place_users`` places them.
          valid: which placed users are real (not padding).
          first, count: the device runs blocks ``first .. first + count - 1`` of its users.

        Returns:
          ``(summed update, (statistics, recorded inputs))``, the per-user outputs stacked
          ``[count, groups, users_per_chunk, ...]``.
        """
        convs_as_matmuls = bool(self.strategy.per_user_convs) and self.multi_step
        return _sum_chunks(self, convs_as_matmuls, mesh, users_per_chunk, shared, users, valid, first, count)

    def one_of_many(self, convs_as_matmuls: bool) -> chunking.UserFn:
        """One user of an aggregate as ``vmap`` runs it; also what sizes a chunk of users.

        Args:
          convs_as_matmuls: run a multi-step user's convolutions as im2col matmuls.

        Returns:
          ``(shared, inputs, labels, key, stats) -> (update, (statistics, recorded inputs or None))``.
        """

        def one_user(shared, inputs, labels, key, stats):
            result = self._apply((*shared, stats, inputs, labels, key), convs_as_matmuls)
            return result.gradients, (result.batch_stats, result.inputs if self.records_noise else None)

        return one_user

    def _chunk_fn(self, convs_as_matmuls: bool) -> chunking.ChunkFn:
        """How one chunk of users is summed: per user (``vmap``), or one summed gradient."""
        if self.multi_step or self.clips_examples:
            return chunking.vmap_sum(self.one_of_many(convs_as_matmuls))
        return self._summed_single_step


    def _summed_single_step(self, shared: tuple, users: tuple, keep: Array) -> tuple[PyTree, tuple]:
        """The chunk's unclipped single-step users as ONE gradient of their summed losses.

        Their gradients are all taken at the server's parameters, so their sum is the gradient of
        the summed losses: one weight gradient over the chunk's examples instead of one per user
        (which ``vmap`` lowers to grouped convolutions). Each user's forward pass stays its own
        (``vmap``), so train-mode BatchNorm still uses that user's batch statistics; each user's
        loss, keys and noise are ``semantics.single_step_user``'s own (``single_step_loss``,
        ``single_step_keys``).
        """
        server_params, server_stats = shared
        dp = self.cfg.local_diff_privacy
        train = server_stats is None

        def user_loss(p, x, y, key, own_stats):
            loss, (new_stats, noised) = self._batch_loss()(
                self.model, self.loss, dp, p, own_stats if train else server_stats, train, x, y,
                semantics.single_step_keys(key)[0])
            return loss, (new_stats, noised if self.records_noise else None)

        def kept_loss(p):
            losses, outputs = jax.vmap(user_loss, in_axes=(None, 0, 0, 0, 0))(p, *users)
            return jnp.sum(jnp.where(keep, losses, jnp.zeros((), losses.dtype))), outputs

        grads, outputs = jax.grad(kept_loss, has_aux=True)(server_params)

        def user_noise(key):
            zeros = jax.tree_util.tree_map(jnp.zeros_like, server_params)
            return privacy.add_noise(semantics.single_step_keys(key)[1], zeros, dp.gradient_noise, dp.distribution)

        if dp.gradient_noise > 0:
            noise = chunking.masked_sum(jax.vmap(user_noise)(users[2]), keep)
            grads = jax.tree_util.tree_map(jnp.add, grads, noise)
        return grads, outputs


def _step_indices(cfg: UserConfig) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Static [steps, k] gather indices and a validity mask (``None`` when no step is short)."""
    slices = semantics.step_slices(cfg.num_data_points, cfg.num_data_per_local_update_step, cfg.num_local_updates)
    width = max(length for _, length in slices)
    offsets = np.arange(width)
    valid = np.stack([offsets < length for _, length in slices])
    index = np.stack([np.where(offsets < length, start + offsets, start) for start, length in slices])
    return index, None if valid.all() else valid


def all_finite(*trees: PyTree) -> Array:
    """Whether every floating-point entry of ``trees`` is finite: one boolean scalar.

    Args:
      *trees: pytrees of arrays (integer leaves are ignored).

    Returns:
      A boolean scalar array, ``True`` for trees without floating-point leaves.

    Example::

        >>> import jax.numpy as jnp
        >>> from fedjax_users.user import all_finite
        >>> bool(all_finite({"w": jnp.ones(2)}, [jnp.array([1.0, jnp.inf])]))
        False
    """
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(trees) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.array(True)


def _apply_checked(user: User, *args) -> tuple[semantics.UserResult, Array]:
    result = user.apply(*args)
    return result, all_finite(result.gradients, result.batch_stats)


def _wants_options(user: User, *args) -> bool:
    return user.clips_examples


_run = compilation.top_level_jit(lambda user, *args: user.apply(*args), wants_options=_wants_options,
                                 static_argnums=0)
_run_checked = compilation.top_level_jit(_apply_checked, wants_options=_wants_options, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 8))
def _sum_chunks(user: User, convs_as_matmuls: bool, mesh, size: int, shared, users, valid, first, count: int):
    chunk_fn = user._chunk_fn(convs_as_matmuls)
    return chunking.scan_chunks(
        lambda chunk: sharding.run_chunk(chunk_fn, shared, users, valid, chunk, size, mesh), first, count
    )


__all__ = ["User", "all_finite"]
