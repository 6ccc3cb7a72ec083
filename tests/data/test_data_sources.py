"""Dataset sources: CIFAR folders (safe unpickling), embedded digits, generated data, normalisation."""

import os
import pickle

import numpy as np
import pytest
from omegaconf import OmegaConf

from cifar_fakes import dump_array_pickle, write_fake_cifar
from fedjax_users.data import DataError, load_examples, normalize
from fedjax_users.data import sources


@pytest.fixture
def fake_cifar10(tmp_path):
    return tmp_path, write_fake_cifar(str(tmp_path), "CIFAR10")


def cifar_cfg(path, name="CIFAR10", split="training", **extra):
    return OmegaConf.create(dict(name=name, path=str(path), examples_from_split=split, **extra))


@pytest.mark.parametrize("style", ["py2", "protocol2", "protocol4", "protocol5"])
def test_cifar10_reads_every_pickle_style(tmp_path, style):
    contents = write_fake_cifar(str(tmp_path), "CIFAR10", per_file=4, style=style)
    examples = sources.read_cifar(str(tmp_path), "CIFAR10", "validation")
    data, labels = contents["test_batch"]
    np.testing.assert_array_equal(examples.labels, labels)
    np.testing.assert_array_equal(examples.stored, data)


def test_cifar10_training_is_the_five_batches_in_order_decoded_nhwc(fake_cifar10):
    root, contents = fake_cifar10
    examples = load_examples(cifar_cfg(root))
    batches = [contents[f"data_batch_{i}"] for i in range(1, 6)]
    assert len(examples) == 100 and examples.num_classes == 10
    np.testing.assert_array_equal(examples.labels, np.concatenate([labels for _, labels in batches]))
    inputs, labels = examples.take(np.array([23, 0]))
    assert inputs.shape == (2, 32, 32, 3) and inputs.dtype == np.float32
    np.testing.assert_array_equal(labels, examples.labels[[23, 0]])
    # Example 23 is row 3 of batch 2; pixel (h, w, c) sits at c * 1024 + h * 32 + w in the row.
    row = batches[1][0][3]
    for h, w, c in [(0, 0, 0), (5, 17, 1), (31, 2, 2)]:
        assert inputs[0, h, w, c] == np.float32(row[c * 1024 + h * 32 + w]) / np.float32(255)


def test_cifar100_uses_fine_labels_and_its_own_files(tmp_path):
    contents = write_fake_cifar(str(tmp_path), "CIFAR100", per_file=6, style="protocol4")
    examples = sources.read_cifar(str(tmp_path), "CIFAR100", "training")
    np.testing.assert_array_equal(examples.labels, contents["train"][1])
    assert examples.num_classes == 100


def test_cifar_path_may_be_the_batches_folder_itself(fake_cifar10):
    root, contents = fake_cifar10
    examples = sources.read_cifar(os.path.join(root, "cifar-10-batches-py"), "CIFAR10", "validation")
    np.testing.assert_array_equal(examples.labels, contents["test_batch"][1])


def test_missing_cifar_folder_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"CIFAR10 data folder not found: {tmp_path}/cifar-10-batches-py"):
        load_examples(cifar_cfg(tmp_path))


def test_missing_batch_file_names_it(fake_cifar10):
    root, _ = fake_cifar10
    os.remove(os.path.join(root, "cifar-10-batches-py", "data_batch_3"))
    with pytest.raises(DataError, match="missing data file .*data_batch_3"):
        load_examples(cifar_cfg(root))


@pytest.mark.parametrize(
    "entry, message",
    [
        (b"not a pickle at all", "malformed data file"),
        ({"labels": [1]}, "expected a dict with 'data' and 'labels'"),
        ({"data": np.zeros((2, 10), np.uint8), "labels": [1, 2]}, "'data' must be uint8"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "must hold 2 integer labels"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}, "labels outside 0..9"),
    ],
)
def test_malformed_cifar_batches(fake_cifar10, entry, message):
    root, _ = fake_cifar10
    file = os.path.join(root, "cifar-10-batches-py", "test_batch")
    if isinstance(entry, bytes):
        with open(file, "wb") as handle:
            handle.write(entry)
    else:
        dump_array_pickle(entry, file, "protocol4")
    with pytest.raises(DataError, match=message):
        load_examples(cifar_cfg(root, split="validation"))


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickled_code_is_refused_not_run(tmp_path):
    target = str(tmp_path / "pwned")
    file = str(tmp_path / "batch")
    with open(file, "wb") as handle:
        pickle.dump({"data": _Exploit(target), "labels": []}, handle, protocol=2)
    with pytest.raises(DataError, match=r"malformed data file .*refusing to load posix\.mkdir"):
        sources.read_array_pickle(file)
    assert not os.path.exists(target)


def test_embedded_digits_decoding_and_splits():
    training, validation = sources.embedded_digits("training"), sources.embedded_digits("validation")
    assert (len(training), len(validation)) == (1297, 500)
    assert os.path.getsize(sources.EMBEDDED_DIGITS) < 1_000_000
    with np.load(sources.EMBEDDED_DIGITS) as archive:
        raw, raw_labels = archive["images"], archive["labels"]
    np.testing.assert_array_equal(validation.labels, raw_labels[-500:])
    np.testing.assert_array_equal(training.labels, raw_labels[:-500])
    images, _ = validation.take(np.arange(3))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
    # Pixel (i, j) of the 8x8 digit fills the 4x4 block at (4i, 4j), identical in all channels.
    want = np.kron(raw[-500:][:3] / 16.0, np.ones((4, 4)))
    for c in range(3):
        np.testing.assert_array_equal(images[..., c], want.astype(np.float32))
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9


def test_synthetic_images_are_seeded_nhwc():
    cfg = OmegaConf.create(dict(name="synthetic", size=12, shape=[2, 5, 7], classes=4, seed=3))
    a, b = load_examples(cfg), load_examples(cfg)
    every = np.arange(12)
    images = a.take(every)[0]
    np.testing.assert_array_equal(images, b.take(every)[0])
    assert images.shape == (12, 5, 7, 2) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() < 1
    np.testing.assert_array_equal(a.take(np.array([9, 3]))[0], images[[9, 3]])  # each image its own draw
    assert set(a.labels.tolist()) <= set(range(4)) and a.num_classes == 4
    other = load_examples(OmegaConf.merge(cfg, {"seed": 4}))
    assert not np.array_equal(images, other.take(every)[0])
    training = load_examples(OmegaConf.merge(cfg, {"examples_from_split": "training"}))
    assert not np.array_equal(images, training.take(every)[0])


def test_random_tokens_label_is_the_input():
    cfg = OmegaConf.create(dict(name="random-tokens", size=9, shape=[6], vocab_size=50, seed=0))
    examples = load_examples(cfg)
    inputs, labels = examples.take(np.array([4, 2]))
    assert inputs.shape == (2, 6) and np.issubdtype(inputs.dtype, np.integer)
    np.testing.assert_array_equal(inputs, labels)
    assert examples.stored.max() < 50 and examples.num_classes == 50


def test_size_cuts_a_split_before_partitioning():
    cfg = OmegaConf.create(dict(name="digits", size=20))
    examples = load_examples(cfg)
    assert len(examples) == 20
    np.testing.assert_array_equal(examples.labels, sources.embedded_digits("validation").labels[:20])


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(name="MNIST"), "unknown dataset 'MNIST'"),
        (dict(name="digits", examples_from_split="test"), "unknown split 'test'"),
        (dict(name="synthetic", size=4, shape=[32, 32], classes=2), r"data.shape must be \[channels, height, width\]"),
        (dict(name="random-tokens", size=0, shape=[4], vocab_size=3), "data.size must be a positive integer"),
    ],
)
def test_source_config_errors(cfg, message):
    with pytest.raises(DataError, match=message):
        load_examples(OmegaConf.create(cfg))


def test_normalize_matches_torchvision_arithmetic():
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
    mean, std = [0.4914672374725342, 0.4822617471218109, 0.4467701315879822], [0.247, 0.243, 0.261]
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    want = nchw.sub(torch.tensor(mean)[:, None, None]).div(torch.tensor(std)[:, None, None])
    np.testing.assert_array_equal(normalize(images, mean, std), want.numpy().transpose(0, 2, 3, 1))


def test_normalize_rejects_wrong_channel_count():
    with pytest.raises(DataError, match="one value per channel"):
        normalize(np.zeros((1, 2, 2, 3), np.float32), [0.5, 0.5], [0.2, 0.2])
