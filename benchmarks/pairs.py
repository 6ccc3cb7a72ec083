"""The same model and weights on both sides: a Flax model of the zoo and breaching's torch model."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import torch

import fedjax_users as fu
from fedjax_users import interop, models
from parity import reference

from benchmarks.problems import IMAGE_SHAPE, NUM_CLASSES


@dataclasses.dataclass
class ModelPair:
    """A Flax model and breaching's torch model holding the same weights.

    BatchNorm models are run as breaching's server usually runs them: the server sends its buffers,
    so users are in eval mode. (``MultiUserAggregate`` cannot run without server buffers at all.)
    """

    name: str
    flax_model: Any
    variables: dict
    torch_model: torch.nn.Module
    device: torch.device

    @property
    def payload(self) -> fu.ServerPayload:
        """The fedjax_users server payload."""
        return fu.ServerPayload(params=self.variables["params"], batch_stats=self.variables.get("batch_stats") or None)

    def torch_payload(self) -> dict:
        """A fresh breaching server payload (parameters and buffers; ``[]`` for models without buffers)."""
        return dict(
            parameters=[p.detach().clone() for p in self.torch_model.parameters()],
            buffers=[b.detach().clone() for b in self.torch_model.buffers()],
        )


def build_pair(name: str, device: torch.device, seed: int = 0) -> ModelPair:
    """breaching's model ``name`` at CIFAR size and its Flax twin, with the torch weights copied over."""
    torch.manual_seed(seed)
    torch_model = reference.vision_model(name, num_classes=NUM_CLASSES, shape=IMAGE_SHAPE).eval()
    flax_model = models.get(name, num_classes=NUM_CLASSES, num_channels=IMAGE_SHAPE[0])
    template = flax_model.init(jax.random.key(seed), jnp.zeros((1,) + IMAGE_SHAPE[1:] + IMAGE_SHAPE[:1]))
    variables = interop.variables_from_torch(torch_model, template)
    return ModelPair(name, flax_model, variables, torch_model.to(device), device)


def torch_loss() -> torch.nn.Module:
    """breaching's classification loss."""
    return torch.nn.CrossEntropyLoss()
