"""The contenders of each workload, as zero-argument calls that block until their result is ready.

* ``fedjax_users``: the public function under an outer jit, as the README says to write it: clipped
  ``local_gradient`` under ``fu.strategy.jit`` (the compile options of ``fedjax_users.strategy.compilation``), the
  rest under ``jax.jit``;
  ``fedjax_users_eager``: the same call without the outer jit (its Python-side validation included);
  ``fedjax_users_unchecked``: the eager call with ``check_finite=False``, so that the rows show what
  the default checks of an eager call cost (``checks_over_unchecked``).
* ``breaching``: breaching's own user classes, unmodified (``UserSingleStep`` loops over examples
  when clipping; ``MultiUserAggregate`` runs its users one after another; its mean is defective but
  its cost is that of the intended computation).
* ``torch_func``: :mod:`benchmarks.torch_func`, vectorised with ``torch.func``.
* ``floor_jax`` / ``floor_torch``: the plain batch gradient over all the workload's examples.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import torch
from omegaconf import OmegaConf

import fedjax_users as fu
from fedjax_users.losses import softmax_cross_entropy
from parity import reference

from benchmarks import problems, torch_func
from benchmarks.device import torch_sync
from benchmarks.grid import Workload
from benchmarks.pairs import ModelPair, torch_loss
from benchmarks.problems import Data
from benchmarks.timing import Contender


def _fedjax_call(pair: ModelPair, workload: Workload, check_finite: Optional[bool] = None) -> Callable:
    """The public fedjax_users function of the workload, as a function of arrays only."""
    model, cfg = pair.flax_model, problems.user_config(workload)

    def call(params, stats, inputs, labels, key):
        payload = fu.ServerPayload(params=params, batch_stats=stats)
        data = fu.UserData(inputs=inputs, labels=labels)
        if workload.kind == "aggregate":
            shared, _ = fu.aggregate(model, payload, data, cfg, key, check_finite=check_finite)
        else:
            compute = fu.local_gradient if workload.kind == "local_gradient" else fu.local_update
            shared, _, _ = compute(model, payload, data, cfg, key, check_finite=check_finite)
        return shared.gradients

    return call


def _fedjax_args(pair: ModelPair, data: Data) -> tuple:
    inputs, labels = data.jax()
    return pair.payload.params, pair.payload.batch_stats, inputs, labels, jax.random.key(0)


def fedjax_jit(pair: ModelPair, workload: Workload, data: Data) -> Contender:
    """fedjax_users under an outer jit: validation and metadata are traced away."""
    jit = fu.strategy.jit if problems.user_config(workload).local_diff_privacy.per_example_clipping > 0 else jax.jit
    jitted, args = jit(_fedjax_call(pair, workload)), _fedjax_args(pair, data)
    return lambda: jax.block_until_ready(jitted(*args))


def fedjax_eager(pair: ModelPair, workload: Workload, data: Data) -> Contender:
    """fedjax_users called as it is: Python-side validation, then its own jitted core."""
    call, args = _fedjax_call(pair, workload), _fedjax_args(pair, data)
    return lambda: jax.block_until_ready(call(*args))


def fedjax_unchecked(pair: ModelPair, workload: Workload, data: Data) -> Contender:
    """The eager call with ``check_finite=False``: no input checks, no finite check."""
    call, args = _fedjax_call(pair, workload, check_finite=False), _fedjax_args(pair, data)
    return lambda: jax.block_until_ready(call(*args))


def breaching(pair: ModelPair, workload: Workload, data: Data) -> Contender:
    """breaching's user class for the workload, fed a one-batch dataloader per user."""
    users = reference.users_module()
    cfg_user = OmegaConf.create(problems.user_config(workload).to_dict())
    setup = dict(device=pair.device, dtype=torch.float32)
    inputs, labels = data.torch(pair.device)
    if workload.kind == "aggregate":
        loaders = [[dict(inputs=inputs[u], labels=labels[u])] for u in range(workload.users)]
        user = users.MultiUserAggregate(
            pair.torch_model, torch_loss(), loaders, setup, cfg_user, user_indices=list(range(workload.users))
        )
    else:
        cls = users.UserSingleStep if workload.kind == "local_gradient" else users.UserMultiStep
        user = cls(pair.torch_model, torch_loss(), [dict(inputs=inputs, labels=labels)], setup, 0, cfg_user)
    payload = pair.torch_payload()

    def call() -> None:
        user.compute_local_updates(dict(payload))  # a shallow copy: MultiUserAggregate rebinds its lists
        torch_sync(pair.device)

    return call


def torch_vectorised(pair: ModelPair, workload: Workload, data: Data) -> Optional[Contender]:
    """The ``torch.func`` version; ``None`` for ``local_update`` (one user's steps are sequential)."""
    if workload.kind == "local_update":
        return None
    params, buffers = torch_func.model_state(pair.torch_model)
    model, loss = pair.torch_model, torch_loss()
    inputs, labels = data.torch(pair.device)
    if workload.kind == "local_gradient":
        compute = lambda: torch_func.clipped_mean_gradient(  # noqa: E731
            model, loss, params, buffers, inputs, labels, problems.CLIP
        )
    elif workload.steps > 1:
        compute = lambda: torch_func.mean_user_update(  # noqa: E731
            model, loss, params, buffers, inputs, labels, workload.steps, problems.LEARNING_RATE
        )
    else:
        compute = lambda: torch_func.mean_user_gradient(model, loss, params, buffers, inputs, labels)  # noqa: E731

    def call() -> None:
        compute()
        torch_sync(pair.device)

    return call


def _jax_batch_gradient(model) -> Callable:
    def gradient(params, stats, inputs, labels):
        def loss(p):
            variables = {"params": p, "batch_stats": stats} if stats else {"params": p}
            return jnp.mean(softmax_cross_entropy(model.apply(variables, inputs, train=False), labels))

        return jax.grad(loss)(params)

    return jax.jit(gradient)


def floor_jax(pair: ModelPair, workload: Workload, data: Data) -> Contender:
    """The plain batch gradient of the mean loss over all the workload's examples, in JAX."""
    inputs, labels = data.flat().jax()
    gradient, stats = _jax_batch_gradient(pair.flax_model), pair.payload.batch_stats
    return lambda: jax.block_until_ready(gradient(pair.payload.params, stats, inputs, labels))


def floor_torch(pair: ModelPair, workload: Workload, data: Data) -> Contender:
    """The same floor with plain torch autograd."""
    inputs, labels = data.flat().torch(pair.device)
    params, loss = list(pair.torch_model.parameters()), torch_loss()

    def call() -> None:
        torch.autograd.grad(loss(pair.torch_model(inputs=inputs), labels), params)
        torch_sync(pair.device)

    return call


BUILDERS: dict[str, Callable[[ModelPair, Workload, Data], Optional[Contender]]] = {
    "fedjax_users": fedjax_jit,
    "fedjax_users_eager": fedjax_eager,
    "fedjax_users_unchecked": fedjax_unchecked,
    "torch_func": torch_vectorised,
    "breaching": breaching,
    "floor_jax": floor_jax,
    "floor_torch": floor_torch,
}


# The eager call differs from the jitted one by a constant Python-side cost per call: it matters
# (and is timed) only where a call takes milliseconds; elsewhere it would just compile twice.
EAGER_MODELS = ("lenet_zhu",)


def _wanted(name: str, workload: Workload, only: Optional[set]) -> bool:
    if name in workload.skip:
        return False
    if only is not None:
        return name in only
    return name not in ("fedjax_users_eager", "fedjax_users_unchecked") or workload.model in EAGER_MODELS


def build(pair: ModelPair, workload: Workload, data: Data, only: Optional[set] = None) -> dict[str, Contender]:
    """The workload's contenders (``only``: a subset of names), skipping those that do not apply."""
    built = {name: make(pair, workload, data) for name, make in BUILDERS.items() if _wanted(name, workload, only)}
    return {name: call for name, call in built.items() if call is not None}
