"""``load_case`` is Hydra's composition, as breaching's ``get_case_config`` makes it, plus our extras."""

import concurrent.futures
import math
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fedjax_users.data import DataError, catalog, load_case
from fedjax_users.data.compose import DEFAULT_CASE

BREACHING_CASES = catalog.breaching_case_folder()
needs_breaching = pytest.mark.skipif(BREACHING_CASES is None, reason="breaching's case files are not installed")


def _breaching_compose(name, overrides=()):
    """What ``breaching.get_case_config(name, overrides)`` returns (its two Hydra calls; importing
    breaching itself would import torch and torchvision)."""
    with initialize_config_dir(config_dir=BREACHING_CASES, version_base=None):
        return OmegaConf.to_container(compose(config_name=name, overrides=list(overrides)))


@needs_breaching
@pytest.mark.parametrize("overrides", [[], ["user=local_updates", "user.num_data_points=2", "server.num_queries=3"]])
def test_breaching_cases_compose_as_breaching_composes_them(overrides):
    names = sorted(f[:-5] for f in os.listdir(BREACHING_CASES) if f.endswith(".yaml"))
    assert len(names) >= 9
    for name in names:
        ours = OmegaConf.to_container(load_case(os.path.join(BREACHING_CASES, f"{name}.yaml"), overrides))
        theirs = _breaching_compose(name, overrides)
        # The one key we add: breaching's server configs lack server.weights (a local torchvision file).
        assert ours["server"].pop("weights") is None
        # Equal values in the same order: the bundled data configs of the same names (CIFAR10, ...)
        # come after breaching's own in the search path, so they never replace them.
        assert ours == theirs and list(ours) == list(theirs), name


def test_yaml_and_hydra_spellings_of_nan_and_inf_are_floats():
    cfg = load_case(None, ["user.local_learning_rate=.inf", "user.local_diff_privacy.gradient_noise=nan",
                           "user.local_diff_privacy.input_noise=-.Inf", "+data.x=-inf"])
    assert cfg.user.local_learning_rate == math.inf and cfg.data.x == -math.inf
    assert math.isnan(cfg.user.local_diff_privacy.gradient_noise) and cfg.user.local_diff_privacy.input_noise == -math.inf


def test_a_case_under_a_folder_whose_name_hydra_would_parse(tmp_path):
    # The search path goes to Hydra as an override: spaces, commas, quotes and brackets must survive it.
    root = tmp_path / "a b,c'd [e]\\"
    (root / "case").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "mine.yaml").write_text("name: synthetic\nsize: 7\n")
    (root / "case" / "c.yaml").write_text("defaults:\n  - data: mine\n  - user: local_gradient\nmodel: linear\n")
    cfg = load_case(root / "case" / "c.yaml")
    assert cfg.data.size == 7 and cfg.user.user_type == "local_gradient"


@pytest.mark.parametrize("overrides, message", [
    (["+user=5"], "user must be a mapping of user keys, got 5"),
    (["+user=local_gradient"], "the case already chooses user: local_updates; use user=local_gradient to replace it"),
    (["user=5"], "no user config named '5'"),
    (["data=digts"], "no data config named 'digts'; did you mean 'digits'?"),
    (["user.num_data_points=4", "user.num_data_point=4"], "override key 'user.num_data_point' is not in the case; "
                                                           "did you mean 'user.num_data_points'"),
    (["user.user_range=[0,"], "cannot parse override user.user_range=[0,: no viable alternative at input '[0,'"),
    (["~user.nope"], "cannot apply override ~user.nope: Could not delete from config. 'user.nope' does not exist."),
])
def test_what_hydra_refuses_is_one_line_naming_the_override(overrides, message):
    with pytest.raises(DataError) as err:
        load_case(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_case_file_hydra_cannot_name_is_refused_in_one_line(tmp_path):
    (tmp_path / "c.yml").write_text("model: linear\n")
    with pytest.raises(DataError, match=r"c\.yml must be named \*\.yaml"):
        load_case(tmp_path / "c.yml")


def test_hydra_state_is_left_as_found(tmp_path):
    assert not GlobalHydra.instance().is_initialized()
    load_case(None)
    assert not GlobalHydra.instance().is_initialized()
    # Inside another application's Hydra set-up (a @hydra.main program, say): its own compose still works after.
    (tmp_path / "app.yaml").write_text("lr: 0.1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        assert load_case(None, ["data=synthetic"]).data.like == "digits"
        assert compose(config_name="app", overrides=["lr=0.2"]).lr == 0.2


def test_threads_compose_at_once():
    # Hydra's compose API keeps one process-wide state: concurrent calls must not see each other's.
    cases = [(os.path.join(os.path.dirname(DEFAULT_CASE), f"{name}.yaml"), overrides)
             for name in ("default", "digits_multiuser", "text_random_tokens") for overrides in ([], ["data=synthetic"])]
    serial = [OmegaConf.to_container(load_case(*case)) for case in cases]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda case: OmegaConf.to_container(load_case(*case)), cases))
    assert threaded == serial


@pytest.mark.parametrize("home", ["/home/researcher", "/home/a researcher"])
def test_a_home_relative_path_is_expanded_as_a_shell_would(home, monkeypatch):
    # The README's `fedjax-users run ... data.path=~/data`: bash leaves that ~ alone (data.path is not
    # a variable name) and Hydra's grammar has no unquoted ~ in a value.
    monkeypatch.setenv("HOME", home)
    cfg = load_case(None, ["data.path=~/data", "data.name=~nobody-such-user"])
    assert cfg.data.path == f"{home}/data"
    assert cfg.data.name == "~nobody-such-user"  # expanduser leaves an unknown user's ~ as it is
