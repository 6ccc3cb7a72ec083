"""breaching 0.1.2's own case files, unchanged, through ``fedjax-users run`` on tiny datasets in
their users' layouts (CIFAR python batches, an ImageNet folder, a TinyImageNet folder)."""

import os

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from cifar_fakes import write_fake_cifar
from fedjax_users import cli, io
from fedjax_users.data import DataError, construct_users, load_case, load_examples, partition_indices
from fedjax_users.data.images import decode_image, parse_transforms
from fedjax_users.progress import Progress
from image_fakes import write_fake_imagenet, write_fake_tiny_imagenet, write_jpeg

def breaching_case(name):
    from parity.reference import config_dir

    return os.path.join(config_dir(), "case", f"{name}.yaml")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One folder per layout, shared by the module's tests (writing 2,000 JPEGs once)."""
    root = tmp_path_factory.mktemp("datasets")
    cifar = root / "cifar"
    write_fake_cifar(str(cifar), "CIFAR10", per_file=20)
    write_fake_cifar(str(cifar), "CIFAR100", per_file=200)
    write_fake_imagenet(str(root / "imagenet"), num_classes=1000, per_class=2)
    write_fake_tiny_imagenet(str(root / "tiny"))
    return {"cifar": str(cifar), "imagenet": str(root / "imagenet"), "tiny": str(root / "tiny")}


SMALL_BN = ["data=synthetic", "data.shape=[3,9,9]", "data.size=200", "data.default_clients=1", "model=ConvNet"]
SHRINK = ["server.pretrained=False", "user.num_data_points=1", "data.default_clients=1"]
# Every vision case breaching 0.1.2 ships: (case, dataset folder, overrides that only shrink it).
VISION_CASES = [
    pytest.param("0_sanity_check", "imagenet", SHRINK, marks=pytest.mark.slow),
    pytest.param("1_single_image_small", "cifar", SHRINK, marks=pytest.mark.slow),
    pytest.param("2_single_imagenet", "imagenet", SHRINK, marks=pytest.mark.slow),
    pytest.param("4_fedavg_small_scale", "imagenet", SHRINK[:1] + ["user.num_data_points=2",
                 "user.num_local_updates=2", "data.default_clients=1"], marks=pytest.mark.slow),
    pytest.param("5_small_batch_imagenet", "imagenet", SHRINK, marks=pytest.mark.slow),
    pytest.param("6_large_batch_cifar", "cifar", SHRINK, marks=pytest.mark.slow),
    pytest.param("8_industry_scale_fl", "imagenet", SHRINK[:2] + ["user.user_range=[0,2]", "data.default_clients=2",
                 "user.num_data_per_local_update_step=1"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, folder, shrink", VISION_CASES)
def test_every_vision_case_file_runs_unchanged(name, folder, shrink, datasets, tmp_path, capsys):
    out = tmp_path / "u.msgpack"
    code = cli.main(["run", breaching_case(name), f"data.path={datasets[folder]}", *shrink, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    cfg = load_case(breaching_case(name))
    assert f"model       {cfg.model}, " in captured.out
    assert f"data        {cfg.data.name}, " in captured.out
    assert "not applicable impl.non_blocking" in captured.out and "impl.benchmark" in captured.out
    shared, config = io.load_shared(out)
    assert config["name"] == cfg.name and config["data"]["name"] == cfg.data.name
    leaves = jax.tree_util.tree_leaves(shared.gradients)
    assert leaves and all(np.isfinite(leaf).all() for leaf in leaves)
    assert any(np.abs(leaf).max() > 0 for leaf in leaves)


@pytest.mark.parametrize("name", ["10_causal_lang_training", "9_bert_training"])
def test_text_cases_offline_say_what_is_missing(name, tmp_path, capsys):
    code = cli.main(["run", breaching_case(name), f"data.path={tmp_path}", "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "nothing is downloaded" in err and str(tmp_path) in err and "data=random_tokens" in err
    assert ("gpt2" if name.startswith("10") else "bert-base-uncased") in err


@pytest.mark.slow
def test_causal_text_case_runs_on_random_tokens(tmp_path, capsys):
    out = tmp_path / "u.msgpack"
    code = cli.main(["run", breaching_case("10_causal_lang_training"), "data=random_tokens", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "model       transformer3, " in captured.out and "data        random-tokens, " in captured.out
    shared, config = io.load_shared(out)
    # The case's own data keys still win over the data config's (its _self_ comes last).
    assert config["data"]["vocab_size"] == 50257 and config["data"]["task"] == "causal-lm"


def test_bert_case_on_random_tokens_names_what_is_missing(tmp_path, capsys, monkeypatch):
    """breaching's server is pretrained by default: bert-base-uncased's weights, which nothing downloads here."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code = cli.main(["run", breaching_case("9_bert_training"), "data=random_tokens", "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'bert-base-uncased'" in err and "server.pretrained=False" in err


def test_synthetic_data_takes_the_case_data_shape_and_model_table():
    cfg = load_case(breaching_case("2_single_imagenet"), ["data=synthetic"])
    assert cfg.data.name == "synthetic" and cfg.data.like == "ImageNetAnimals"
    assert list(cfg.data.shape) == [3, 224, 224] and cfg.data.classes == 397 and cfg.data.default_clients == 50
    examples = load_examples(cfg.data)
    assert len(examples) == 1_281_167  # drawn when taken: only the labels exist
    images, _ = examples.take(np.array([5, 7]))
    assert images.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(examples.take(np.array([7]))[0][0], images[1])


# ---------------------------------------------------------------------------------------------
# Layouts, transforms, partitions


def test_imagenet_listing_is_torchvision_order_and_animals_the_first_397(datasets):
    cfg = load_case(breaching_case("0_sanity_check"), [f"data.path={datasets['imagenet']}"]).data
    full = load_examples(cfg)
    assert full.num_classes == 1000 and len(full) == 2000
    assert full.labels.tolist() == [c for c in range(1000) for _ in range(2)]
    assert os.path.basename(str(full.stored[3])) == "n00000001_1.JPEG"
    animals = load_examples(OmegaConf.merge(cfg, {"name": "ImageNetAnimals", "classes": 397}))
    assert animals.num_classes == 397 and len(animals) == 794
    np.testing.assert_array_equal(animals.stored, full.stored[:794])


def test_imagenet_partition_is_the_reference_split_over_the_same_labels(datasets):
    from parity.reference import datasets_vision_module

    cfg = load_case(breaching_case("2_single_imagenet"), [f"data.path={datasets['imagenet']}", "data.default_clients=2"]).data
    examples = load_examples(cfg)
    reference = datasets_vision_module()

    class Listed:
        classes = list(range(examples.num_classes))
        lookup = dict(enumerate(examples.labels.tolist()))

        def __len__(self):
            return len(examples)

    for user in (0, 1):
        cfg_ref = OmegaConf.create({"partition": "balanced", "default_clients": 2})
        want = list(reference._split_dataset_vision(Listed(), cfg_ref, user).indices)
        got = partition_indices(examples.labels, examples.num_classes, "balanced", user, 2)
        assert got.tolist() == want


def test_validation_transforms_are_shorter_side_resize_then_centre_crop(tmp_path):
    from PIL import Image

    file = tmp_path / "a.JPEG"
    write_jpeg(file, 300, 400, seed=1)
    out = decode_image(str(file), parse_transforms({"Resize": 256, "CenterCrop": 224}))
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    with Image.open(file) as image:
        resized = image.convert("RGB").resize((341, 256), Image.BILINEAR)  # int(256 * 400 / 300) = 341
    left, top = int(round((341 - 224) / 2.0)), int(round((256 - 224) / 2.0))
    want = np.asarray(resized, np.float32)[top:top + 224, left:left + 224] / np.float32(255)
    np.testing.assert_array_equal(out, want)
    # A crop larger than the image pads with zeros around it, as torchvision's CenterCrop.
    small = decode_image(str(file), parse_transforms({"CenterCrop": [302, 400]}))
    assert small.shape == (302, 400, 3) and small[0].max() == 0 and small[-1].max() == 0


def test_decoding_reads_only_the_chosen_files(datasets, monkeypatch):
    from fedjax_users.data import images

    # A small crop and the linear model: the test is about which files are opened.
    cfg = load_case(breaching_case("2_single_imagenet"), [f"data.path={datasets['imagenet']}", *SHRINK,
                                                         "user.num_data_points=3", "model=linear",
                                                         "data.augmentations_val.CenterCrop=8", "data.shape=[3,8,8]"])
    opened = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda f, t: opened.append(f) or real(f, t))
    users = construct_users(cfg)
    assert users.data.inputs.shape == (3, 8, 8, 3) and len(opened) == 3


def test_tiny_imagenet_layout_both_splits(datasets):
    cfg = load_case(breaching_case("1_single_image_small"), ["data=TinyImageNet", f"data.path={datasets['tiny']}"]).data
    val = load_examples(cfg)
    assert val.num_classes == 200 and len(val) == 200
    # Sorted file names (val_0, val_1, val_10, ...) with the annotated classes.
    assert os.path.basename(str(val.stored[2])) == "val_10.JPEG" and val.labels[2] == 10
    train = load_examples(OmegaConf.merge(cfg, {"examples_from_split": "training"}))
    assert train.labels.tolist() == list(range(200))
    assert train.take(np.array([0]))[0].shape == (1, 64, 64, 3)


def test_a_case_runs_on_tiny_imagenet(datasets, tmp_path, capsys):
    code = cli.main(["run", breaching_case("1_single_image_small"), "data=TinyImageNet", f"data.path={datasets['tiny']}",
                     "data.default_clients=1", "model=linear", "--out", str(tmp_path / "u")])
    assert code == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def _one_line(code, err, message):
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_wrong_layout_unreadable_jpeg_and_unknown_option(datasets, tmp_path, capsys):
    case = breaching_case("2_single_imagenet")
    out = str(tmp_path / "u")
    code = cli.main(["run", case, f"data.path={datasets['cifar']}", *SHRINK, "--out", out])
    _one_line(code, capsys.readouterr().err, "an ImageNet folder is <path>/train|val/<wnid>/<image>.JPEG")

    broken = tmp_path / "broken"
    write_fake_imagenet(str(broken), num_classes=397, per_class=1)
    (broken / "val" / "n00000000" / "n00000000_0.JPEG").write_bytes(b"not a jpeg at all")
    code = cli.main(["run", case, f"data.path={broken}", *SHRINK, "--out", out])
    _one_line(code, capsys.readouterr().err, "cannot decode image ")

    code = cli.main(["run", case, "data=ImageNetPets", "--out", out])
    _one_line(code, capsys.readouterr().err, "no data config named 'ImageNetPets'")
    code = cli.main(["run", case, "impl.colour=blue", "--out", out])
    _one_line(code, capsys.readouterr().err, "not in the case")
    code = cli.main(["run", case, "+impl.colour=blue", "--out", out])
    _one_line(code, capsys.readouterr().err, "unknown case key 'impl.colour'")


@pytest.mark.slow
def test_pretrained_weights_from_a_local_torchvision_file(datasets, tmp_path, capsys):
    import torch

    from parity.reference import torchvision_model

    torch.manual_seed(0)
    state = torchvision_model("resnet18").state_dict()
    weights = tmp_path / "resnet18.pth"
    torch.save(state, weights)
    case = breaching_case("2_single_imagenet")
    base = [f"data.path={datasets['imagenet']}", "user.num_data_points=1", "data.default_clients=1"]

    code = cli.main(["run", case, *base, "--out", str(tmp_path / "u")])
    _one_line(code, capsys.readouterr().err, "pass server.weights=<path")

    users = construct_users(load_case(case, base + [f"server.weights={weights}"]))
    assert users.pretrained
    np.testing.assert_array_equal(users.payload.params["fc"]["kernel"], state["fc.weight"][:397].numpy().T)
    np.testing.assert_array_equal(users.payload.batch_stats["bn1"]["mean"], state["bn1.running_mean"].numpy())

    other = tmp_path / "resnet34.pth"
    torch.save(torchvision_model("resnet34").state_dict(), other)
    code = cli.main(["run", case, *base, f"server.weights={other}", "--out", str(tmp_path / "u")])
    _one_line(code, capsys.readouterr().err, f"weights file {other} does not fit model ResNet18")


@pytest.mark.slow  # several model initialisations: over 20 s on a busy 2-core machine
def test_model_states_give_each_query_its_payload(datasets):
    base = [*SMALL_BN, "user.num_data_points=2", "server.num_queries=2", "num_queries=2", "model=ConvNetSmall"]
    case = breaching_case("1_single_image_small")
    default = construct_users(load_case(case, base))
    assert len(default.queries) == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, default.queries[0].payload.params,
                           default.queries[1].payload.params)
    untrained = construct_users(load_case(case, base + ["server.model_state=untrained"]))
    assert not np.array_equal(untrained.queries[0].payload.params["conv0"]["kernel"],
                              untrained.queries[1].payload.params["conv0"]["kernel"])
    orthogonal = construct_users(load_case(case, base + ["server.model_state=orthogonal"]))
    kernel = np.asarray(orthogonal.payload.params["conv0"]["kernel"])
    # torch's (out, in * k * k) matrix has orthonormal rows, or columns when it has more rows.
    matrix = kernel.transpose(3, 2, 0, 1).reshape(kernel.shape[3], -1)
    small = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    np.testing.assert_allclose(small, np.eye(len(small)), atol=1e-5)
    with pytest.raises(DataError, match="server.model_state='fishing'"):
        construct_users(load_case(case, base + ["server.model_state=fishing"]))
    with pytest.raises(DataError, match="num_queries=3 but server.num_queries=2"):
        construct_users(load_case(case, base + ["num_queries=3"]))


@pytest.mark.slow
def test_users_keep_their_own_statistics_from_query_to_query(datasets):
    cfg = load_case(breaching_case("1_single_image_small"), [
        *SMALL_BN, "user.num_data_points=2", "server.num_queries=3", "num_queries=3",
        "server.provide_public_buffers=False", "user.provide_buffers=True"])
    users = construct_users(cfg)
    with Progress(quiet=True) as progress:
        results, _, _ = cli._compute(users, jax.random.key(0), progress)
    tracked = [int(jax.tree_util.tree_leaves(r.batch_stats["bn0"]["num_batches_tracked"])[0]) for r in results]
    assert tracked == [1, 2, 3]


def test_linearized_model_state_compounds_and_refuses_convolutions_without_bias():
    from fedjax_users.data.server import query_variables

    built = {
        "params": {"bn": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)},
                   "conv": {"kernel": np.zeros((3, 3, 1, 2), np.float32), "bias": np.ones(2, np.float32)},
                   "fc": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}},
        "batch_stats": {"bn": {"mean": np.array([1.0, 2.0], np.float32), "var": np.array([3.0, 4.0], np.float32)}},
    }
    first = query_variables("linearized", built, None, None, jax.random.key(0), 0)
    second = query_variables("linearized", built, first, None, jax.random.key(0), 1)
    np.testing.assert_array_equal(first["params"]["bn"]["scale"], [3.0, 4.0])
    np.testing.assert_array_equal(first["params"]["bn"]["bias"], [11.0, 12.0])
    np.testing.assert_array_equal(first["params"]["conv"]["bias"], [11.0, 11.0])
    np.testing.assert_array_equal(second["params"]["conv"]["bias"], [21.0, 21.0])  # + 10 at every query
    np.testing.assert_array_equal(second["params"]["fc"]["bias"], [1.0, 1.0])  # not a convolution
    no_bias = {**built, "params": {**built["params"], "conv": {"kernel": built["params"]["conv"]["kernel"]}}}
    with pytest.raises(DataError, match="convolution conv has no bias"):
        query_variables("linearized", no_bias, None, None, jax.random.key(0), 0)
