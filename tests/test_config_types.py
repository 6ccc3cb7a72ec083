"""UserConfig's field types, checked by OmegaConf's structured config of the dataclass."""

import dataclasses

import numpy as np
import pytest

import fedjax_users as fu

BASE = dict(user_type="local_update", num_data_points=4, num_local_updates=2, num_data_per_local_update_step=1,
            local_learning_rate=0.1)


@pytest.mark.parametrize("field, value, message", [
    # OmegaConf would convert these ("5" to 5, 1 to True): a value that needs converting is refused.
    ("num_data_points", "5", "num_data_points must be an int, got '5'"),
    ("provide_labels", 1, "provide_labels must be a bool, got 1"),
    ("provide_labels", "true", "provide_labels must be a bool, got 'true'"),
    ("local_learning_rate", "1e-3", "local_learning_rate must be a number, got '1e-3'"),
    # ... and these it refuses itself.
    ("num_data_points", 2.5, "num_data_points must be an int, got 2.5"),
    ("num_local_updates", True, "num_local_updates must be an int, got True"),
    ("user_idx", np.bool_(True), "user_idx must be an int, got np.True_"),
    ("local_learning_rate", [0.1], r"local_learning_rate must be a number, got \[0.1\]"),
    # A field that is not Optional takes no None.
    ("provide_buffers", None, "provide_buffers must be a bool, got None"),
])
def test_a_value_of_another_type_is_named_with_its_field(field, value, message):
    with pytest.raises(fu.ConfigError, match=message):
        fu.UserConfig(**dict(BASE, **{field: value}))


def test_numbers_numpy_scalars_and_none_where_optional_are_taken_as_given():
    cfg = fu.UserConfig(**dict(BASE, num_data_points=np.int64(3), provide_labels=np.bool_(True),
                               local_learning_rate=1, user_idx=None))
    assert cfg.num_data_points == 3 and cfg.provide_labels and cfg.local_learning_rate == 1
    ldp = fu.LocalDiffPrivacy(gradient_noise=np.float32(0.5), per_example_clipping=2)
    assert ldp.gradient_noise == 0.5 and ldp.per_example_clipping == 2
    with pytest.raises(fu.ConfigError, match="local_diff_privacy.input_noise must be a number, got 'x'"):
        fu.LocalDiffPrivacy(input_noise="x")


def test_a_checked_config_does_not_vouch_for_an_equal_value_of_another_type():
    # Checks are remembered per typed value: True passing must not let 1 (== True) through.
    fu.UserConfig(**dict(BASE, provide_labels=True))
    with pytest.raises(fu.ConfigError, match="provide_labels must be a bool, got 1"):
        fu.UserConfig(**dict(BASE, provide_labels=1))


def test_still_a_frozen_hashable_value():
    cfg = fu.UserConfig(**BASE)
    twin = fu.UserConfig(**BASE)
    assert cfg == twin and hash(cfg) == hash(twin) and {cfg: 1}[twin] == 1
    assert cfg.replace(num_data_points=8) != cfg and cfg.replace(num_data_points=8).num_data_points == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_data_points = 8
