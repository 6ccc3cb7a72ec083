"""The users axis sharded over devices equals the one-device aggregate (``fedjax_users.strategy.sharding``).

JAX fixes the device count at start-up, so the multi-device checks run in child processes:
four CPU devices via ``--xla_force_host_platform_device_count``, and two processes of two
devices each joined by ``jax.distributed`` (the multi-host launch).
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fedjax_users.strategy import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# Shared by the child scripts: a case grid and a comparison with the one-device result.
_COMMON = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path[:0] = [@PATHS@]
    import fedjax_users as fu
    from conftest import TinyBNNet, TinyDense

    USERS, EXAMPLES = 7, 4  # 7 users do not divide over 4 devices

    def config(multi_step, clip=0.0):
        steps = {"num_local_updates": 2, "num_data_per_local_update_step": 2, "local_learning_rate": 0.5}
        return fu.UserConfig.from_dict(dict(
            user_type="multiuser_aggregate", user_range=[0, USERS], num_data_points=EXAMPLES,
            provide_buffers=True,
            local_diff_privacy={"gradient_noise": 0.01, "input_noise": 0.1, "distribution": "gaussian",
                                "per_example_clipping": clip},
            **(steps if multi_step else {"num_local_updates": 1}),
        ))

    def case(model, multi_step, server_buffers, clip=0.0):
        x = jax.random.normal(jax.random.key(0), (USERS, EXAMPLES, 6, 6, 2))
        y = jax.random.randint(jax.random.key(1), (USERS, EXAMPLES), 0, 3)
        variables = model.init(jax.random.key(2), x[0, :1])
        stats = variables.get("batch_stats")
        if stats is not None:
            stats = jax.tree_util.tree_map(lambda s: s + 0.2 if s.dtype == jnp.float32 else s, stats)
        payload = fu.ServerPayload(params=variables["params"], batch_stats=stats if server_buffers else None)
        return payload, fu.UserData(inputs=x, labels=y), config(multi_step, clip)

    def compare(a, b, what):
        # Equal up to float32 summation order, relative to the largest entry of the whole tree.
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), what
        pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
                 for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
        for got, want in pairs:
            assert got.shape == want.shape, (what, got.shape, want.shape)
        scale = max([float(np.max(np.abs(want))) for _, want in pairs if want.size] + [1e-30])
        err = max([float(np.max(np.abs(got - want))) for got, want in pairs if want.size] + [0.0])
        assert err <= 1e-6 * scale, (what, err / scale)

    # Server buffers only matter with BatchNorm: the model without it runs without them.
    GRID = [(TinyBNNet(), multi, buffers, 0.0) for multi in (False, True) for buffers in (False, True)]
    GRID += [(TinyDense(), multi, False, 0.0) for multi in (False, True)]
    # Per-example clipping (the fast clipping path) inside the sharded users, BatchNorm in train mode.
    GRID.append((TinyBNNet(), False, False, 0.5))
    """
).replace("@PATHS@", f"{REPO!r}, {TESTS!r}")

_FOUR_DEVICES = _COMMON + textwrap.dedent(
    """
    from fedjax_users.strategy import chunking, sharding
    assert len(jax.devices()) == 4 and sharding.users_mesh().size == 4
    checked = 0
    for model, multi, buffers, clip in GRID:
        payload, data, cfg = case(model, multi, buffers, clip)
        key = jax.random.key(3)
        one = fu.aggregate(model, payload, data, cfg, key, strategy=fu.strategy.Strategy(devices=jax.devices()[:1], users_per_chunk=3))
        chunk = None if checked == 0 else 1 + checked % 2  # automatic once, then 1 or 2 users per device
        many = fu.aggregate(model, payload, data, cfg, key, strategy=fu.strategy.Strategy(users_per_chunk=chunk))  # default: 4 devices
        what = f"{type(model).__name__} multi={multi} buffers={buffers} clip={clip} chunk={chunk}"
        compare(many[0].gradients, one[0].gradients, what + " gradients")
        compare(many[0].batch_stats, one[0].batch_stats, what + " mean buffers")
        compare(many[1].user_state, one[1].user_state, what + " user states")
        compare(many[1].data, one[1].data, what + " recorded inputs")
        checked += 1
        if buffers or isinstance(model, TinyDense):
            continue
        # Order: user u's state and recorded inputs are those of user u computed alone.
        cfg_one = cfg.replace(user_type="local_update" if multi else "local_gradient", user_range=None)
        run = fu.local_update if multi else fu.local_gradient
        keys = jax.random.split(key, USERS)
        for u in (0, 5, 6):
            shared, true_data, state = run(model, payload, fu.UserData(inputs=data.inputs[u], labels=data.labels[u]),
                                           cfg_one, keys[u])
            if many[1].user_state is not None:
                compare(jax.tree_util.tree_map(lambda s: s[u], many[1].user_state), state, f"state of user {u}")
            compare(many[1].data[u * EXAMPLES:(u + 1) * EXAMPLES], true_data.data, f"inputs of user {u}")

    # The pieces themselves: 7 users padded to 8, 2 per device, chunks of 1; sum and outputs in order.
    mesh = sharding.users_mesh()
    fn = lambda w, x: ({"s": x * w}, x + 1.0)
    users, valid = sharding.place_users((jnp.arange(7.0),), mesh)
    assert users[0].shape == (8,) and len(users[0].sharding.device_set) == 4
    run_one = lambda c: sharding.run_chunk(chunking.vmap_sum(fn), 3.0, users, valid, c, 1, mesh)
    step = jax.jit(lambda first, count: chunking.scan_chunks(run_one, first, count), static_argnums=1)
    for per_step in (1, 2):  # a host loop over chunks, and both chunks in one scan
        total, out = chunking.sum_chunks(step, 2, 1, 7, chunks_per_step=per_step)
        assert float(total["s"]) == 63.0 and np.array_equal(np.asarray(out), np.arange(7.0) + 1.0)
    print("checked", checked)
    """
)

_TWO_HOSTS = _COMMON + textwrap.dedent(
    """
    import os
    from jax.experimental import multihost_utils
    process_id = int(os.environ["PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(os.environ["COORDINATOR"], num_processes=2, process_id=process_id)
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    model, multi, buffers = TinyBNNet(), True, False
    payload, data, cfg = case(model, multi, buffers)
    key = jax.random.key(3)
    many = fu.aggregate(model, payload, data, cfg, key)  # default: the global mesh of 4 devices
    one = fu.aggregate(model, payload, data, cfg, key, strategy=fu.strategy.Strategy(devices=jax.local_devices()[:1], users_per_chunk=2))
    compare(many[0].gradients, one[0].gradients, "gradients")
    states = multihost_utils.process_allgather(many[1].user_state, tiled=True)
    compare(states, one[1].user_state, "user states")
    # Streamed from a cohort: the same numbers, and each process reads only its own devices' users
    # (user 0 as well: its shapes are checked first).
    from fedjax_users.cohort import FunctionCohort
    read, xs, ys = [], np.asarray(data.inputs), np.asarray(data.labels)
    def load(i):
        read.append(i)
        return xs[i], ys[i]
    streamed = fu.aggregate(model, payload, FunctionCohort(len(xs), load), cfg, key)
    compare(streamed[0].gradients, many[0].gradients, "streamed gradients")
    per_process = 2 * (-(-len(xs) // 4))
    own = set(range(process_id * per_process, min(len(xs), (process_id + 1) * per_process)))
    assert set(read) - {0} <= own and own <= set(read), (sorted(set(read)), sorted(own))
    print("process", process_id, "ok")
    """
)


def _run(script, extra_env):
    """Start ``script`` in a fresh interpreter (its own JAX start-up) with ``extra_env``."""
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    env.update(extra_env)
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process, timeout=600):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_four_devices_equal_one_device():
    out = _finish(_run(_FOUR_DEVICES, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}))
    assert "checked 7" in out


@pytest.mark.slow
def test_two_processes_equal_one_device():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    coordinator = f"localhost:{port}"
    processes = [_run(_TWO_HOSTS, {"PROCESS_ID": str(i), "COORDINATOR": coordinator}) for i in range(2)]
    outputs = [_finish(p) for p in processes]
    for i, out in enumerate(outputs):
        assert f"process {i} ok" in out


def test_one_device_means_no_mesh():
    assert sharding.users_mesh(jax.devices()[:1]) is None
    assert sharding.users_per_device(7, None) == 7


def test_padding_repeats_the_last_user():
    users = (np.arange(5.0), np.arange(10.0).reshape(5, 2))
    padded = sharding._pad_users(users, 8)
    np.testing.assert_array_equal(padded[0], [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(padded[1][-1], [8, 9])


def test_sharded_users_equal_one_device_in_this_process():
    """The default tier's check of the sharded path on the test command's four CPU devices: two
    cases of the grid (multi-step train mode, clipped single step), without a process start-up.
    The slower tier (``make test-full``) runs the whole grid in a fresh process and over two processes."""
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (the test command's)")
    import fedjax_users as fu

    namespace: dict = {}
    exec(_COMMON, namespace)
    grid, compare = namespace["GRID"], namespace["compare"]
    for model, multi, buffers, clip in (grid[2], grid[-1]):
        payload, data, cfg = namespace["case"](model, multi, buffers, clip)
        key = jax.random.key(3)
        one = fu.aggregate(model, payload, data, cfg, key,
                           strategy=fu.strategy.Strategy(devices=jax.devices()[:1], users_per_chunk=3))
        many = fu.aggregate(model, payload, data, cfg, key,
                            strategy=fu.strategy.Strategy(devices=jax.devices()[:4], users_per_chunk=2))
        assert sharding.users_mesh(jax.devices()[:4]).size == 4
        what = f"multi={multi} clip={clip}"
        compare(many[0].gradients, one[0].gradients, what + " gradients")
        compare(many[1].user_state, one[1].user_state, what + " user states")
        compare(many[1].data, one[1].data, what + " recorded inputs")
