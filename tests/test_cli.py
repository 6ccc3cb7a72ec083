"""``fedjax-users``: the main job runs offline, saves a loadable update, and user mistakes are one line."""

import os
import re

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
    # The case as run (its overrides named), and lenet_zhu has no BatchNorm to run in any mode.
    assert "case        default_digits with model=lenet_zhu\n" in printed
    assert "parameters, float32, no BatchNorm\n" in printed
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
    # A log, not a terminal: no progress, only the summary.
    assert captured.err == ""


@pytest.mark.parametrize("quiet", [False, True], ids=["terminal", "quiet"])
def test_progress_shows_the_stages_on_a_terminal_unless_quiet(quiet, tmp_path, capsys, monkeypatch):
    import io as text_io

    from rich.console import Console

    from fedjax_users import progress

    screen = Console(file=text_io.StringIO(), force_terminal=True, width=150, color_system=None)
    monkeypatch.setattr(progress, "Console", lambda **_: screen)
    args = ["run", "configs/case/digits_multiuser.yaml", "model=lenet_zhu", "--out", str(tmp_path / "r")]
    assert cli.main(args + (["--quiet"] if quiet else [])) == 0
    drawn = screen.file.getvalue()
    # Compiling the first query takes seconds: rich redraws ten times a second meanwhile.
    assert ("query 1 of 1 (compiling first)" in drawn) != quiet
    assert "case        digits_multiuser" in capsys.readouterr().out


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
        (["model=resnet81"], "did you mean 'resnet18'"),
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


# ----------------------------------------------------------------------------------------------
# No silent failures (issue 13): each bad input is one line on stderr, exit 2, nothing written


def _assert_one_line_error(code, captured, message, out):
    assert code == 2
    assert message in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("fedjax-users: error:")
    assert "Traceback" not in captured.err
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["user.local_diff_privacy.per_example_clipping=.nan"],
         "local_diff_privacy.per_example_clipping must be a finite number, got nan"),
        (["user.local_diff_privacy.gradient_noise=.nan"], "local_diff_privacy.gradient_noise must be a finite number"),
        (["user.local_diff_privacy.input_noise=.inf"], "local_diff_privacy.input_noise must be a finite number"),
        (["user.local_learning_rate=.inf"], "local_learning_rate must be a finite number, got inf"),
        (["user=local_gradient", "+user.num_local_updates=4"], "a local_gradient user takes one gradient"),
        (["+user=5"], "user must be a mapping of user keys, got 5"),
        (["user.user_range=[0.5,3]"], "user_range"),
        (["user.user_range=[0,"], "cannot parse override user.user_range=[0,: no viable alternative at input '[0,'"),
    ],
)
def test_bad_config_values_are_one_line(overrides, message, tmp_path, capsys):
    out = tmp_path / "x.msgpack"
    if overrides[0].startswith("user.user_range="):
        overrides = ["configs/case/digits_multiuser.yaml", *overrides]
    code = cli.main(["run", *overrides, "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr(), message, out)


def test_a_diverging_update_exits_2_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "x.msgpack"
    # The linear model's local steps diverge at this learning rate (NaN after the second step).
    code = cli.main(["run", "model=linear", "user.num_local_updates=2", "user.local_learning_rate=1e37",
                     "--out", str(out)])
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured, "local_update went non-finite: gradients[", out)
    assert "global norm" not in captured.out


@pytest.mark.parametrize("where, message", [("missing-folder", "cannot write the shared update to"),
                                            ("a-file", "is a file")])
def test_out_is_checked_before_computing(where, message, tmp_path, capsys):
    out = tmp_path / "missing" / "x.msgpack" if where == "missing-folder" else tmp_path / "notes.txt"
    if where == "a-file":
        out.write_text("not a run folder")
    code = cli.main(["run", "model=lenet_zhu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and str(out) in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""  # nothing was built or computed: every summary line comes after the computation
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("contents, message", [("", "is empty"), ("- 1\n", "got a list"), ("a: [1\n", "not valid YAML")])
def test_malformed_case_file_is_one_line(contents, message, tmp_path, capsys):
    case = tmp_path / "case.yaml"
    case.write_text(contents)
    out = tmp_path / "x.msgpack"
    code = cli.main(["run", str(case), "--out", str(out)])
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured, message, out)
    assert str(case) in captured.err


def test_data_override_prints_the_data_and_the_case_as_run(tmp_path, capsys):
    from data.cifar_fakes import write_fake_cifar

    write_fake_cifar(str(tmp_path), "CIFAR10", per_file=40)
    out = tmp_path / "x.msgpack"
    overrides = ["data=CIFAR10", f"data.path={tmp_path}", "data.default_clients=1", "model=linear"]
    assert cli.main(["run", *overrides, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"case        default_digits with {' '.join(overrides)}\n" in printed
    assert "data        CIFAR10, " in printed and "digits" not in printed.split("data        ")[1].split("\n")[0]
    shared, config = io.load_shared(out)
    assert config["data"]["name"] == "CIFAR10"


# ----------------------------------------------------------------------------------------------
# breaching's case files (issue 14): impl.dtype, the summary's key lists


def _breaching_case(name):
    from parity.reference import config_dir

    return f"{config_dir()}/case/{name}.yaml"


SYNTHETIC_SMALL = ["data=synthetic", "data.shape=[3,6,6]", "data.size=40", "data.default_clients=1", "model=linear"]


def test_double_runs_in_float64_and_leaves_x64_as_it_was(tmp_path, capsys):
    out = tmp_path / "u.msgpack"
    assert not jax.config.jax_enable_x64
    code = cli.main(["run", _breaching_case("1_single_image_small"), *SYNTHETIC_SMALL, "impl.dtype=double",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "parameters, float64, " in printed and "not applicable impl.non_blocking" in printed
    assert not jax.config.jax_enable_x64  # on for the run only
    shared, _ = io.load_shared(out)
    assert {np.asarray(leaf).dtype for leaf in jax.tree_util.tree_leaves(shared.gradients)} == {np.dtype("float64")}


def test_each_query_is_saved(tmp_path, capsys):
    out = tmp_path / "u.msgpack"
    code = cli.main(["run", _breaching_case("1_single_image_small"), *SYNTHETIC_SMALL, "server.num_queries=2",
                     "num_queries=2", "impl.shuffle=True", "user.num_data_points=3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "2 queries" in printed
    first, second = (io.load_shared(tmp_path / f"u.query{q}.msgpack")[0] for q in (0, 1))
    # Shuffled: each query the user draws its examples afresh, so the two gradients differ.
    assert not np.array_equal(first.gradients["1"]["kernel"], second.gradients["1"]["kernel"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["impl.dtype=half"], "impl.dtype='half' is not supported"),
        (["server.name=malicious_model"], "only breaching's honest-but-curious server"),
        (["server=malicious"], "no server config named 'malicious'"),
    ],
)
def test_breaching_case_mistakes_are_one_line(overrides, message, tmp_path, capsys):
    out = tmp_path / "x.msgpack"
    code = cli.main(["run", _breaching_case("1_single_image_small"), *SYNTHETIC_SMALL, *overrides, "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr(), message, out)


@pytest.mark.parametrize("timing", [False, True], ids=["once", "time"])
def test_a_single_query_is_computed_once_unless_the_steady_state_is_asked_for(tmp_path, capsys, monkeypatch, timing):
    import fedjax_users as fu

    calls = []
    real = fu.compute

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fu, "compute", counted)
    argv = ["run", "model=lenet_zhu", "--out", str(tmp_path / "u.msgpack")] + (["--time"] if timing else [])
    assert cli.main(argv) == 0
    assert len(calls) == (2 if timing else 1)
    wall = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wall time"))
    assert ("steady state" in wall and "ms" in wall) if timing else ("first call" in wall and " ms " not in wall)


def test_each_run_keeps_its_own_folder_with_config_summary_and_update(tmp_path, monkeypatch, capsys):
    import json
    import os

    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "model=lenet_zhu"]) == 0
    (only,) = (tmp_path / "runs").iterdir()
    before = {f.name: f.read_bytes() for f in only.iterdir()}
    assert cli.main(["run", "model=lenet_zhu", "--seed", "1"]) == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("default_digits-") for f in folders)
    first, second = folders
    assert sorted(os.listdir(first)) == ["config.yaml", "shared_update.metadata.json", "shared_update.msgpack",
                                         "shared_update.safetensors", "summary.json"]
    summary = json.loads((first / "summary.json").read_text())
    shared, config = io.load_shared(first / "shared_update.msgpack")
    assert OmegaConf.to_container(OmegaConf.load(first / "config.yaml")) == config
    assert config["model"] == "lenet_zhu" and summary["model"]["name"] == "lenet_zhu"
    assert summary["update"]["shapes"]["fc/0/kernel"] == [768, 10]
    norm = float(np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree_util.tree_leaves(shared.gradients))))
    np.testing.assert_allclose(summary["update"]["global_norms"], [norm], rtol=1e-5)
    assert summary["seed"] == 0 and json.loads((second / "summary.json").read_text())["seed"] == 1
    assert summary["versions"]["jax"] == jax.__version__ and "epsilon" in summary["privacy"]
    # The second run did not touch the first.
    assert first == only and {f.name: f.read_bytes() for f in first.iterdir()} == before


def test_an_existing_out_is_refused_before_computing_unless_forced(tmp_path, capsys):
    import os

    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    assert cli.main(["run", "model=lenet_zhu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and str(out) in err
    assert os.listdir(out) == ["mine.txt"]
    single = tmp_path / "u.msgpack"
    single.write_bytes(b"old")
    assert cli.main(["run", "model=lenet_zhu", "--out", str(single)]) == 2
    assert single.read_bytes() == b"old"
    assert cli.main(["run", "model=lenet_zhu", "--out", str(out), "--force"]) == 0
    assert {"config.yaml", "summary.json", "shared_update.msgpack", "shared_update.safetensors",
            "shared_update.metadata.json", "mine.txt"} == set(os.listdir(out))


def test_a_run_that_fails_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "model=no_such_model"]) == 2
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["nan", ".nan", "-inf"])
def test_the_cli_and_the_api_say_the_same_words(value, tmp_path, capsys):
    import fedjax_users as fu

    # Hydra's override grammar (breaching's command line) reads nan and inf as numbers, as YAML's .nan.
    with pytest.raises(fu.ConfigError) as api:
        fu.LocalDiffPrivacy(per_example_clipping=float(value.lstrip(".")))
    out = tmp_path / "x.msgpack"
    code = cli.main(["run", f"user.local_diff_privacy.per_example_clipping={value}", "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr(), str(api.value), out)


# ----------------------------------------------------------------------------------------------
# Cases by name (issue 29)


def test_cases_lists_every_case_file_it_runs_by_name(capsys):
    from fedjax_users.data import catalog

    assert cli.main(["cases"]) == 0
    printed = capsys.readouterr().out
    breaching = sorted(f[:-5] for f in os.listdir(catalog.breaching_case_folder()) if f.endswith(".yaml"))
    bundled = sorted(f[:-5] for f in os.listdir(os.path.join(catalog.CONFIG_ROOT, "case")) if f.endswith(".yaml"))
    listed = [line.split()[0] for line in printed.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(breaching + bundled) and len(breaching) >= 9
    # One line each, saying what it computes, from the composed case.
    assert re.search(r"^  4_fedavg_small_scale +ResNet18 on ImageNetAnimals 3x224x224; local_update, 4 examples, "
                     r"4 local steps$", printed, flags=re.M)
    assert re.search(r"^  digits_multiuser +lenet_zhu on digits .*multiuser_aggregate, 4 users", printed, flags=re.M)
    # breaching numbers its cases: 2_ before 10_.
    assert listed.index("2_single_imagenet") < listed.index("10_causal_lang_training")


def test_a_case_runs_by_name_as_by_its_path(tmp_path, capsys):
    by_name, by_path = tmp_path / "name", tmp_path / "path"
    assert cli.main(["run", "1_single_image_small", *SYNTHETIC_SMALL, "--out", str(by_name)]) == 0
    assert cli.main(["run", _breaching_case("1_single_image_small"), *SYNTHETIC_SMALL, "--out", str(by_path)]) == 0
    (first, _), (second, _) = (io.load_shared(folder / "shared_update.msgpack") for folder in (by_name, by_path))
    for a, b in zip(jax.tree_util.tree_leaves(first.gradients), jax.tree_util.tree_leaves(second.gradients)):
        np.testing.assert_array_equal(a, b)
    assert capsys.readouterr().out.count("case        single_image_small with data=synthetic") == 2


def test_an_unknown_case_name_is_one_line_with_the_close_names(tmp_path, capsys, monkeypatch):
    from fedjax_users.data import catalog

    out = tmp_path / "x"
    code = cli.main(["run", "4_fedavg_smal_scale", "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr(), "no case file or case named '4_fedavg_smal_scale'; "
                           "did you mean '4_fedavg_small_scale'?", out)
    # Without breaching installed, its names are not known, and the message says how to add them.
    monkeypatch.setattr(catalog, "breaching_case_folder", lambda: None)
    code = cli.main(["run", "4_fedavg_small_scale", "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr(), "pip install --no-deps breaching==0.1.2", out)
    assert cli.main(["cases"]) == 0
    printed = capsys.readouterr().out
    assert "4_fedavg_small_scale" not in printed and "breaching's case files: not installed" in printed


# ----------------------------------------------------------------------------------------------
# Streamed aggregates (issue 28)


def test_run_streams_an_aggregate_with_the_in_memory_result_and_resumes_from_a_checkpoint(tmp_path, capsys):
    import fedjax_users as fu
    from fedjax_users.data import construct_users, load_case

    args = ["configs/case/digits_multiuser.yaml", "model=lenet_zhu"]
    ckpt = tmp_path / "ckpt"
    assert cli.main(["run", *args, "--out", str(tmp_path / "a"), "--checkpoint", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "streaming   waited" in printed
    assert (ckpt / "query0" / "run.json").exists()
    streamed, _ = io.load_shared(tmp_path / "a" / "shared_update.msgpack")
    # The same users stacked in memory give the same bits.
    case = construct_users(load_case(args[0], args[1:]), jax.random.key(0))
    assert isinstance(case.data, fu.UserData) and case.data.inputs.ndim == 5
    memory, _ = fu.aggregate(case.model, case.payload, case.data, case.user_cfg, jax.random.fold_in(jax.random.key(0), 0),
                             users_state=case.user_state, loss=case.loss)
    for a, b in zip(jax.tree_util.tree_leaves(streamed.gradients), jax.tree_util.tree_leaves(memory.gradients)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same command with the same checkpoint folder resumes (here: from its end) to the same update.
    assert cli.main(["run", *args, "--out", str(tmp_path / "b"), "--checkpoint", str(ckpt)]) == 0
    resumed, _ = io.load_shared(tmp_path / "b" / "shared_update.msgpack")
    for a, b in zip(jax.tree_util.tree_leaves(streamed.gradients), jax.tree_util.tree_leaves(resumed.gradients)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another run (another seed) in the same folder is refused, in one line.
    out = tmp_path / "c"
    code = cli.main(["run", *args, "--seed", "1", "--out", str(out), "--checkpoint", str(ckpt)])
    _assert_one_line_error(code, capsys.readouterr(), "holds another run", out)
