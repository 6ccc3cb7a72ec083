"""Progress reports: ``aggregate``'s per-chunk callback and the text bar the CLI draws from it."""

import io

import jax
import numpy as np
import pytest
from conftest import TinyDense, assert_trees_close, make_data, server_payload

import fedjax_users as fu
from fedjax_users import progress


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


def _terminal(width=120):
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)


def test_progress_on_a_terminal_shows_counts_rate_and_stages():
    console = _terminal()
    with progress.Progress(console=console) as shown:
        report = shown.counter("query 1 of 1: users", "users")
        with shown.stage("building the users"):
            shown._bars.refresh()
        for done in (0, 3, 6, 7):
            report(done, 7)
            shown._bars.refresh()
        # A finished count is removed: the screen keeps only the command's own summary.
        assert shown._bars.tasks == []
    text = console.file.getvalue()
    assert "building the users" in text and "query 1 of 1: users" in text
    assert "3/7" in text and "6/7" in text and "users/s" in text and "eta" in text


@pytest.mark.parametrize("quiet, terminal", [(True, True), (False, False)], ids=["quiet", "not-a-terminal"])
def test_progress_draws_nothing_when_quiet_or_not_on_a_terminal(quiet, terminal):
    from rich.console import Console

    console = _terminal() if terminal else Console(file=io.StringIO(), width=120)
    with progress.Progress(quiet=quiet, console=console) as shown:
        report = shown.counter("users")
        for done in range(8):
            report(done, 7)
        with shown.stage("compiling"):
            pass
    assert not shown.enabled and console.file.getvalue() == ""


def test_aggregate_feeds_the_progress_counter():
    console = _terminal()
    with progress.Progress(console=console) as shown:
        counter = shown.counter("users")

        def drawn(done, total):  # drawn at each report, not only at rich's refresh rate
            counter(done, total)
            shown._bars.refresh()

        _aggregate(3, drawn, jax.devices()[:1])
    text = console.file.getvalue()
    assert "3/7" in text and "6/7" in text
