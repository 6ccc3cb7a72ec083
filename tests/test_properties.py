"""Property: any config and inputs either give finite outputs or one of the project's errors, never a raw one.

Hypothesis draws configs (every float key also NaN, infinite, huge or negative), inputs (NaN,
wrong sizes, lists, no examples axis), labels (outside the classes, floats) and which function is
called. A raw JAX, NumPy or OmegaConf exception fails the test. Shapes and configs are drawn from
small sets so that the calls share a few compiled programs.
"""

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fedjax_users as fu
from fedjax_users import io, models, validation
from fedjax_users.data import DataError

PROJECT_ERRORS = (fu.ConfigError, fu.InputError, fu.NonFiniteError, io.SharedFileError, DataError)
CLASSES, CHANNELS, SIZE = 4, 3, 6
FUNCTIONS = {"local_gradient": fu.local_gradient, "local_update": fu.local_update, "aggregate": fu.aggregate}

BAD_NUMBERS = [-1.0, float("nan"), float("inf"), -float("inf")]
# A key of the config to corrupt (None: keep every value valid), and what a bad value of it may be.
CORRUPTIONS = {
    "num_data_points": [0, -1, 2.5, None],
    "user_range": [[0.5, 2], [2, 0], 5],
    "local_learning_rate": BAD_NUMBERS + [1e10],  # 1e10 diverges for MLP: a finite config, non-finite update
    "gradient_noise": BAD_NUMBERS,
    "input_noise": BAD_NUMBERS,
    "per_example_clipping": BAD_NUMBERS,
    "distribution": ["uniform"],
}


@functools.lru_cache(maxsize=None)
def _model_and_payload(name: str, size: int):
    """A small model and the server payload initialised for ``size x size`` images (one per pair)."""
    model = models.get(name, num_classes=CLASSES, num_channels=CHANNELS)
    variables = model.init(jax.random.key(1), np.zeros((1, size, size, CHANNELS), np.float32))
    return model, fu.ServerPayload(params=variables["params"], batch_stats=variables.get("batch_stats"))


@st.composite
def configs(draw, function: str):
    """A mapping of breaching's user keys for ``function``'s kind of user (sometimes another kind),
    valid or with one key corrupted."""
    kinds = {"local_gradient": "local_gradient", "local_update": "local_update", "aggregate": "multiuser_aggregate"}
    user_type = kinds[function] if draw(st.integers(0, 7)) else draw(st.sampled_from(sorted(kinds.values())))
    multi = user_type == "local_update" or (user_type == "multiuser_aggregate" and draw(st.booleans()))
    values = {
        "user_type": user_type,
        "num_data_points": 4,
        "provide_labels": draw(st.booleans()),
        "local_diff_privacy": {
            "gradient_noise": draw(st.sampled_from([0.0, 0.0, 0.01])),
            "input_noise": 0.0,
            "per_example_clipping": draw(st.sampled_from([0.0, 0.0, 0.0, 1.0])),
            "distribution": draw(st.sampled_from(["gaussian", "laplacian"])),
        },
    }
    if multi:
        values.update(num_local_updates=2, num_data_per_local_update_step=2,
                      local_learning_rate=draw(st.sampled_from([0.0, 0.1])))
    if user_type == "multiuser_aggregate":
        values["user_range"] = [0, 2]
    bad = draw(st.sampled_from([None] * 14 + sorted(CORRUPTIONS)))
    if bad is not None:
        value = draw(st.sampled_from(CORRUPTIONS[bad]))
        if bad in values["local_diff_privacy"]:
            values["local_diff_privacy"][bad] = value
        else:
            values[bad] = value
    return values


@st.composite
def calls(draw):
    """(function name, model name, payload size, config mapping, inputs, labels) for one call."""
    function = draw(st.sampled_from(list(FUNCTIONS)))
    model_name = draw(st.sampled_from(["linear"] * 3 + ["MLP"] * 2 + ["lenet_zhu"]))
    size = draw(st.sampled_from([SIZE] * 4 + [4]))  # the payload's image size: sometimes not the inputs'
    lead = (2, 4) if function == "aggregate" else (4,)
    if draw(st.integers(0, 9)) == 0:
        lead = lead[1:]  # a users or examples axis missing
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    inputs = rng.standard_normal(lead + (SIZE, SIZE, CHANNELS)).astype(np.float32)
    labels = np.asarray(rng.integers(0, CLASSES, lead))
    corruption = draw(st.sampled_from(["none"] * 10 + ["nan", "inf", "label", "negative", "float", "list", "short"]))
    if corruption in ("nan", "inf"):
        inputs.reshape(-1)[rng.integers(inputs.size)] = np.nan if corruption == "nan" else np.inf
    elif corruption in ("label", "negative"):
        labels.reshape(-1)[0] = CLASSES if corruption == "label" else -1
    elif corruption == "float":
        labels = labels.astype(np.float32)
    elif corruption == "list":
        inputs, labels = inputs.tolist(), labels.tolist()
    elif corruption == "short" and labels.ndim:
        labels = labels[..., :-1]
    return function, model_name, size, draw(configs(function)), inputs, labels


def _finite(tree) -> bool:
    return validation.all_finite(tree)


@pytest.mark.slow
# Derandomized: CI runs the same examples every time (same time, no flaky discoveries mid-review).
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=True)
@given(calls())
def test_every_call_is_finite_or_a_project_error(call):
    function, model_name, size, values, inputs, labels = call
    model, payload = _model_and_payload(model_name, size)
    try:
        cfg = fu.UserConfig.from_dict(values)
        outputs = FUNCTIONS[function](model, payload, fu.UserData(inputs=inputs, labels=labels), cfg,
                                      jax.random.key(0))
    except PROJECT_ERRORS as err:
        event(type(err).__name__)  # the outcome mix, shown by pytest --hypothesis-show-statistics
        message = str(err)
        assert message and "\n" not in message, repr(message)
        return
    event("finite outputs")
    shared = outputs[0]
    assert _finite(shared.gradients) and _finite(shared.batch_stats)
    assert jax.tree_util.tree_structure(shared.gradients) == jax.tree_util.tree_structure(payload.params)
