"""What each workload computes on: its user config and its examples, in both layouts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_users as fu

from benchmarks.grid import Workload

IMAGE_SHAPE = (3, 32, 32)  # CIFAR size, channels first as breaching builds its models
NUM_CLASSES = 10
CLIP = 1.0
LEARNING_RATE = 1e-3


@dataclasses.dataclass
class Data:
    """The same examples in both layouts, leading axes ``[examples]`` or ``[users, examples]``."""

    images_nchw: np.ndarray
    labels: np.ndarray

    def jax(self) -> tuple[jax.Array, jax.Array]:
        """NHWC images and int32 labels on the default JAX device."""
        return jnp.asarray(np.moveaxis(self.images_nchw, -3, -1)), jnp.asarray(self.labels)

    def torch(self, device):
        """NCHW images and int64 labels on ``device``, as breaching's dataloaders yield them."""
        import torch  # only the PyTorch contenders need it; the memory runs do not load torch

        return (torch.from_numpy(self.images_nchw).to(device),
                torch.from_numpy(self.labels.astype(np.int64)).to(device))

    def flat(self) -> "Data":
        """All examples in one batch (the floor's input)."""
        return Data(self.images_nchw.reshape((-1,) + IMAGE_SHAPE), self.labels.reshape(-1))


def make_data(lead: tuple[int, ...], seed: int = 0) -> Data:
    """Standard-normal images and uniform labels (timing does not depend on the values)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal(lead + IMAGE_SHAPE, dtype=np.float32)
    return Data(images, rng.integers(0, NUM_CLASSES, lead, dtype=np.int32))


def data_for(workload: Workload, seed: int = 0) -> Data:
    """The workload's examples: ``[examples]`` for one user, ``[users, examples]`` for an aggregate."""
    per_user = workload.steps * workload.batch
    lead = (workload.users, per_user) if workload.kind == "aggregate" else (per_user,)
    return make_data(lead, seed)


def user_config(workload: Workload) -> fu.UserConfig:
    """breaching's user config for the workload (clipping for ``local_gradient``, no other defence)."""
    if workload.kind == "local_gradient":
        return fu.UserConfig(
            user_type="local_gradient",
            num_data_points=workload.batch,
            local_diff_privacy=fu.LocalDiffPrivacy(per_example_clipping=CLIP),
        )
    multi = dict(
        num_data_points=workload.steps * workload.batch,
        num_local_updates=workload.steps,
        num_data_per_local_update_step=workload.batch,
        local_learning_rate=LEARNING_RATE,
        provide_local_hyperparams=False,
    )
    if workload.kind == "local_update":
        return fu.UserConfig(user_type="local_update", **multi)
    return fu.UserConfig(user_type="multiuser_aggregate", user_range=(0, workload.users), **multi)
