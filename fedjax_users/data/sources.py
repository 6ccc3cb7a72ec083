"""Offline dataset splits: CIFAR-10/100 folders, the embedded digits, synthetic images, random tokens.

Every source returns ``Examples``: the split in its stored form plus a decoder, so only the
examples a user holds are ever converted to model inputs. Images decode to float32 NHWC in
[0, 1] (torchvision's ``ToTensor`` scaling, before normalisation); tokens stay integer ids.

``load_examples(cfg_data)`` picks the source by ``cfg_data.name``:

* ``CIFAR10`` / ``CIFAR100``: the python-version folders ``cifar-10-batches-py`` /
  ``cifar-100-python`` under ``cfg_data.path``, read without running pickled code.
* ``digits``: 1,797 real 8x8 handwritten digits shipped in ``digits.npz`` beside this module (see the
  README there). Grey levels 0..16 are divided by 16, each pixel is repeated into a 4x4 block
  (nearest-neighbour upsampling, 8x8 -> 32x32) and the grey channel is copied into 3 channels, so
  CIFAR-size models run on them unchanged. ``validation`` is the last 500 images, ``training``
  the first 1,297 (scikit-learn's order; the set has no official split).
* ``ImageNet`` / ``ImageNetAnimals`` / ``TinyImageNet``: image folders in the layouts their
  users have (fedjax_users.data.images), decoded with Pillow and ``data.augmentations_val``.
* ``synthetic``: uniform [0, 1) images of ``cfg_data.shape`` (CHW, as breaching's configs) with
  uniform labels, ``cfg_data.size`` of them, seeded by ``cfg_data.seed``, drawn when taken.
* ``Birdsnap``: breaching's image folder (``birdsnap/images.txt``, fedjax_users.data.images).
* ``wikitext``: from a local copy only (fedjax_users.data.text); its users are its articles
  (``Examples.given``).
* ``shakespeare`` / ``stackoverflow``: TensorFlow Federated's sqlite files (fedjax_users.data.tff);
  its users are the files' clients. ``cola``: a local ``datasets`` cache (fedjax_users.data.glue);
  its users are the split's rows. These and wikitext take ``examples_from_split: test`` as well.
* ``random-tokens``: ``cfg_data.size`` sequences of ``cfg_data.shape[0]`` uniform token ids below
  ``cfg_data.vocab_size``, seeded; the labels are the ids themselves, as breaching's causal-LM
  text data (``labels = input_ids``). With ``data.task=masked-lm`` the ids are drawn below
  ``vocab_size - 1``, which is the mask token, and every batch a user takes is masked as
  breaching's collator masks it (fedjax_users.data.masking).

Example::

    >>> from omegaconf import OmegaConf
    >>> from fedjax_users.data.sources import load_examples
    >>> digits = load_examples(OmegaConf.create({"name": "digits", "examples_from_split": "training", "size": 10}))
    >>> inputs, labels = digits.take([0, 1])
    >>> len(digits), inputs.shape, labels.tolist()
    (10, (2, 32, 32, 3), [0, 1])
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib
import os
import pickle
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fedjax_users.data.errors import DataError
from fedjax_users.data.examples import Examples
from fedjax_users.data.images import (
    ANIMAL_CLASSES,
    ImageListing,
    image_decoder,
    list_birdsnap,
    list_imagenet,
    list_tiny_imagenet,
    parse_transforms,
)
from fedjax_users.data.masking import collate_fn, masked_lm
from fedjax_users.suggestions import did_you_mean

__all__ = [
    "CIFAR",
    "EMBEDDED_DIGITS",
    "SPLITS",
    "CifarLayout",
    "Examples",
    "embedded_digits",
    "load_examples",
    "normalize",
    "random_tokens",
    "read_array_pickle",
    "read_cifar",
    "split_index",
    "synthetic_images",
]

SPLITS = ("training", "validation")
# breaching hands examples_from_split through to these datasets' own files, which have a test split too.
WITH_TEST = ("training", "validation", "test")
SOURCE_SPLITS = {name: WITH_TEST for name in ("wikitext", "shakespeare", "stackoverflow", "cola")}
EMBEDDED_DIGITS = os.path.join(os.path.dirname(__file__), "digits.npz")
DIGITS_VALIDATION_SIZE = 500
DIGITS_UPSAMPLE = 4  # 8x8 -> 32x32


def _check_split(split: str, known: Sequence[str] = SPLITS) -> None:
    if split not in known:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(known)}")


def split_index(split: str) -> int:
    """A split's number in seeds, so that its draws (masks, synthetic data) differ from another split's.

    Args:
        split: ``training``, ``validation`` or ``test``.

    Returns:
        0, 1 or 2 (``training`` and ``validation`` keep the numbers they had before ``test`` was known).

    Example::

        >>> split_index("validation")
        1
    """
    _check_split(split, WITH_TEST)
    return WITH_TEST.index(split)


# ---------------------------------------------------------------------------------------------
# CIFAR


def _numpy_core(module: str) -> Any:
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{module}")


# What an array pickle may name: array and dtype reconstructors only. The original batches were
# written by numpy 1 under Python 2 (``numpy.core``); numpy 2 writes ``numpy._core`` (protocol 5
# via ``_frombuffer``); Python 3 protocol-2 pickles store bytes through ``_codecs.encode``.
# Anything else (``os.system`` and friends) is refused.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        (f"{package}.{module}", name): getattr(_numpy_core(module), name)
        for package in ("numpy.core", "numpy._core")
        for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_array_pickle(file: str) -> Any:
    """Load a pickle of dicts, lists and numpy arrays (e.g. a CIFAR batch) without running code.

    Only NumPy's array and dtype reconstructors may be named by the pickle; any other global
    (``os.system`` and friends) is refused.

    Args:
      file: the pickle (Python 2's, as CIFAR's batches, or Python 3's).

    Returns:
      What it holds.

    Raises:
      DataError: the file is missing, malformed, or names anything but arrays.

    Example::

        >>> import os, pickle, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with open(os.path.join(folder, "evil.pkl"), "wb") as handle:
        ...         pickle.dump(os.getcwd, handle)
        ...     read_array_pickle(os.path.join(folder, "evil.pkl"))
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: malformed data file .../evil.pkl: UnpicklingError: refusing to load ...
    """
    try:
        with open(file, "rb") as handle:
            # latin1 lets Python 2 byte strings (array buffers, dict keys) load as they were written.
            return _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"missing data file {file}") from None
    except Exception as err:  # an untrusted file can fail in any number of ways
        raise DataError(f"malformed data file {file}: {type(err).__name__}: {err}") from None


@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR python-version folder keeps each split and its labels.

    Attributes:
      folder: the folder's name (``cifar-10-batches-py``).
      files: split -> its batch files, in order.
      label_key: the batches' label entry (``labels`` or ``fine_labels``).
      num_classes: the classes.
    """

    folder: str
    files: Mapping[str, tuple[str, ...]]
    label_key: str
    num_classes: int


CIFAR = {
    "CIFAR10": CifarLayout(
        folder="cifar-10-batches-py",
        files={"training": tuple(f"data_batch_{i}" for i in range(1, 6)), "validation": ("test_batch",)},
        label_key="labels",
        num_classes=10,
    ),
    "CIFAR100": CifarLayout(
        folder="cifar-100-python",
        files={"training": ("train",), "validation": ("test",)},
        label_key="fine_labels",
        num_classes=100,
    ),
}
CIFAR_SHAPE = (3, 32, 32)  # stored channel-major, one row of 3072 bytes per image


def _cifar_batch(file: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    entry = read_array_pickle(file)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise DataError(f"malformed data file {file}: expected a dict with 'data' and {label_key!r}")
    data, labels = entry["data"], np.asarray(entry[label_key])
    row = int(np.prod(CIFAR_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        raise DataError(f"malformed data file {file}: 'data' must be uint8 [N, {row}]")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"malformed data file {file}: {label_key!r} must hold {len(data)} integer labels")
    return data, labels


def _unit_images_from_chw(stored: np.ndarray) -> np.ndarray:
    images = stored.reshape((-1,) + CIFAR_SHAPE).transpose(0, 2, 3, 1)
    # As torchvision's ToTensor: float32, then divide by 255.
    return images.astype(np.float32) / np.float32(255)


def _cifar_folder(path: str, name: str) -> str:
    """The batches folder of CIFAR ``name`` under ``path`` (or ``path`` itself if it is that folder)."""
    root = os.path.expanduser(path)
    folder = CIFAR[name].folder
    return root if os.path.basename(os.path.normpath(root)) == folder else os.path.join(root, folder)


def read_cifar(path: str, name: str, split: str) -> Examples:
    """CIFAR-10 or CIFAR-100 from its python-version folder, read without running pickled code.

    Args:
      path: ``data.path``: the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``, or
        that folder itself.
      name: ``"CIFAR10"`` or ``"CIFAR100"``.
      split: ``training`` (the data batches) or ``validation`` (the test batch).

    Returns:
      ``Examples`` of the stored rows; decoded to float32 ``[N, 32, 32, 3]`` in [0, 1].

    Raises:
      DataError: the folder or a batch missing or malformed, or labels outside the classes.

    Example::

        >>> import os, pickle, tempfile, numpy as np
        >>> with tempfile.TemporaryDirectory() as root:
        ...     os.makedirs(os.path.join(root, "cifar-10-batches-py"))
        ...     with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "wb") as handle:
        ...         pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 5]}, handle)
        ...     cifar = read_cifar(root, "CIFAR10", "validation")
        >>> inputs, labels = cifar.take([1])
        >>> inputs.shape, labels.tolist()
        ((1, 32, 32, 3), [5])
    """
    _check_split(split)
    layout = CIFAR[name]
    folder = _cifar_folder(path, name)
    if not os.path.isdir(folder):
        raise DataError(
            f"{name} data folder not found: {folder} (extract the python-version archive there; "
            f"nothing is downloaded)"
        )
    batches = [_cifar_batch(os.path.join(folder, file), layout.label_key) for file in layout.files[split]]
    labels = np.concatenate([labels for _, labels in batches]).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(f"malformed {name} data in {folder}: labels outside 0..{layout.num_classes - 1}")
    stored = np.concatenate([data for data, _ in batches])
    return Examples(stored=stored, labels=labels, num_classes=layout.num_classes, decode=_unit_images_from_chw)


# ---------------------------------------------------------------------------------------------
# Embedded digits


def _unit_images_from_digits(stored: np.ndarray) -> np.ndarray:
    grey = stored.astype(np.float32) / np.float32(16)
    grey = grey.repeat(DIGITS_UPSAMPLE, axis=1).repeat(DIGITS_UPSAMPLE, axis=2)
    return np.repeat(grey[..., None], 3, axis=-1)


def embedded_digits(split: str) -> Examples:
    """The shipped 8x8 handwritten digits as 32x32x3 images (decoding: see the module docstring).

    Args:
      split: ``validation`` (the last 500 images) or ``training`` (the first 1,297).

    Returns:
      ``Examples`` of the stored 8x8 grey levels; decoded to float32 ``[N, 32, 32, 3]`` in [0, 1].

    Example::

        >>> digits = embedded_digits("validation")
        >>> len(digits), digits.num_classes, digits.take([0])[0].shape
        (500, 10, (1, 32, 32, 3))
    """
    _check_split(split)
    with np.load(EMBEDDED_DIGITS) as archive:
        images, labels = archive["images"], archive["labels"].astype(np.int64)
    cut = len(labels) - DIGITS_VALIDATION_SIZE
    part = slice(cut, None) if split == "validation" else slice(None, cut)
    return Examples(stored=images[part], labels=labels[part], num_classes=10, decode=_unit_images_from_digits)


# ---------------------------------------------------------------------------------------------
# Generated data


def synthetic_images(size: int, shape: tuple[int, int, int], num_classes: int, seed) -> Examples:
    """Uniform [0, 1) images with uniform labels, each drawn when it is taken.

    Each image is drawn from its own seed (``[*seed, index]``) when it is taken, so an ImageNet-size
    split costs its labels only.

    Args:
      size: the number of images.
      shape: ``(channels, height, width)``, as breaching's configs give it.
      num_classes: labels are drawn below it.
      seed: an int or a sequence of ints (NumPy's seed).

    Returns:
      ``Examples`` whose stored rows are indices; decoded to float32 ``[N, height, width, channels]``.

    Example::

        >>> images = synthetic_images(4, (3, 8, 8), num_classes=10, seed=[0, 1])
        >>> inputs, labels = images.take([1])
        >>> inputs.shape, bool((inputs == images.take([1])[0]).all())  # the same draw every time
        ((1, 8, 8, 3), True)
    """
    channels, height, width = shape
    seed = list(np.atleast_1d(seed))
    labels = np.random.default_rng(seed).integers(0, num_classes, size=size, dtype=np.int64)

    def decode(indices: np.ndarray) -> np.ndarray:
        draws = [np.random.default_rng(seed + [int(i)]).random((height, width, channels), dtype=np.float32)
                 for i in indices]
        return np.stack(draws) if draws else np.zeros((0, height, width, channels), np.float32)

    return Examples(stored=np.arange(size, dtype=np.int64), labels=labels, num_classes=num_classes, decode=decode)


def random_tokens(size: int, seq_length: int, vocab_size: int, seed: int, collate=None) -> Examples:
    """Sequences of uniform token ids; labels are the ids (causal language modelling).

    Args:
      size: the number of sequences.
      seq_length: tokens per sequence.
      vocab_size: ids are drawn below it.
      seed: NumPy's seed.
      collate: ``Examples.collate`` (masked-lm masking), else ``None``.

    Returns:
      ``Examples`` of int32 ``[size, seq_length]`` ids, labels a copy of them.

    Example::

        >>> tokens = random_tokens(2, 5, vocab_size=10, seed=0)
        >>> tokens.stored.shape, bool((tokens.labels == tokens.stored).all()), tokens.num_classes
        ((2, 5), True, 10)
    """
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=(size, seq_length), dtype=np.int32)
    return Examples(stored=tokens, labels=tokens.copy(), num_classes=vocab_size, collate=collate)


def _random_tokens_masking(cfg_data, vocab_size: int) -> Callable:
    """The masked-lm collate of random tokens: mask token ``vocab_size - 1``, no other special token."""
    return collate_fn(masked_lm(cfg_data, mask_token_id=vocab_size - 1, num_tokens=vocab_size))


# ---------------------------------------------------------------------------------------------
# Dispatch on the data config


def _positive(cfg_data, key: str) -> int:
    value = cfg_data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"data.{key} must be a positive integer for dataset {cfg_data.name!r}, got {value!r}")
    return value


def _image_shape(cfg_data) -> tuple[int, int, int]:
    shape = tuple(cfg_data.get("shape") or ())
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise DataError(f"data.shape must be [channels, height, width], got {list(shape)}")
    return shape


def _load_synthetic(cfg_data, split: str) -> Examples:
    # Each split is its own draw, so training and validation examples differ.
    seed = [int(cfg_data.get("seed", 0)), SPLITS.index(split)]
    return synthetic_images(_positive(cfg_data, "size"), _image_shape(cfg_data), _positive(cfg_data, "classes"), seed)


def _load_random_tokens(cfg_data, split: str) -> Examples:
    shape = tuple(cfg_data.get("shape") or ())
    if len(shape) != 1:
        raise DataError(f"data.shape must be [sequence_length] for random-tokens, got {list(shape)}")
    seed = [int(cfg_data.get("seed", 0)), SPLITS.index(split)]
    size, vocab_size = _positive(cfg_data, "size"), _positive(cfg_data, "vocab_size")
    if cfg_data.get("task") != "masked-lm":
        return random_tokens(size, int(shape[0]), vocab_size, seed)
    if vocab_size < 2:
        raise DataError("masked-lm random-tokens need data.vocab_size >= 2 (the last id is the mask token)")
    # The last id is kept for the mask token, so a masked position is never an ordinary token.
    drawn = random_tokens(size, int(shape[0]), vocab_size - 1, seed, _random_tokens_masking(cfg_data, vocab_size))
    return dataclasses.replace(drawn, num_classes=vocab_size)


def _wikitext(cfg_data, split: str) -> Examples:
    from fedjax_users.data.text import wikitext  # imported when called: it needs the tokenizer machinery

    return wikitext(cfg_data, split)


def _tff_text(cfg_data, split: str) -> Examples:
    from fedjax_users.data.tff import tff_text  # builds Examples through text.py: imported when called

    return tff_text(cfg_data, split)


def _cola(cfg_data, split: str) -> Examples:
    from fedjax_users.data.glue import cola  # builds Examples: imported when called

    return cola(cfg_data, split)


def _folder_of_images(listing: ImageListing, cfg_data) -> Examples:
    decode = image_decoder(parse_transforms(cfg_data.get("augmentations_val")))
    return Examples(stored=listing.files, labels=listing.labels, num_classes=listing.num_classes, decode=decode)


SOURCES: dict[str, Callable[[Any, str], Examples]] = {
    "CIFAR10": lambda cfg, split: read_cifar(cfg.path, "CIFAR10", split),
    "CIFAR100": lambda cfg, split: read_cifar(cfg.path, "CIFAR100", split),
    "ImageNet": lambda cfg, split: _folder_of_images(list_imagenet(cfg.path, split), cfg),
    "ImageNetAnimals": lambda cfg, split: _folder_of_images(list_imagenet(cfg.path, split, ANIMAL_CLASSES), cfg),
    "TinyImageNet": lambda cfg, split: _folder_of_images(list_tiny_imagenet(cfg.path, split), cfg),
    # breaching's Birdsnap has no splits: every split is the same images.
    "Birdsnap": lambda cfg, split: _folder_of_images(list_birdsnap(cfg.path), cfg),
    "digits": lambda cfg, split: embedded_digits(split),
    "synthetic": _load_synthetic,
    "random-tokens": _load_random_tokens,
    "wikitext": lambda cfg, split: _wikitext(cfg, split),
    "shakespeare": _tff_text,
    "stackoverflow": _tff_text,
    "cola": _cola,
}


def load_examples(cfg_data) -> Examples:
    """The split a data config names, from the source its ``name`` names (module docstring).

    Args:
      cfg_data: the case's data config: ``name``, ``examples_from_split`` (default ``validation``),
        ``size`` (a cut of the split, before partitioning) and what the source reads (``path``,
        ``shape``, ``seed``, ...).

    Returns:
      The split's ``Examples``, its first ``size`` when ``size`` is set.

    Raises:
      DataError: an unknown dataset (with the closest names) or split, or what the source refuses.

    Example::

        >>> from omegaconf import OmegaConf
        >>> load_examples(OmegaConf.create({"name": "digit", "examples_from_split": "training"}))
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: unknown dataset 'digit'; did you mean 'digits'? known datasets: ...
    """
    name = cfg_data.get("name")
    if name not in SOURCES:
        hint = did_you_mean(str(name), SOURCES)
        raise DataError(f"unknown dataset {name!r}; " + (f"{hint} " if hint else "")
                        + f"known datasets: {', '.join(SOURCES)}")
    split = cfg_data.get("examples_from_split", "validation")
    _check_split(split, SOURCE_SPLITS.get(name, SPLITS))
    examples = SOURCES[name](cfg_data, split)
    size = cfg_data.get("size")
    # As the reference, ``size`` only ever shortens a split, before partitioning. (The reference's
    # partition then still reads the labels of the whole split, which its Subset forwards, and can
    # pick indices past the cut; we partition the examples that remain.)
    return examples.head(size) if size is not None and size < len(examples) else examples


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """``(images - mean) / std`` per channel (last axis), as torchvision's ``Normalize``.

    Args:
      images: ``[..., channels]`` images in [0, 1].
      mean: one value per channel (or one for all).
      std: one value per channel (or one for all).

    Returns:
      The normalised images, float32.

    Raises:
      DataError: ``mean`` and ``std`` of other lengths than the channels.

    Example::

        >>> import numpy as np
        >>> normalize(np.ones((1, 2, 2, 3), np.float32), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])[0, 0, 0].tolist()
        [2.0, 2.0, 2.0]
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != std.shape or mean.ndim != 1 or mean.shape[0] not in (1, images.shape[-1]):
        raise DataError(
            f"data.mean and data.std need one value per channel ({images.shape[-1]}), "
            f"got {mean.tolist()} and {std.tolist()}"
        )
    return (images - mean) / std
