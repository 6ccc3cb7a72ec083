"""Case files: composition, overrides, ``construct_users`` and its one-line errors."""

import os
import re

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

import fedjax_users as fu
from cifar_fakes import write_fake_cifar
from fedjax_users import losses
from fedjax_users.data import (
    DEFAULT_CASE,
    DataError,
    construct_users,
    load_case,
    load_examples,
    normalize,
    partition_indices,
)
from fedjax_users.data.cases import CONFIG_ROOT

CASES = os.path.join(CONFIG_ROOT, "case")
FAST = ["model=linear"]  # the cheapest model, where the model is not what a test is about
SMALL_BN = ["data=synthetic", "data.shape=[3,9,9]", "data.size=200", "model=ConvNet"]


def case(name=None, *overrides):
    return load_case(None if name is None else os.path.join(CASES, f"{name}.yaml"), list(overrides))


# ---------------------------------------------------------------------------------------------
# load_case


def test_default_case_composes_digits_local_updates():
    cfg = load_case()
    assert cfg.data.name == "digits" and cfg.model == "ConvNet"
    assert cfg.user == OmegaConf.merge(OmegaConf.load(os.path.join(CONFIG_ROOT, "user", "local_updates.yaml")))
    assert cfg.server.provide_public_buffers is True
    assert "defaults" not in cfg
    assert cfg == load_case(DEFAULT_CASE)


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(CASES) if f.endswith(".yaml")))
def test_every_bundled_case_loads_with_a_valid_user_config(name):
    cfg = case(name)
    fu.UserConfig.from_dict(OmegaConf.to_container(cfg.user))
    assert {"data", "user", "model", "server"} <= set(cfg)


def test_case_keys_override_the_groups():
    assert case("cifar10_single_image").user.provide_labels is True
    multi = case("digits_multiuser").user
    assert list(multi.user_range) == [0, 4] and multi.num_data_points == 8 and multi.provide_labels is False


def test_overrides_keys_groups_and_additions():
    cfg = load_case(None, ["user.num_local_updates=8", "data.partition=random", "+data.target_label=3"])
    assert cfg.user.num_local_updates == 8 and cfg.data.partition == "random" and cfg.data.target_label == 3
    cfg = load_case(None, ["data=synthetic", "user=local_gradient", "user.num_data_points=2"])
    assert cfg.data.name == "synthetic" and cfg.user.user_type == "local_gradient" and cfg.user.num_data_points == 2
    assert list(load_case(None, ["user.user_idx=null", "data.shape=[3,16,16]"]).data.shape) == [3, 16, 16]


def test_self_first_lets_the_groups_win(tmp_path):
    (tmp_path / "case.yaml").write_text(
        "defaults:\n  - _self_\n  - data: digits\n  - user: local_gradient\nmodel: linear\n"
        "data:\n  partition: random\nuser:\n  num_data_points: 3\n"
    )
    cfg = load_case(tmp_path / "case.yaml")
    assert cfg.data.partition == "balanced" and cfg.user.num_data_points == 1 and cfg.model == "linear"


def test_case_outside_the_repo_finds_bundled_groups_and_its_own(tmp_path):
    (tmp_path / "cases").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("name: synthetic\nsize: 7\n")
    (tmp_path / "cases" / "c.yaml").write_text("defaults:\n  - data: mine\n  - user: local_gradient\nmodel: linear\n")
    cfg = load_case(tmp_path / "cases" / "c.yaml")
    assert cfg.data.size == 7 and cfg.user.user_type == "local_gradient"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["user.bogus=1"], r"override key 'user.bogus' is not in the case.* \(use \+user.bogus"),
        (["model"], "override 'model' is not of the form key=value"),
        (["data=nope"], "no data config named 'nope'"),
        (["=3"], "has no key"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(DataError, match=message):
        load_case(None, overrides)


def test_bad_case_files(tmp_path):
    with pytest.raises(DataError, match=f"config file not found: {tmp_path}/none.yaml"):
        load_case(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(DataError, match="must hold a mapping"):
        load_case(tmp_path / "list.yaml")
    (tmp_path / "group.yaml").write_text("defaults:\n  - server: honest\n")
    with pytest.raises(DataError, match="no server config named 'honest'.*options: honest-but-curious"):
        load_case(tmp_path / "group.yaml")
    (tmp_path / "bare.yaml").write_text("model: linear\n")
    with pytest.raises(DataError, match="no 'data' entry in its defaults"):
        load_case(tmp_path / "bare.yaml", ["data=digits"])


# ---------------------------------------------------------------------------------------------
# construct_users


def test_default_user_gets_its_partition_prefix_normalised():
    cfg = load_case(None, FAST)
    users = construct_users(cfg)
    examples = load_examples(cfg.data)
    indices = partition_indices(examples.labels, 10, "balanced", 0, 10)[:4]
    images, labels = examples.take(indices)
    np.testing.assert_array_equal(users.data.inputs, normalize(images, cfg.data.mean, cfg.data.std))
    np.testing.assert_array_equal(users.data.labels, labels)
    assert users.data.inputs.shape == (4, 32, 32, 3) and users.data.data_key == "inputs"
    assert users.user_indices == (0,) and users.user_cfg.user_type == "local_update"
    assert users.loss is losses.softmax_cross_entropy and users.data_cfg.name == "digits"
    assert users.payload.batch_stats == {}  # the linear model has no buffers: an empty set is sent


def test_payload_is_the_models_initialisation_seeded_by_the_key():
    cfg = load_case(None, FAST)
    model = construct_users(cfg).model
    a, b, c = (construct_users(cfg, jax.random.key(s)).payload.params for s in (5, 5, 6))
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    assert jax.tree_util.tree_map(np.shape, a) == jax.tree_util.tree_map(lambda s: s.shape, shapes["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["1"]["kernel"], c["1"]["kernel"])


def test_no_normalisation_leaves_unit_images():
    users = construct_users(load_case(None, FAST + ["data.normalize=False"]))
    assert float(users.data.inputs.min()) >= 0.0 and float(users.data.inputs.max()) <= 1.0


@pytest.mark.parametrize("provide", [True, False])
def test_server_buffers_follow_the_case(provide):
    users = construct_users(load_case(None, SMALL_BN + [f"server.provide_public_buffers={provide}"]))
    if provide:
        stats = users.payload.batch_stats
        assert set(stats) == {f"bn{i}" for i in range(8)}
        np.testing.assert_array_equal(stats["bn0"]["var"], np.ones(64, np.float32))
    else:
        assert users.payload.batch_stats is None


def test_multiuser_data_is_the_users_stacked():
    cfg = case("digits_multiuser", *FAST, "user.user_range=[2,5]")
    users = construct_users(cfg)
    assert users.user_indices == (2, 3, 4)
    assert users.data.inputs.shape == (3, 8, 32, 32, 3) and users.data.labels.shape == (3, 8)
    single = construct_users(load_case(None, FAST + ["user.user_idx=3", "user.num_data_points=8"]))
    np.testing.assert_array_equal(users.data.inputs[1], single.data.inputs)
    np.testing.assert_array_equal(users.data.labels[1], single.data.labels)


def test_text_case_tokens_are_their_own_labels():
    users = construct_users(case("text_random_tokens", *FAST))
    assert users.data.inputs.shape == (2, 32) and jax.numpy.issubdtype(users.data.inputs.dtype, jax.numpy.integer)
    assert users.data.data_key == "input_ids"
    np.testing.assert_array_equal(users.data.inputs, users.data.labels)
    assert users.loss is losses.causal_lm_loss
    logits = users.model.apply({"params": users.payload.params}, users.data.inputs)
    assert logits.shape == (2, 32, 1000)


def test_unset_user_index_is_drawn_from_the_key():
    cfg = load_case(None, FAST + ["user.user_idx=null"])
    drawn = {construct_users(cfg, jax.random.key(s)).user_indices for s in range(6)}
    assert drawn <= {(u,) for u in range(10)} and len(drawn) > 1
    assert construct_users(cfg, jax.random.key(4)).user_indices == construct_users(cfg, jax.random.key(4)).user_indices


def test_random_full_users_draw_their_own_repeatable_subsets():
    cfg = case("digits_multiuser", *FAST, "data.partition=random-full")
    a, b = construct_users(cfg, jax.random.key(1)), construct_users(cfg, jax.random.key(1))
    np.testing.assert_array_equal(a.data.inputs, b.data.inputs)
    assert not np.array_equal(a.data.inputs[0], a.data.inputs[1])
    assert not np.array_equal(a.data.inputs, construct_users(cfg, jax.random.key(2)).data.inputs)


def test_cifar_case_reads_the_folder(tmp_path):
    contents = write_fake_cifar(str(tmp_path), "CIFAR10", per_file=30)
    users = construct_users(
        case("cifar10_single_image", *FAST, f"data.path={tmp_path}", "data.partition=none", "user.num_data_points=2")
    )
    np.testing.assert_array_equal(users.data.labels, contents["test_batch"][1][:2])
    assert users.user_cfg.provide_labels is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.name=MNIST"], "unknown dataset 'MNIST'"),
        (["model=resnet9000"], "unknown vision model 'resnet9000'"),
        (["data.partition=bogus"], "unknown partition 'bogus'"),
        (["user.user_idx=10"], "user index 10 is outside the dataset's 10 clients"),
        (["data.partition=unique-class", "data.default_clients=20", "user.user_idx=15"],
         r"user 15 has no data under partition 'unique-class' \(500 examples, 20 clients\)"),
        (["user.num_data_points=60"],
         "user 0 has 50 examples under partition 'balanced', fewer than the 60 of user.num_data_points"),
        (["data.task=masked-lm"], "data.task 'masked-lm' is a text task; dataset 'digits' is not text"),
        (["data.task=summarization"], "unknown data.task 'summarization'"),
        (["data.classes=100"], "dataset 'digits' has 10 classes, the data config declares 100"),
        (["data.shape=[3,16,16]"], r"data.shape asks for \[3, 16, 16\]"),
    ],
)
def test_construct_users_errors(overrides, message):
    with pytest.raises(DataError, match=message) as info:
        construct_users(load_case(None, FAST + overrides))
    assert "\n" not in str(info.value)


def test_missing_data_folder_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"CIFAR10 data folder not found: {tmp_path}/cifar-10-batches-py"):
        construct_users(case("cifar10_single_image", *FAST, f"data.path={tmp_path}"))


def test_multiuser_past_the_clients_is_an_error():
    with pytest.raises(DataError, match="user index 10 is outside"):
        construct_users(case("digits_multiuser", *FAST, "user.user_range=[8,12]"))


# ---------------------------------------------------------------------------------------------
# The users run in the core functions as built


def test_constructed_users_run_in_the_core():
    users = construct_users(load_case(None, FAST))
    shared, true_data, _ = fu.local_update(
        users.model, users.payload, users.data, users.user_cfg, jax.random.key(0), loss=users.loss
    )
    assert jax.tree_util.tree_structure(shared.gradients) == jax.tree_util.tree_structure(users.payload.params)
    np.testing.assert_array_equal(true_data.labels, users.data.labels)

    silo = construct_users(case("digits_multiuser", *FAST))
    shared, _ = fu.aggregate(silo.model, silo.payload, silo.data, silo.user_cfg, jax.random.key(0), loss=silo.loss)
    assert shared.metadata.num_users == 4


def test_a_case_anywhere_finds_the_bundled_impl_and_server(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "defaults:\n  - data: digits\n  - impl: default\n  - server: honest-but-curious\n  - user: local_gradient\n"
        "model: linear\nserver:\n  num_queries: 2\n"
    )
    cfg = load_case(tmp_path / "c.yaml", ["impl.dtype=double", "server.weights=/w.pth"])
    assert cfg.impl.dtype == "double" and cfg.server.name == "honest_but_curious"
    assert cfg.server.num_queries == 2 and cfg.server.weights == "/w.pth"


def test_group_files_have_their_own_defaults_beside_them(tmp_path):
    (tmp_path / "data" / "db").mkdir(parents=True)
    (tmp_path / "data" / "db" / "none.yaml").write_text("name: mine\n")
    (tmp_path / "data" / "d.yaml").write_text("name: synthetic\nsize: 7\ndefaults:\n  - db: none\n")
    (tmp_path / "c.yaml").write_text("defaults:\n  - data: d\n  - user: local_gradient\nmodel: linear\n")
    cfg = load_case(tmp_path / "c.yaml")
    assert cfg.data.db.name == "mine" and cfg.data.size == 7 and "defaults" not in cfg.data


@pytest.mark.parametrize("override, suggestion", [
    ("user.num_data_point=4", "did you mean 'user.num_data_points'"),
    ("dat.name=synthetic", "did you mean 'data.name'"),
    ("data.name=synthtic", "did you mean 'synthetic'"),
])
def test_a_mistyped_key_or_dataset_gets_a_suggestion(override, suggestion):
    with pytest.raises(DataError, match=re.escape(suggestion)):
        construct_users(load_case(None, FAST + [override]), jax.random.key(0))
