"""Small models shared by the core tests (the zoo has its own tests)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fedjax_users.batchnorm import BatchNorm


class TinyBNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> mean pool -> Dense: enough to exercise every BatchNorm path."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None, momentum=0.1):
        x = nn.Conv(4, (3, 3), padding=[(1, 1), (1, 1)], name="conv")(x)
        x = BatchNorm(name="bn")(x, train, mask, momentum)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


class TinyDense(nn.Module):
    """A model without BatchNorm."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None, momentum=0.1):
        return nn.Dense(self.num_classes, name="fc")(x.reshape((x.shape[0], -1)))


@pytest.fixture
def bn_model():
    return TinyBNNet()


@pytest.fixture
def dense_model():
    return TinyDense()


def make_data(n=5, shape=(6, 6, 2), num_classes=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n,) + shape), jax.random.randint(k2, (n,), 0, num_classes)
