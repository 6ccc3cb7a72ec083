"""UserConfig: breaching's user YAML files read as they are, overrides, and every rejected value."""

import os

import pytest
from omegaconf import OmegaConf

import fedjax_users as fu
from fedjax_users import ConfigError, UserConfig
from parity import reference

OUR_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "user")
FILES = ("local_gradient.yaml", "local_updates.yaml", "multiuser_aggregate.yaml")

NO_DEFENCE = fu.LocalDiffPrivacy(
    gradient_noise=0.0, input_noise=0.0, distribution="laplacian", per_example_clipping=0.0
)

# What breaching 0.1.2's files say, key by key (None: the file does not have the key).
EXPECTED = {
    "local_gradient.yaml": dict(
        user_type="local_gradient", user_idx=0, user_range=None, num_data_points=1,
        provide_buffers=False, provide_labels=False, provide_num_data_points=True,
        local_diff_privacy=NO_DEFENCE, num_local_updates=None, num_data_per_local_update_step=None,
        local_learning_rate=None, provide_local_hyperparams=None,
    ),
    "local_updates.yaml": dict(
        user_type="local_update", user_idx=0, user_range=None, num_data_points=4,
        provide_buffers=False, provide_labels=False, provide_num_data_points=True,
        local_diff_privacy=NO_DEFENCE, num_local_updates=4, num_data_per_local_update_step=1,
        local_learning_rate=1e-3, provide_local_hyperparams=True,
    ),
    "multiuser_aggregate.yaml": dict(
        user_type="multiuser_aggregate", user_idx=None, user_range=(0, 1000), num_data_points=1000,
        provide_buffers=False, provide_labels=False, provide_num_data_points=True,
        local_diff_privacy=NO_DEFENCE, num_local_updates=1, num_data_per_local_update_step=100,
        local_learning_rate=1e-3, provide_local_hyperparams=False,
    ),
}
MULTI_STEP = {"local_gradient.yaml": False, "local_updates.yaml": True, "multiuser_aggregate.yaml": False}
NUM_USERS = {"local_gradient.yaml": 1, "local_updates.yaml": 1, "multiuser_aggregate.yaml": 1000}


def _breaching_user_dir() -> str:
    try:
        return os.path.join(reference.config_dir(), "case", "user")
    except ModuleNotFoundError:
        pytest.skip("breaching is not installed")


def _check_defaults(cfg: fu.UserConfig, name: str) -> None:
    for key, value in EXPECTED[name].items():
        assert getattr(cfg, key) == value, key
    assert cfg.is_multi_step is MULTI_STEP[name]
    assert cfg.num_users == NUM_USERS[name]


@pytest.mark.parametrize("name", FILES)
def test_our_files_have_breachings_defaults(name):
    _check_defaults(fu.UserConfig.from_yaml(os.path.join(OUR_DIR, name)), name)


@pytest.mark.parametrize("name", FILES)
def test_reads_breachings_own_files_unchanged(name):
    path = os.path.join(_breaching_user_dir(), name)
    cfg = fu.UserConfig.from_yaml(path)
    _check_defaults(cfg, name)
    assert cfg == fu.UserConfig.from_yaml(os.path.join(OUR_DIR, name))
    # Every key of the file is carried, with its value: to_dict gives the file back.
    assert cfg.to_dict() == OmegaConf.to_container(OmegaConf.load(path))


@pytest.mark.parametrize("name", FILES)
def test_dict_round_trip(name):
    cfg = fu.UserConfig.from_yaml(os.path.join(OUR_DIR, name))
    assert fu.UserConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides():
    cfg = fu.UserConfig.from_yaml(
        os.path.join(OUR_DIR, "multiuser_aggregate.yaml"),
        overrides=[
            "num_data_points=8",
            "user_range=[2,5]",
            "provide_labels=true",
            "num_local_updates=3",
            "local_learning_rate=0.5",
            "local_diff_privacy.distribution=gaussian",
            "local_diff_privacy.gradient_noise=0.25",
            "local_diff_privacy.per_example_clipping=2",
        ],
    )
    assert cfg.num_data_points == 8 and isinstance(cfg.num_data_points, int)
    assert cfg.user_range == (2, 5) and cfg.num_users == 3
    assert cfg.provide_labels is True
    assert cfg.num_local_updates == 3 and cfg.is_multi_step
    assert cfg.local_learning_rate == 0.5
    assert cfg.local_diff_privacy == fu.LocalDiffPrivacy(
        gradient_noise=0.25, input_noise=0.0, distribution="gaussian", per_example_clipping=2.0
    )
    # Keys not overridden keep the file's values.
    assert cfg.num_data_per_local_update_step == 100
    assert cfg.provide_num_data_points is True


def test_config_is_hashable_and_replace_revalidates():
    cfg = fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "local_gradient.yaml"))
    assert hash(cfg) == hash(fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "local_gradient.yaml")))
    assert cfg.replace(num_data_points=3).num_data_points == 3
    with pytest.raises(fu.ConfigError, match="num_data_points"):
        cfg.replace(num_data_points=0)


def test_from_dict_builds_nested_privacy():
    cfg = fu.UserConfig.from_dict(
        {"user_type": "local_gradient", "num_data_points": 2, "local_diff_privacy": {"input_noise": 0.1}}
    )
    assert cfg.local_diff_privacy == fu.LocalDiffPrivacy(input_noise=0.1)
    assert cfg.local_diff_privacy.distribution == "laplacian"


BAD_OVERRIDES = [
    ("user_type=local_gradients", "unknown user_type 'local_gradients'"),
    ("local_diff_privacy.distribution=uniform", "unknown distribution 'uniform'"),
    ("local_diff_privacy.gradient_noise=-0.1", r"local_diff_privacy.gradient_noise must be >= 0, got -0.1"),
    ("local_diff_privacy.input_noise=-1", r"local_diff_privacy.input_noise must be >= 0"),
    ("local_diff_privacy.per_example_clipping=-2", r"local_diff_privacy.per_example_clipping must be >= 0"),
    ("local_learning_rate=-0.001", r"local_learning_rate must be >= 0"),
    ("num_data_points=0", r"num_data_points must be >= 1, got 0"),
    ("num_data_points=-4", r"num_data_points must be >= 1, got -4"),
    ("num_local_updates=0", r"num_local_updates must be >= 1, got 0"),
    ("num_local_updates=-1", r"num_local_updates must be >= 1"),
    ("num_data_per_local_update_step=0", r"num_data_per_local_update_step must be >= 1, got 0"),
    ("num_data_per_local_update_step=-3", r"num_data_per_local_update_step must be >= 1"),
    ("user_idx=-1", r"user_idx must be >= 0"),
]


@pytest.mark.parametrize("override, message", BAD_OVERRIDES)
def test_rejected_values(override, message):
    path = os.path.join(OUR_DIR, "local_updates.yaml")
    with pytest.raises(fu.ConfigError, match=message) as err:
        fu.UserConfig.from_yaml(path, overrides=[override])
    assert path in str(err.value)  # the error says which file was being read


@pytest.mark.parametrize("user_range", ["[5,2]", "[3,3]", "[-1,4]", "[0,1,2]"])
def test_rejected_user_range(user_range):
    with pytest.raises(fu.ConfigError, match="user_range"):
        fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "multiuser_aggregate.yaml"), [f"user_range={user_range}"])


def test_config_error_is_value_error():
    assert issubclass(fu.ConfigError, ValueError)


def test_multi_step_user_needs_its_keys():
    with pytest.raises(fu.ConfigError, match="num_local_updates, num_data_per_local_update_step, local_learning_rate"):
        fu.UserConfig(user_type="local_update", num_data_points=2)
    # An aggregate of multi-step users needs them too.
    with pytest.raises(fu.ConfigError, match="local_learning_rate"):
        fu.UserConfig(user_type="multiuser_aggregate", num_data_points=2, user_range=(0, 2),
                      num_local_updates=2, num_data_per_local_update_step=1)


@pytest.mark.parametrize(
    "text, key",
    [
        ("user_type: local_gradient\nnum_data_points: 1\nnum_data_point: 4\n", "num_data_point"),
        ("user_type: local_gradient\nnum_data_points: 1\nlocal_diff_privacy:\n  gradient_nois: 0.1\n",
         "gradient_nois"),
    ],
)
def test_unknown_key_in_file(tmp_path, text, key):
    path = tmp_path / "user.yaml"
    path.write_text(text)
    with pytest.raises(fu.ConfigError, match=f"unknown key '{key}'") as err:
        fu.UserConfig.from_yaml(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("override, key", [("num_data_point=3", "num_data_point"),
                                           ("local_diff_privacy.clip=1", "clip")])
def test_unknown_override_key(override, key):
    with pytest.raises(fu.ConfigError, match=f"unknown key '{key}'"):
        fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "local_gradient.yaml"), overrides=[override])


def test_override_without_value():
    with pytest.raises(fu.ConfigError, match="key=value"):
        fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "local_gradient.yaml"), overrides=["num_data_points"])


def test_missing_file(tmp_path):
    with pytest.raises(fu.ConfigError, match="not found"):
        fu.UserConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("num_data_points=abc", "num_data_points"),
        ("num_data_points=2.5", "num_data_points"),
        ("local_learning_rate=fast", "local_learning_rate"),
        ("provide_labels=maybe", "provide_labels"),
        ("local_diff_privacy=3", "local_diff_privacy"),
        ("local_diff_privacy.gradient_noise=x", "gradient_noise"),
    ],
)
def test_values_of_the_wrong_type_are_named(override, key):
    with pytest.raises(fu.ConfigError, match=key):
        fu.UserConfig.from_yaml("configs/user/local_updates.yaml", [override])


# ----------------------------------------------------------------------------------------------
# No silent failures (issue 13): non-finite numbers, contradictory kinds, malformed files


@pytest.mark.parametrize(
    "override, key",
    [
        ("local_diff_privacy.per_example_clipping=.nan", "local_diff_privacy.per_example_clipping"),
        ("local_diff_privacy.gradient_noise=.nan", "local_diff_privacy.gradient_noise"),
        ("local_diff_privacy.input_noise=.inf", "local_diff_privacy.input_noise"),
        ("local_diff_privacy.gradient_noise=-.inf", "local_diff_privacy.gradient_noise"),
        ("local_learning_rate=.inf", "local_learning_rate"),
    ],
)
def test_non_finite_numbers_are_rejected(override, key):
    path = os.path.join(OUR_DIR, "local_updates.yaml")
    with pytest.raises(fu.ConfigError, match=rf"{key} must be a finite number, got -?(nan|inf)") as err:
        fu.UserConfig.from_yaml(path, overrides=[override])
    assert path in str(err.value)


@pytest.mark.parametrize("field", ["per_example_clipping", "gradient_noise", "input_noise"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_privacy_values_are_rejected_in_code(field, value):
    with pytest.raises(fu.ConfigError, match=f"local_diff_privacy.{field} must be a finite number"):
        fu.LocalDiffPrivacy(**{field: value})
    with pytest.raises(fu.ConfigError, match=f"local_diff_privacy.{field}"):
        fu.UserConfig.from_dict({"user_type": "local_gradient", "num_data_points": 1,
                                 "local_diff_privacy": {field: value}})


def test_local_gradient_config_with_local_steps_is_rejected():
    with pytest.raises(fu.ConfigError, match="local_gradient user takes one gradient, got num_local_updates=4"):
        fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "local_gradient.yaml"), ["num_local_updates=4"])
    # One step is what a local_gradient user does: still a local_gradient config.
    assert not fu.UserConfig(user_type="local_gradient", num_data_points=1, num_local_updates=1).is_multi_step


@pytest.mark.parametrize("user_range, message", [("[0.5,3]", "two ints"), ("5", "user_range must be"),
                                                 ("abc", "user_range must be")])
def test_user_range_is_never_truncated(user_range, message):
    with pytest.raises(fu.ConfigError, match=message):
        fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "multiuser_aggregate.yaml"), [f"user_range={user_range}"])


@pytest.mark.parametrize("values, message", [
    ({}, "needs user_type, num_data_points"),
    ({"user_type": "local_gradient"}, "needs num_data_points"),
    ([1, 2], "must be a mapping"),
    ("local_gradient", "must be a mapping"),
])
def test_from_dict_needs_a_mapping_with_the_required_keys(values, message):
    with pytest.raises(fu.ConfigError, match=message):
        fu.UserConfig.from_dict(values)


MALFORMED = {
    # file name: (contents or None for a folder, message)
    "empty.yaml": ("", "is empty"),
    "list.yaml": ("- 1\n- 2\n", "must hold a mapping of keys, got a list"),
    "string.yaml": ("just a string\n", "must hold a mapping of keys, got the value 'just a string'"),
    "broken.yaml": ("user_type: [local_gradient\n", r"is not valid YAML: .* \(line \d+, column \d+\)"),
    "two.yaml": ("user_type: local_gradient\n---\nnum_data_points: 1\n", "is not valid YAML"),
    "binary.yaml": (b"\xff\xfe\x00\x01", "is not a text file"),
    "folder.yaml": (None, "is a folder"),
}


def _write(path, contents):
    """A folder for ``None``, else a file holding ``contents`` (bytes or text)."""
    if contents is None:
        path.mkdir()
    elif isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        path.write_text(contents)
    return path


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_files_are_one_config_error_naming_the_path(tmp_path, name):
    contents, message = MALFORMED[name]
    path = _write(tmp_path / name, contents)
    with pytest.raises(fu.ConfigError, match=message) as err:
        fu.UserConfig.from_yaml(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_override_that_cannot_merge_is_a_config_error():
    with pytest.raises(fu.ConfigError, match="cannot apply overrides local_diff_privacy"):
        fu.UserConfig.from_yaml(os.path.join(OUR_DIR, "local_gradient.yaml"), ["local_diff_privacy=[1,2]"])


# Case files (fedjax_users.data.load_case) are refused the same way, and each is also a DataError.
CASE_BODY = "defaults:\n  - data: digits\n  - user: local_gradient\nmodel: linear\n"
MALFORMED_CASES = {
    "user5.yaml": (CASE_BODY + "user: 5\n", "user must be a mapping of user keys, got 5"),
    "data_list.yaml": (CASE_BODY + "data: [1, 2]\n", "cannot merge"),
    "defaults5.yaml": ("defaults: 5\nmodel: linear\n", "defaults must be a list"),
    **{name: value for name, value in MALFORMED.items() if name != "two.yaml"},
}


@pytest.mark.parametrize("name", list(MALFORMED_CASES))
def test_malformed_case_files_are_one_config_error_naming_the_path(tmp_path, name):
    from fedjax_users.data import DataError, load_case

    contents, message = MALFORMED_CASES[name]
    path = _write(tmp_path / name, contents)
    with pytest.raises(fu.ConfigError, match=message) as err:
        load_case(path)
    assert isinstance(err.value, DataError)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_case_user_block_set_to_a_number_by_override():
    from fedjax_users.data import load_case

    with pytest.raises(fu.ConfigError, match="user must be a mapping of user keys, got 5"):
        load_case(None, ["+user=5"])


def test_nan_written_in_the_yaml_file(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text("user_type: local_gradient\nnum_data_points: 1\nlocal_diff_privacy:\n  per_example_clipping: .nan\n")
    with pytest.raises(fu.ConfigError, match="local_diff_privacy.per_example_clipping must be a finite number, got nan"):
        fu.UserConfig.from_yaml(path)


def test_shipped_user_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from fedjax_users.config import USER_CONFIGS, user_config_names

    monkeypatch.chdir(tmp_path)
    assert user_config_names() == ["local_gradient", "local_updates", "multiuser_aggregate"]
    by_name = UserConfig.from_yaml("local_updates", ["num_data_points=3"])
    by_path = UserConfig.from_yaml(f"{USER_CONFIGS}/local_updates.yaml", ["num_data_points=3"])
    assert by_name == by_path and by_name.user_type == "local_update" and by_name.num_data_points == 3
    with pytest.raises(ConfigError, match="did you mean 'local_updates'"):
        UserConfig.from_yaml("local_update")
    with pytest.raises(ConfigError, match="config file not found"):  # a path is read as a path
        UserConfig.from_yaml("configs/user/local_updates.yaml")
