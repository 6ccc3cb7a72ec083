"""``fedjax-users``: the main job runs offline, saves a loadable update, and user mistakes are one line."""

import jax
import numpy as np
import pytest

from fedjax_users import cli, io


def test_run_default_case_saves_an_update_that_loads_back(tmp_path, capsys):
    out = tmp_path / "update.msgpack"
    # The embedded default case with a lighter model, so the test stays quick.
    assert cli.main(["run", "model=lenet_zhu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for word in ("user type", "local_update", "parameters", "global norm", "server sees", "compile", "saved"):
        assert word in printed
    shared, config = io.load_shared(out)
    assert config["model"] == "lenet_zhu"
    assert config["user"]["user_type"] == "local_update"
    shapes = jax.tree_util.tree_map(np.shape, shared.gradients)
    assert shapes["fc"]["0"]["kernel"] == (768, 10)
    assert shared.metadata.local_hyperparams.steps == config["user"]["num_local_updates"]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(shared.gradients))


def test_run_multiuser_case(tmp_path, capsys):
    out = tmp_path / "agg.msgpack"
    assert cli.main(["run", "configs/case/digits_multiuser.yaml", "model=lenet_zhu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "multiuser_aggregate" in captured.out
    shared, _ = io.load_shared(out)
    num_users = shared.metadata.num_users
    assert num_users >= 2
    # A log, not a terminal: the progress bar writes whole lines, the last one at every user.
    assert f" 0/{num_users} users" in captured.err and f" {num_users}/{num_users} users" in captured.err
    assert "\r" not in captured.err

    assert cli.main(["run", "configs/case/digits_multiuser.yaml", "model=lenet_zhu", "--out", str(out),
                     "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=Nope"], "unknown vision model 'Nope'"),
        (["data.name=Foo"], "unknown dataset 'Foo'"),
        (["data.partition=weird"], "unknown partition 'weird'"),
        (["user.user_idx=99"], "user index 99"),
        (["data.partition=unique-class", "data.default_clients=20", "user.user_idx=15"], "no data"),
        (["data=CIFAR10", "data.path=/nonexistent"], "/nonexistent/cifar-10-batches-py"),
        (["user.num_data_points=100000"], "100000"),
        (["user.local_diff_privacy.distribution=uniform"], "unknown distribution 'uniform'"),
        (["no_such_key=1"], "no_such_key"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_non_zero(overrides, message, tmp_path, capsys):
    assert cli.main(["run", *overrides, "--out", str(tmp_path / "x.msgpack")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("fedjax-users: error:")
    assert "Traceback" not in err
    assert not (tmp_path / "x.msgpack").exists()


def test_missing_case_file_is_a_one_line_error(capsys):
    assert cli.main(["run", "no/such/case.yaml"]) == 2
    assert "no/such/case.yaml" in capsys.readouterr().err
