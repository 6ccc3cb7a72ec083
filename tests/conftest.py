"""Small models shared by the core tests (the zoo has its own tests), and the compilation cache they share."""

import os

# Most of the suite's time is XLA compiling small programs (~0.1 s each), many of them the same
# program built from new Python objects in another test or another pytest worker. JAX's persistent
# cache is keyed by the program, not the Python object, so a cold run already reuses them; its
# default threshold (1 s) would skip them all. Set before JAX is imported so that the child
# processes the subprocess tests start inherit it. FEDJAX_USERS_TEST_JAX_CACHE= (empty) turns it off.
_CACHE = os.environ.get("FEDJAX_USERS_TEST_JAX_CACHE",
                        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"))
if _CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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
    """``n`` random NHWC images and integer labels (NumPy: no per-shape XLA compilation in tests)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + tuple(shape)).astype(np.float32)
    return x, rng.integers(0, num_classes, size=n).astype(np.int32)


def check_noise(samples, distribution: str, scale: float) -> None:
    """Assert i.i.d. zero-mean noise of breaching's distribution with this scale (std or Laplace b).

    The Kolmogorov-Smirnov test is run against the right law and against the other one with the
    same standard deviation: the second must be rejected, so a swapped distribution fails.
    """
    from scipy import stats

    samples = np.asarray(samples, dtype=np.float64).ravel()
    assert samples.size >= 4000, "too few samples to tell Gaussian from Laplace"
    std = scale if distribution == "gaussian" else np.sqrt(2.0) * scale
    laws = {"gaussian": ("norm", (0.0, std)), "laplacian": ("laplace", (0.0, std / np.sqrt(2.0)))}
    right, wrong = laws[distribution], laws["laplacian" if distribution == "gaussian" else "gaussian"]
    assert abs(samples.mean()) < 5 * std / np.sqrt(samples.size)
    np.testing.assert_allclose(samples.std(), std, rtol=0.06)
    assert stats.kstest(samples, right[0], args=right[1]).pvalue > 1e-3
    assert stats.kstest(samples, wrong[0], args=wrong[1]).pvalue < 1e-6


def server_payload(model, x, seed=1, buffers=False):
    """A payload from ``model.init``; with ``buffers``, non-trivial server stats (batch stats of other data)."""
    from fedjax_users import ServerPayload

    variables = _init(model, jax.random.key(seed), x[:1])
    if not buffers:
        return ServerPayload(params=variables["params"], batch_stats=None)
    other = 1.5 * np.random.default_rng(seed + 100).standard_normal(x.shape).astype(np.float32) + 0.7
    return ServerPayload(params=variables["params"], batch_stats=_batch_statistics(model, variables, other))


# Compiled once per model and shape: run op by op, an initialisation compiles dozens of small programs.
@functools.partial(jax.jit, static_argnums=0)
def _init(model, key, x):
    return model.init(key, x)


@functools.partial(jax.jit, static_argnums=0)
def _batch_statistics(model, variables, x):
    _, updates = model.apply(variables, x, train=True, momentum=1.0, mutable=["batch_stats"])
    return updates["batch_stats"]


def mean_cross_entropy(logits, labels):
    """torch's CrossEntropyLoss (mean reduction), written out independently of the package."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
    """Same structure, leaves equal up to tolerance."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), actual, expected)


def counting_loss():
    """breaching's loss, and a list that grows by one each time it is traced or run (no call: no computation)."""
    from fedjax_users.losses import softmax_cross_entropy

    calls = []

    def loss(logits, labels):
        calls.append(1)
        return softmax_cross_entropy(logits, labels)

    return loss, calls


def copy_of_sources(tmp_path, monkeypatch, folders, skip=("__pycache__", "*.npz")):
    """A copy of the checkout's ``folders`` that ``parity.fingerprint`` reads instead of the checkout."""
    import shutil

    from parity import fingerprint

    for folder in folders:
        shutil.copytree(os.path.join(fingerprint.ROOT, folder), tmp_path / folder, ignore=shutil.ignore_patterns(*skip))
    monkeypatch.setattr(fingerprint, "ROOT", str(tmp_path))
    return tmp_path


def append_code(path, text="\n_changed = True\n"):
    """Add a statement to a source file: a change of its code, which a fingerprint must notice."""
    with open(path, "a") as handle:
        handle.write(text)
