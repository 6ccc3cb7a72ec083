"""Users streamed from a cohort (issue 28): the same bits as in memory, resumable, read a chunk at a time."""

import threading

import jax
import numpy as np
import pytest
from conftest import TinyBNNet, TinyDense, make_data, server_payload

import fedjax_users as fu
from fedjax_users.cohort import ArrayCohort, FunctionCohort
from fedjax_users.strategy import streaming

USERS, EXAMPLES = 7, 4


def _setup(model, buffers=False, steps=1, clip=0.0, users=USERS):
    x, y = make_data(users * EXAMPLES, shape=(6, 6, 2), num_classes=3, seed=1)
    xs = np.asarray(x).reshape((users, EXAMPLES, 6, 6, 2))
    ys = np.asarray(y).reshape(users, EXAMPLES)
    cfg = fu.UserConfig(
        user_type="multiuser_aggregate", user_range=(0, users), num_data_points=EXAMPLES, num_local_updates=steps,
        num_data_per_local_update_step=2, local_learning_rate=0.1, provide_labels=True,
        local_diff_privacy=fu.LocalDiffPrivacy(per_example_clipping=clip, gradient_noise=0.01, distribution="gaussian"),
    )
    payload = server_payload(model, xs[0])
    if not buffers:
        payload = fu.ServerPayload(params=payload.params, batch_stats=None)
    return payload, xs, ys, cfg


def _assert_same_bits(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("devices", [1, 4], ids=["one-device", "four-devices"])
@pytest.mark.parametrize(
    "model, buffers, steps, clip",
    [(TinyBNNet, False, 1, 0.0), (TinyBNNet, True, 3, 0.0), (TinyBNNet, False, 3, 1.0), (TinyDense, False, 1, 1.0)],
    ids=["bn-train-gradient", "bn-eval-steps", "bn-train-steps-clip", "dense-clip"],
)
def test_a_streamed_cohort_gives_the_in_memory_result_bit_for_bit(model, buffers, steps, clip, devices):
    if jax.device_count() < devices:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    model = model()
    payload, xs, ys, cfg = _setup(model, buffers, steps, clip)
    # 7 users in chunks of 3 (one device) or 2 per device: the shifted last chunk repeats users.
    strategy = fu.strategy.Strategy(users_per_chunk=3 if devices == 1 else 1, devices=jax.devices()[:devices])
    memory, true_memory = fu.aggregate(model, payload, fu.UserData(xs, ys), cfg, jax.random.key(3), strategy=strategy)
    streamed, true_streamed = fu.aggregate(model, payload, ArrayCohort(xs, ys), cfg, jax.random.key(3),
                                           strategy=strategy)
    _assert_same_bits(memory, streamed)
    _assert_same_bits(true_memory.user_state, true_streamed.user_state)
    _assert_same_bits(true_memory.labels, true_streamed.labels)
    assert true_streamed.data is None  # a cohort's inputs stay the cohort's


class _Counting(FunctionCohort):
    """A cohort that records which users it read, and can fail at one of them (an interruption)."""

    def __init__(self, xs, ys, fail_at=None):
        self.read, self.fail_at, self.lock = [], fail_at, threading.Lock()
        super().__init__(len(xs), lambda i: (xs[i], ys[i]))

    def load_user(self, position):
        with self.lock:
            self.read.append(position)
        if position == self.fail_at:
            raise KeyboardInterrupt("stopped")
        return super().load_user(position)


def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_as_the_uninterrupted_one(tmp_path):
    model = TinyBNNet()
    payload, xs, ys, cfg = _setup(model, steps=2, users=10)
    cfg = cfg.replace(user_range=(0, 10))
    one = fu.strategy.Strategy(users_per_chunk=2, devices=jax.devices()[:1])
    whole, true_whole = fu.aggregate(model, payload, ArrayCohort(xs, ys), cfg, jax.random.key(5), strategy=one)
    checkpoint = streaming.Checkpoint(str(tmp_path / "ckpt"), every=1, run_id="test")
    # The 8th user's read fails: chunks of users 0-1, 2-3 and 4-5 were saved before it.
    stopped = _Counting(xs, ys, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        fu.aggregate(model, payload, stopped, cfg, jax.random.key(5), strategy=one, checkpoint=checkpoint)
    resumed_cohort = _Counting(xs, ys)
    reports = []
    resumed, true_resumed = fu.aggregate(model, payload, resumed_cohort, cfg, jax.random.key(5), strategy=one,
                                         checkpoint=checkpoint, progress=lambda done, total: reports.append(done))
    _assert_same_bits(whole, resumed)
    _assert_same_bits(true_whole.user_state, true_resumed.user_state)
    # It started where the checkpoint left off: users before it are not read again (user 0 is
    # read once to check shapes), and progress starts from the users already done.
    saved = reports[0]
    assert saved in (4, 6) and reports[-1] == 10
    assert min(p for p in resumed_cohort.read if p != 0) >= saved
    # A finished run's folder resumes to the same result without computing a chunk anew.
    again, _ = fu.aggregate(model, payload, ArrayCohort(xs, ys), cfg, jax.random.key(5), strategy=one,
                            checkpoint=checkpoint)
    _assert_same_bits(whole, again)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    model = TinyDense()
    payload, xs, ys, cfg = _setup(model)
    one = fu.strategy.Strategy(users_per_chunk=2, devices=jax.devices()[:1])
    fu.aggregate(model, payload, ArrayCohort(xs, ys), cfg, jax.random.key(0), strategy=one,
                 checkpoint=streaming.Checkpoint(str(tmp_path), run_id="a"))
    with pytest.raises(ValueError, match="holds another run"):
        fu.aggregate(model, payload, ArrayCohort(xs, ys), cfg, jax.random.key(0), strategy=one,
                     checkpoint=streaming.Checkpoint(str(tmp_path), run_id="b"))


def test_users_are_read_a_few_chunks_ahead_not_all_at_once():
    model = TinyDense()
    payload, xs, ys, cfg = _setup(model, users=40)
    cfg = cfg.replace(user_range=(0, 40))
    cohort = _Counting(xs, ys)
    read_when = []
    one = fu.strategy.Strategy(users_per_chunk=2, devices=jax.devices()[:1])
    fu.aggregate(model, payload, cohort, cfg, jax.random.key(0), strategy=one,
                 progress=lambda done, total: read_when.append((done, len(cohort.read))))
    # 20 chunks of 2: when k users are done, at most a handful of chunks more have been read
    # (Grain's two threads and two prefetched chunks), never the whole cohort.
    for done, read in read_when[1:-1]:
        assert read - 1 <= done + 2 * 6, (done, read)
    assert sorted(set(cohort.read)) == list(range(40))


def test_a_later_user_with_a_bad_label_is_an_error_before_its_chunk_runs():
    model = TinyDense()
    payload, xs, ys, cfg = _setup(model)
    ys = ys.copy()
    ys[5, 1] = 9  # the model has 3 classes
    one = fu.strategy.Strategy(users_per_chunk=2, devices=jax.devices()[:1])
    with pytest.raises(fu.InputError, match="users_data.labels"):
        fu.aggregate(model, payload, ArrayCohort(xs, ys), cfg, jax.random.key(0), strategy=one)


def test_a_cohort_of_another_size_than_user_range_is_refused():
    model = TinyDense()
    payload, xs, ys, cfg = _setup(model)
    with pytest.raises(fu.InputError, match="names 7 users"):
        fu.aggregate(model, payload, ArrayCohort(xs[:5], ys[:5]), cfg, jax.random.key(0))
