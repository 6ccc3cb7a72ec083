"""Progress reports: ``aggregate``'s per-chunk callback and the text bar the CLI draws from it."""

import io

import jax
import numpy as np
import pytest
from conftest import TinyDense, assert_trees_close, make_data, server_payload

import fedjax_users as fu
from fedjax_users import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _aggregate(users_per_chunk, progress_fn=None, devices=None):
    model = TinyDense()
    x, y = make_data(7 * 3, shape=(6, 6, 2), num_classes=3, seed=1)
    xs, ys = x.reshape((7, 3, 6, 6, 2)), y.reshape(7, 3)
    cfg = fu.UserConfig(user_type="multiuser_aggregate", user_range=(0, 7), num_data_points=3,
                        num_local_updates=2, num_data_per_local_update_step=2, local_learning_rate=0.1)
    return fu.aggregate(model, server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), cfg,
                        jax.random.key(0), progress=progress_fn,
                        strategy=fu.strategy.Strategy(users_per_chunk=users_per_chunk, devices=devices))


def test_aggregate_reports_each_chunk_and_computes_the_same():
    calls = []
    one_device = jax.devices()[:1]
    shared, _ = _aggregate(3, lambda done, total: calls.append((done, total)), one_device)
    # 7 users in chunks of 3: a start report, then after 3, 6 and all 7 users.
    assert calls == [(0, 7), (3, 7), (6, 7), (7, 7)]
    plain, _ = _aggregate(3, devices=one_device)
    assert_trees_close(shared.gradients, plain.gradients, rtol=0, atol=0)


def test_aggregate_reports_chunks_of_every_device():
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    calls = []
    _aggregate(1, lambda done, total: calls.append((done, total)), jax.devices()[:4])
    # 7 users on 4 devices hold 2 each (one padding user); a chunk is one user on every device.
    assert calls == [(0, 7), (4, 7), (7, 7)]


def test_render_shows_counts_share_and_time_left():
    line = progress.render(250, 1000, 2.0)
    assert "250/1,000 users" in line and "25%" in line and "about 6.0 s left" in line
    assert line.startswith("[" + "#" * 8 + ".")
    assert "left" not in progress.render(1000, 1000, 8.0)


def test_text_progress_in_a_log_writes_one_line_per_tenth():
    stream = io.StringIO()
    bar = progress.TextProgress(stream=stream)
    for done in range(0, 1001):
        bar(done, 1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and "1,000/1,000" in lines[-1]
    assert "\r" not in stream.getvalue()


def test_text_progress_on_a_terminal_redraws_in_place():
    stream = _Terminal()
    bar = progress.TextProgress(label="users ", stream=stream)
    for done in (0, 5, 10):
        bar(done, 10)
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert np.all([part.startswith("users [") for part in text.split("\r")[1:]])
