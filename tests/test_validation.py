"""No silent failures (issue 13): bad data, configs and results raise before (or instead of) a wrong update.

Each test gives one kind of bad input to the public functions and checks the error type, that the
message names the culprit, and (with a spying loss) that nothing was computed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TinyBNNet, TinyDense, counting_loss, make_data, server_payload
from jax.experimental import checkify

import fedjax_users as fu
from fedjax_users import models, validation
from fedjax_users.losses import causal_lm_loss

SINGLE = fu.UserConfig(user_type="local_gradient", num_data_points=4)
MULTI = fu.UserConfig(user_type="local_update", num_data_points=4, num_local_updates=4,
                      num_data_per_local_update_step=2, local_learning_rate=0.5)
AGGREGATE = fu.UserConfig(user_type="multiuser_aggregate", user_range=(0, 3), num_data_points=4)
KEY = jax.random.key(0)




def _single_users():
    return [(fu.local_gradient, SINGLE), (fu.local_update, MULTI)]


def _zeros_payload(model, example_shape) -> fu.ServerPayload:
    """The model's params for inputs of ``example_shape``, as zeros (no slow eager init of a conv net)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + example_shape))
    return fu.ServerPayload(params=jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"]))


def _users(n=3, examples=4, seed=0):
    x, y = make_data(n * examples, seed=seed)
    return x.reshape((n, examples) + x.shape[1:]), y.reshape(n, examples)


# ----------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("fn, cfg", _single_users(), ids=["local_gradient", "local_update"])
@pytest.mark.parametrize("bad", [3, 4, 1000, -1])
def test_labels_outside_the_models_classes(fn, cfg, bad):
    model = TinyBNNet()  # 3 classes
    x, y = make_data(4)
    y = y.copy()
    y[2] = bad
    loss, calls = counting_loss()
    with pytest.raises(fu.InputError, match=rf"labels must be class indices in \[0, 3\) .*data.labels\[2\] is {bad}"):
        fn(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), cfg, KEY, loss=loss)
    assert calls == []


def test_aggregate_labels_outside_the_models_classes_name_the_user():
    model = TinyDense()
    xs, ys = _users()
    ys = ys.copy()
    ys[1, 3] = 3
    with pytest.raises(fu.InputError, match=r"users_data.labels\[1, 3\] is 3"):
        fu.aggregate(model, server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys), AGGREGATE, KEY)


def test_labels_past_num_data_points_are_not_checked():
    # Only the first num_data_points examples are used, so only they must be valid.
    model = TinyDense()
    x, y = make_data(5)
    y = y.copy()
    y[4] = 99
    shared, _, _ = fu.local_gradient(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), SINGLE, KEY)
    assert validation.all_finite(shared.gradients)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros(4, np.float32), "data.labels have dtype float32; softmax_cross_entropy takes integer class indices"),
        (np.zeros((4, 1), np.int32), r"data.labels have shape \(4, 1\): the model's logits per example have shape"),
    ],
)
def test_labels_of_the_wrong_kind(labels, message):
    model = TinyDense()
    x, _ = make_data(4)
    with pytest.raises(fu.InputError, match=message):
        fu.local_gradient(model, server_payload(model, x), fu.UserData(inputs=x, labels=labels), SINGLE, KEY)


def test_token_ids_outside_the_vocabulary():
    model = models.get("linear", num_classes=11, modality="text")  # vocabulary of 11
    tokens = np.random.default_rng(0).integers(0, 11, (4, 5)).astype(np.int32)
    payload = fu.ServerPayload(params=model.init(jax.random.key(1), tokens[:1])["params"], batch_stats={})
    bad_labels = tokens.copy()
    bad_labels[0, 1] = 11
    with pytest.raises(fu.InputError, match=r"labels must be class indices in \[0, 11\).*labels\[0, 1\] is 11"):
        fu.local_gradient(model, payload, fu.UserData(inputs=tokens, labels=bad_labels), SINGLE, KEY,
                          loss=causal_lm_loss)
    bad_tokens = tokens.copy()
    bad_tokens[3, 4] = 12
    with pytest.raises(fu.InputError, match=r"token ids\) must be in \[0, 11\).*inputs\[3, 4\] is 12"):
        fu.local_gradient(model, payload, fu.UserData(inputs=bad_tokens, labels=tokens), SINGLE, KEY,
                          loss=causal_lm_loss)


# ----------------------------------------------------------------------------------------------
# Shapes and ranks


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("name", ["lenet_zhu", "linear"])
def test_images_of_another_size_blame_the_inputs(name, size):
    model = models.get(name, num_classes=10, num_channels=3)
    payload = _zeros_payload(model, (32, 32, 3))
    x = np.zeros((4, size, size, 3), np.float32)
    loss, calls = counting_loss()
    with pytest.raises(fu.InputError, match=rf"examples of shape \({size}, {size}, 3\) do not fit the payload: "
                                            r".*made for inputs of another shape"):
        fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=np.arange(4)), SINGLE, KEY, loss=loss)
    assert calls == []


def test_one_example_without_its_batch_axis():
    model = models.get("lenet_zhu", num_classes=10, num_channels=3)
    x = np.zeros((32, 32, 3), np.float32)
    payload = _zeros_payload(model, x.shape)
    cfg = SINGLE.replace(num_data_points=1)
    with pytest.raises(fu.InputError, match=r"data.labels have shape \(\): local_gradient expects data.inputs "
                                            r"\[examples, H, W, C\] and data.labels \[examples\]"):
        fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=np.int32(3)), cfg, KEY)
    with pytest.raises(fu.InputError, match=r"look like one example without its examples axis.*inputs\[None\]"):
        fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=np.array([3])), cfg, KEY)


@pytest.mark.parametrize("cfg", [SINGLE, AGGREGATE.replace(user_range=None)], ids=["local_gradient-cfg", "no-range"])
def test_aggregate_without_a_users_axis(cfg):
    model = TinyDense()
    x, y = make_data(4)
    with pytest.raises(fu.InputError, match=r"users_data.labels have shape \(4,\): aggregate expects users_data.inputs "
                                            r"\[users, examples, H, W, C\] and users_data.labels \[users, examples\]"):
        fu.aggregate(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), cfg, KEY)


def test_users_of_different_sizes():
    model = TinyDense()
    xs, ys = _users()
    ragged = fu.UserData(inputs=[xs[0], xs[1][:3], xs[2]], labels=[ys[0], ys[1][:3], ys[2]])
    with pytest.raises(fu.InputError, match=r"users_data.inputs is ragged: its entries have shapes \[0\] \(4, 6, 6, 2\), "
                                            r"\[1\] \(3, 6, 6, 2\)"):
        fu.aggregate(model, server_payload(model, xs[0]), ragged, AGGREGATE, KEY)


def test_user_state_that_does_not_fit():
    model = TinyBNNet()
    x, y = make_data(4)
    with pytest.raises(fu.InputError, match=r"user_state does not fit the model's BatchNorm statistics: "
                                            r"user_state\['bn'\]\['mean'\] has shape \(5,\)"):
        state = {"bn": {"mean": np.zeros(5), "var": np.ones(4), "num_batches_tracked": np.zeros((), np.int32)}}
        fu.local_gradient(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), SINGLE, KEY,
                          user_state=state)


# ----------------------------------------------------------------------------------------------
# Python sequences and argument types


def test_python_lists_give_the_same_update_as_arrays():
    model = TinyDense()
    x, y = make_data(4)
    payload = server_payload(model, x)
    from_lists, true_data, _ = fu.local_gradient(model, payload, fu.UserData(inputs=x.tolist(), labels=y.tolist()),
                                                 SINGLE, KEY)
    from_arrays, _, _ = fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=y), SINGLE, KEY)
    jax.tree_util.tree_map(np.testing.assert_allclose, from_lists.gradients, from_arrays.gradients)
    np.testing.assert_array_equal(true_data.labels, y)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(payload={"params": {}}), TypeError, "payload must be a fedjax_users.ServerPayload, got dict"),
        (dict(data=(1, 2)), TypeError, "data must be a fedjax_users.UserData, got tuple"),
        (dict(cfg={"user_type": "local_gradient"}), TypeError, "cfg must be a fedjax_users.UserConfig"),
        (dict(key=0), TypeError, "key must be one PRNG key"),
        (dict(key=jax.random.split(KEY, 2)), TypeError, r"key must be one PRNG key .*shape \(2,\)"),
        (dict(data=fu.UserData(inputs="images", labels=[0])), TypeError, "data.inputs must be an array"),
        (dict(data=fu.UserData(inputs=[[0.0], [1.0, 2.0]], labels=[0, 1])), ValueError, "data.inputs is ragged"),
        (dict(check_finite="yes"), TypeError, "check_finite must be None, True or False"),
    ],
)
def test_arguments_of_the_wrong_type(change, error, message):
    model = TinyDense()
    x, y = make_data(4)
    args = dict(payload=server_payload(model, x), data=fu.UserData(inputs=x, labels=y), cfg=SINGLE, key=KEY)
    extra = {"check_finite": change.pop("check_finite")} if "check_finite" in change else {}
    args.update(change)
    with pytest.raises(error, match=message) as err:
        fu.local_gradient(model, args["payload"], args["data"], args["cfg"], args["key"], **extra)
    assert isinstance(err.value, fu.InputError)


# ----------------------------------------------------------------------------------------------
# Configs of the wrong kind


@pytest.mark.parametrize(
    "fn, cfg, message",
    [
        (fu.local_gradient, MULTI, "local_gradient takes one gradient, but cfg is a local_update config"),
        (fu.local_gradient, AGGREGATE, "local_gradient runs one user, but cfg is a multiuser_aggregate config"),
        (fu.local_update, AGGREGATE.replace(num_local_updates=2, num_data_per_local_update_step=2,
                                            local_learning_rate=0.1),
         r"local_update runs one user.*cfg.replace\(user_type='local_update', user_range=None\)"),
        (fu.local_update, SINGLE, "local_update trains local steps, but cfg is a local_gradient config"),
    ],
)
def test_a_config_of_another_kind_is_an_error(fn, cfg, message):
    model = TinyDense()
    x, y = make_data(4)
    loss, calls = counting_loss()
    with pytest.raises(fu.ConfigError, match=message):
        fn(model, server_payload(model, x), fu.UserData(inputs=x, labels=y), cfg, KEY, loss=loss)
    assert calls == []


def test_aggregate_takes_single_user_configs_as_its_users_kind():
    # Every user is then one of that kind: the same mean as the multiuser_aggregate config says.
    model = TinyDense()
    xs, ys = _users()
    payload, data = server_payload(model, xs[0]), fu.UserData(inputs=xs, labels=ys)
    as_cohort, _ = fu.aggregate(model, payload, data, AGGREGATE.replace(num_local_updates=4,
                                num_data_per_local_update_step=2, local_learning_rate=0.5), KEY)
    as_users, _ = fu.aggregate(model, payload, data, MULTI, KEY)
    jax.tree_util.tree_map(np.testing.assert_allclose, as_users.gradients, as_cohort.gradients)


# ----------------------------------------------------------------------------------------------
# Non-finite inputs and results


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_non_finite_inputs_are_rejected_before_computing(value, as_jax):
    model = TinyDense()
    x, y = make_data(4)
    x = x.copy()
    x[1, 2, 3, 0] = value
    loss, calls = counting_loss()
    what = "NaN" if np.isnan(value) else "inf"
    inputs = jnp.asarray(x) if as_jax else x
    with pytest.raises(fu.InputError, match=rf"data.inputs holds {what} at \[1, 2, 3, 0\]"):
        fu.local_gradient(model, server_payload(model, x), fu.UserData(inputs=inputs, labels=y), SINGLE, KEY,
                          loss=loss)
    assert calls == []


def test_non_finite_payload_is_rejected():
    model = TinyDense()
    x, y = make_data(4)
    payload = server_payload(model, x)
    params = {"fc": {**payload.params["fc"], "bias": jnp.array([0.0, np.nan, 0.0])}}
    with pytest.raises(fu.InputError, match=r"payload.*\['fc'\]\['bias'\] holds NaN at \[1\]"):
        fu.local_gradient(model, fu.ServerPayload(params=params), fu.UserData(inputs=x, labels=y), SINGLE, KEY)


# MLP diverges at this learning rate in its second step (ReLU activations grow until the loss is NaN).
DIVERGING = MULTI.replace(local_learning_rate=1e10)


def _mlp(shape=(4, 4, 2)):
    model = models.get("MLP", num_classes=3, num_channels=shape[-1])
    x = np.random.default_rng(0).standard_normal((4,) + shape).astype(np.float32)
    payload = fu.ServerPayload(params=model.init(jax.random.key(1), x[:1])["params"])
    return model, payload, x, np.arange(4) % 3


def test_a_diverging_update_raises_naming_the_leaf_and_the_step():
    model, payload, x, y = _mlp()
    with pytest.raises(fu.NonFiniteError, match=r"local_update went non-finite: gradients\['\w+'\]\['\w+'\] holds "
                                               r"(NaN|inf|-inf) at .*first after local step [1-4] of 4 "
                                               r"\(local_learning_rate=10000000000.0\)") as err:
        fu.local_update(model, payload, fu.UserData(inputs=x, labels=y), DIVERGING, KEY)
    assert isinstance(err.value, FloatingPointError) and isinstance(err.value, ValueError)
    # The step named is the first whose result is non-finite.
    step = int(str(err.value).split("local step ")[1].split(" ")[0])
    run = lambda steps: fu.local_update(model, payload, fu.UserData(inputs=x, labels=y),  # noqa: E731
                                        DIVERGING.replace(num_local_updates=steps), KEY, check_finite=False)[0]
    assert not validation.all_finite(run(step).gradients)
    assert step == 1 or validation.all_finite(run(step - 1).gradients)


def test_check_finite_false_returns_the_non_finite_update():
    model, payload, x, y = _mlp()
    shared, _, _ = fu.local_update(model, payload, fu.UserData(inputs=x, labels=y), DIVERGING, KEY, check_finite=False)
    assert not validation.all_finite(shared.gradients)


def test_under_jit_the_default_adds_nothing_and_true_works_with_checkify():
    model, payload, x, y = _mlp()

    def update(inputs, check_finite):
        return fu.local_update(model, payload, fu.UserData(inputs=inputs, labels=y), DIVERGING, KEY,
                               check_finite=check_finite)[0].gradients

    # The default under a trace is off: the program is exactly the unchecked one.
    assert str(jax.make_jaxpr(lambda v: update(v, None))(x)) == str(jax.make_jaxpr(lambda v: update(v, False))(x))
    assert not validation.all_finite(jax.jit(lambda v: update(v, None))(x))
    error, _ = checkify.checkify(jax.jit(lambda v: update(v, True)))(x)
    assert error.get() is not None and "local_update: gradients[" in error.get() and "is not finite" in error.get()
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(lambda v: update(v, True))(x)  # check_finite=True needs the caller's checkify.checkify


def test_aggregate_names_the_first_diverging_user():
    model, payload, x, y = _mlp()
    xs = np.stack([x, 1e10 * x, x])  # user 1 alone diverges
    cfg = AGGREGATE.replace(num_local_updates=2, num_data_per_local_update_step=2, local_learning_rate=1e-3)
    with pytest.raises(fu.NonFiniteError, match=r"aggregate went non-finite: .* first in user 1, first after local "
                                               r"step [12] of 2"):
        fu.aggregate(model, payload, fu.UserData(inputs=xs, labels=np.stack([y] * 3)), cfg, KEY)


def test_a_valid_call_is_unchanged_by_the_checks():
    model = TinyBNNet()
    x, y = make_data(4)
    payload, data = server_payload(model, x), fu.UserData(inputs=x, labels=y)
    checked = fu.local_update(model, payload, data, MULTI, KEY)
    unchecked = fu.local_update(model, payload, data, MULTI, KEY, check_finite=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, checked[0].gradients, unchecked[0].gradients)
    jax.tree_util.tree_map(np.testing.assert_array_equal, checked[2], unchecked[2])


def test_first_failing_step_is_the_smallest_failing_step():
    for num_steps in (1, 2, 5, 16):
        for first in range(1, num_steps + 1):
            calls = []
            assert validation.first_failing_step(lambda s: calls.append(s) or s >= first, num_steps) == first
            assert len(calls) <= num_steps.bit_length() + 1
        assert validation.first_failing_step(lambda s: False, num_steps) is None


def test_closed_over_data_under_jit_skips_the_value_checks_that_would_be_staged():
    # Under an outer jit a reduction of even concrete values is staged, so it cannot decide on the
    # host: the checks of values are the eager call's; the traced program stays the unchecked one.
    model = TinyDense()
    x, y = make_data(4)
    x = x.copy()
    x[0, 0, 0, 0] = np.nan
    payload = server_payload(model, x)
    grads = jax.jit(lambda: fu.local_gradient(model, payload, fu.UserData(inputs=x, labels=y), SINGLE, KEY)[0])()
    assert not validation.all_finite(grads.gradients)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_host_and_device_finite_checks_agree(bad):
    # On CPU, JAX arrays are read as NumPy; the jitted reduction is what an accelerator's arrays
    # take: both paths must give the same answer for NaN, +-inf and finite leaves, in any dtype.
    from fedjax_users.validation import nonfinite

    values = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    if bad is not None:
        values[2, 1] = bad
    leaves = [jnp.asarray(values, dtype) for dtype in (jnp.float32, jnp.bfloat16, jnp.float16)]
    expected = bad is None
    assert all(nonfinite._in_host_memory(leaf) for leaf in leaves)
    assert nonfinite.all_finite({"w": leaves, "b": jnp.ones(2), "n": np.arange(3)}) is expected
    assert bool(nonfinite._device_all_finite(leaves + [jnp.ones(2)])) is expected
    for leaf in leaves:
        assert nonfinite.all_finite([leaf]) is expected
