"""The user computations vectorised with ``torch.func``: the strongest PyTorch way to write them.

Per-example clipping is ``vmap(grad(loss))`` over single examples, each example its own batch of
one (breaching's loop, vectorised); many users are ``vmap`` over users of their local SGD steps.
Both follow breaching's rules: global norm = norm of the per-tensor norms, scale by
``C / (norm + 1e-6)`` only when ``norm > C``, shared update = mean over examples / users.
The model must be in eval mode (or free of BatchNorm): ``vmap`` cannot update running statistics.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import functional_call, grad, vmap

Tensors = dict[str, torch.Tensor]
CLIP_EPSILON = 1e-6


def model_state(model: torch.nn.Module) -> tuple[Tensors, Tensors]:
    """Detached parameters and buffers by name, the inputs of ``functional_call``."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return params, buffers


def _batch_loss(model: torch.nn.Module, loss: Callable) -> Callable:
    def batch_loss(params: Tensors, buffers: Tensors, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, (params, buffers), args=(), kwargs=dict(inputs=inputs)), labels)

    return batch_loss


def clip_factors(per_example: Tensors, clip: float) -> torch.Tensor:
    """Per-example scale of breaching's clipping rule, from gradients with a leading example axis."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], dim=1).norm(dim=1)
    return torch.where(norms > clip, clip / (norms + CLIP_EPSILON), torch.ones_like(norms))


def per_example_gradients(
    model: torch.nn.Module, loss: Callable, params: Tensors, buffers: Tensors,
    inputs: torch.Tensor, labels: torch.Tensor,
) -> Tensors:
    """Each example's gradient, as a batch of one, stacked on a leading example axis."""
    gradient = grad(_batch_loss(model, loss))
    return vmap(lambda x, y: gradient(params, buffers, x[None], y[None]))(inputs, labels)


def clipped_mean_gradient(
    model: torch.nn.Module, loss: Callable, params: Tensors, buffers: Tensors,
    inputs: torch.Tensor, labels: torch.Tensor, clip: float,
) -> Tensors:
    """Mean of the per-example clipped gradients (``UserSingleStep`` with ``per_example_clipping``)."""
    per_example = per_example_gradients(model, loss, params, buffers, inputs, labels)
    factors = clip_factors(per_example, clip)
    return {name: torch.tensordot(factors, g, dims=1) / inputs.shape[0] for name, g in per_example.items()}


def mean_user_update(
    model: torch.nn.Module, loss: Callable, params: Tensors, buffers: Tensors,
    inputs: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, chunk_size: Optional[int] = None,
) -> Tensors:
    """Mean over users of ``params_after - params`` after ``steps`` SGD steps each (``UserMultiStep``).

    ``inputs`` is ``[users, steps * k, ...]``; step ``s`` takes examples ``[s*k, (s+1)*k)``, which is
    breaching's slicing whenever the steps divide the user's data evenly.
    """
    gradient = grad(_batch_loss(model, loss))
    per_step = inputs.shape[1] // steps

    def user_update(x: torch.Tensor, y: torch.Tensor) -> Tensors:
        current = params
        for s in range(steps):
            window = slice(s * per_step, (s + 1) * per_step)
            g = gradient(current, buffers, x[window], y[window])
            current = {name: current[name] - lr * g[name] for name in current}
        return {name: current[name] - params[name] for name in current}

    updates = vmap(user_update, chunk_size=chunk_size)(inputs, labels)
    return {name: u.mean(dim=0) for name, u in updates.items()}


def mean_user_gradient(
    model: torch.nn.Module, loss: Callable, params: Tensors, buffers: Tensors,
    inputs: torch.Tensor, labels: torch.Tensor, chunk_size: Optional[int] = None,
) -> Tensors:
    """Mean over users of each user's batch gradient (single-step users, ``UserSingleStep``)."""
    gradient = grad(_batch_loss(model, loss))
    per_user = vmap(lambda x, y: gradient(params, buffers, x, y), chunk_size=chunk_size)(inputs, labels)
    return {name: g.mean(dim=0) for name, g in per_user.items()}

