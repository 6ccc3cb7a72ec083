"""Compile options (``fedjax_users.strategy.compilation``): where they apply and where they may not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_users as fu
from fedjax_users.strategy import compilation, cpu
from fedjax_users.models import vision


def test_options_only_on_cpu():
    assert compilation.compiler_options("cpu") == cpu.COMPILER_OPTIONS
    assert compilation.compiler_options("gpu") == {}
    assert compilation.compiler_options("tpu") == {}
    assert fu.strategy.compiler_options() == compilation.compiler_options(jax.devices()[0].platform)


def test_fedjax_jit_keeps_the_callers_options():
    f = lambda x: jnp.sin(x) * 2  # noqa: E731
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(fu.strategy.jit(f)(x), jax.jit(f)(x))
    # A caller's own option reaches XLA (an invalid value proves it).
    bad = fu.strategy.jit(f, compiler_options={"xla_cpu_enable_fast_math": "not a bool"})
    try:
        bad(x)
    except Exception as error:  # XLA rejects the value at compile time
        assert "xla_cpu_enable_fast_math" in str(error)
    else:
        raise AssertionError("the caller's compile option did not reach XLA")


def _chunks(x):
    """Eight independent chunks with a 12 MiB intermediate each."""
    total = 0.0
    for i in range(8):
        part = x[i * 32 : (i + 1) * 32]
        big = jnp.sin(part[:, :, None] * jnp.arange(100.0))
        total = total + jnp.einsum("bik,bi->k", big, part)
    return total


def test_memory_optimized_schedule_reuses_chunk_buffers():
    # The default CPU schedule keeps all eight alive (98 MiB); the options run them in one's buffers.
    x = jnp.ones((256, 1000))
    chunk_bytes = 32 * 1000 * 100 * 4
    options = compilation.compiler_options("cpu")
    tuned = jax.jit(_chunks, compiler_options=options).lower(x).compile().memory_analysis().temp_size_in_bytes
    assert tuned < 2 * chunk_bytes


def _one_chunk(x):
    """One chunk of ``_chunks``: a 12 MiB intermediate."""
    return jnp.einsum("bik,bi->k", jnp.sin(x[:, :, None] * jnp.arange(100.0)), x)


def test_options_only_past_the_mmap_threshold(monkeypatch):
    # Eight chunks (98 MiB of scratch by default) pass the threshold, one chunk (12 MiB) does not.
    big, small = jnp.ones((256, 1000)), jnp.ones((32, 1000))
    np.testing.assert_allclose(fu.strategy.jit(_chunks)(big), jax.jit(_chunks)(big), rtol=1e-6)
    np.testing.assert_allclose(fu.strategy.jit(_one_chunk)(small), jax.jit(_one_chunk)(small), rtol=1e-6)
    # Which programs take the options, seen from outside: with an option XLA rejects, exactly those fail.
    bad = {"xla_cpu_enable_fast_math": "not a bool"}
    monkeypatch.setattr(compilation, "compiler_options", lambda platform=None: bad)
    step, small_step = fu.strategy.jit(_chunks), fu.strategy.jit(_one_chunk)
    with pytest.raises(Exception, match="xla_cpu_enable_fast_math"):
        step(big)
    np.testing.assert_allclose(small_step(small), jax.jit(_one_chunk)(small), rtol=1e-6)
    # Decided once per signature: a threshold raised afterwards changes only arguments not seen yet.
    monkeypatch.setattr(cpu, "MMAP_THRESHOLD_BYTES", 2**62)
    with pytest.raises(Exception, match="xla_cpu_enable_fast_math"):
        step(jnp.zeros((256, 1000)))  # same shapes: the decision already made
    np.testing.assert_allclose(step(jnp.ones((264, 1000))), jax.jit(_chunks)(jnp.ones((264, 1000))), rtol=1e-6)


def test_top_level_jit_inside_and_outside_a_trace():
    calls = []

    def double(x, tune=True):
        calls.append(compilation.tracing())
        return 2 * x

    step = compilation.top_level_jit(double, wants_options=lambda x, tune=True: tune, static_argnames=("tune",))
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(step(x), 2 * x)  # at top level: jitted with the options
    np.testing.assert_array_equal(step(x, tune=False), 2 * x)  # at top level, plainly
    np.testing.assert_array_equal(jax.jit(lambda y: step(y) + 1)(x), 2 * x + 1)  # nested: plainly
    np.testing.assert_array_equal(jax.jit(lambda: step(x))(), 2 * x)  # nested, closed-over constant
    np.testing.assert_array_equal(jax.vmap(step)(x[:, None])[:, 0], 2 * x)
    assert calls and all(calls)  # the body itself is always traced
    assert not compilation.tracing()


def test_only_clipping_users_take_the_options():
    cfg = fu.UserConfig(user_type="local_gradient", num_data_points=4)
    clipped = cfg.replace(local_diff_privacy=fu.LocalDiffPrivacy(per_example_clipping=1.0))
    multi = fu.UserConfig(user_type="local_update", num_data_points=4, num_local_updates=2,
                          num_data_per_local_update_step=2, local_learning_rate=0.1,
                          local_diff_privacy=clipped.local_diff_privacy)
    assert fu.User(None, clipped).clips_examples
    assert not fu.User(None, cfg).clips_examples
    assert not fu.User(None, multi).clips_examples  # clips each step's batch gradient, no chunks


def test_local_gradient_inside_jit_with_closed_over_data():
    model = vision.LeNetZhu(num_classes=10)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    y = jnp.arange(4) % 10
    variables = model.init(jax.random.key(1), x[:1])
    cfg = fu.UserConfig(
        user_type="local_gradient", num_data_points=4, local_diff_privacy=fu.LocalDiffPrivacy(per_example_clipping=1.0)
    )
    payload = fu.ServerPayload(params=variables["params"], batch_stats=None)
    data = fu.UserData(inputs=x, labels=y)
    key = jax.random.key(2)
    eager = fu.local_gradient(model, payload, data, cfg, key)[0].gradients
    closed = jax.jit(lambda: fu.local_gradient(model, payload, data, cfg, key)[0].gradients)()
    wrapped = fu.strategy.jit(lambda k: fu.local_gradient(model, payload, data, cfg, k)[0].gradients)(key)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (eager, closed, wrapped))):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-7)


def test_tracing_sees_every_transformation():
    seen = {}

    def probe(name):
        def fn(x):
            seen[name] = (compilation.tracing(), compilation.tracing(x))
            return x
        return fn

    x = jnp.ones(2)
    jax.jit(probe("jit"))(x)
    jax.vmap(probe("vmap"))(x)
    jax.grad(lambda v: jnp.sum(probe("grad")(v)))(x)
    jax.eval_shape(probe("eval_shape"), x)
    assert seen["jit"] == (True, True) and seen["eval_shape"] == (True, True)
    assert seen["vmap"][1] and seen["grad"][1]  # seen through the traced argument
    assert compilation.tracing(x) is False
