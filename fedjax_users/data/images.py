"""Image folders in the layouts their users have: ImageNet (torchvision's), TinyImageNet and Birdsnap.

Listing a split reads file names and labels only; ``Examples.take`` opens, decodes (Pillow) and
transforms just the files asked for, so a user reads its own examples and never the folder.

* ``ImageNet``: ``<path>/train|val/<wnid>/<image>`` as torchvision's ``ImageNet`` /
  ``ImageFolder`` list it: classes are the sorted class folders, files sorted within each (walked
  recursively), extensions those of ``torchvision.datasets.folder.IMG_EXTENSIONS``. ``meta.bin``
  (torchvision's class names) is not needed. ``training`` reads ``train``, ``validation``
  ``val``, as breaching maps its split names.
* ``ImageNetAnimals``: the ImageNet listing keeping labels below 397, as breaching does.
* ``TinyImageNet``: ``<path>/tiny-imagenet-200/`` with ``wnids.txt``; ``training`` is
  ``train/<wnid>/images/*.JPEG`` labelled by folder, ``validation`` is ``val/images/*.JPEG``
  labelled by ``val/val_annotations.txt``; files in sorted path order, classes in sorted wnid
  order, as breaching's ``TinyImageNet``. (breaching passes its own split names, ``training`` /
  ``validation``, to that class, which only knows ``train`` / ``val`` and finds no files; we read
  the split the names evidently mean.)
* ``Birdsnap``: ``<path>/birdsnap/`` with ``images.txt`` and ``species.txt``, as breaching's
  ``Birdsnap`` class lays it out (``list_birdsnap``).

Transforms are ``data.augmentations_val`` in order, each on the PIL image as torchvision's PIL
path computes it: ``Resize: s`` scales the shorter side to ``s`` (the longer to
``int(s * long / short)``; ``[h, w]`` gives both) with bilinear filtering; ``CenterCrop: s`` cuts
the centre (offsets ``round((size - crop) / 2)``), zero-padding an image smaller than the crop.
Then ``ToTensor``'s ``/ 255`` in float32. breaching applies these validation transforms to every
split (see fedjax_users.data.keys).

Example::

    >>> import os, tempfile
    >>> from fedjax_users.data import images
    >>> with tempfile.TemporaryDirectory() as root:
    ...     for wnid, names in (("n01", ["b.JPEG", "a.JPEG"]), ("n02", ["c.png"])):
    ...         os.makedirs(os.path.join(root, "val", wnid))
    ...         for name in names:
    ...             open(os.path.join(root, "val", wnid, name), "w").close()
    ...     listing = images.list_imagenet(root, "validation")  # names only: nothing is opened
    ...     files = [os.path.relpath(f, root) for f in listing.files]
    >>> files, listing.labels.tolist(), listing.num_classes
    (['val/n01/a.JPEG', 'val/n01/b.JPEG', 'val/n02/c.png'], [0, 0, 1], 2)
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np

from fedjax_users.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ANIMAL_CLASSES = 397  # breaching's ImageNetAnimals: the first 397 ImageNet classes
IMAGENET_SPLITS = {"training": "train", "validation": "val"}
TINY_FOLDER = "tiny-imagenet-200"

__all__ = [
    "ANIMAL_CLASSES",
    "ImageListing",
    "decode_image",
    "image_decoder",
    "list_birdsnap",
    "list_imagenet",
    "list_tiny_imagenet",
    "parse_transforms",
]


@dataclasses.dataclass(frozen=True)
class ImageListing:
    """A split as file paths, labels and the number of classes: nothing decoded.

    Attributes:
      files: the image files' paths (a NumPy array of ``str``).
      labels: their labels, int64.
      num_classes: the split's classes.
    """

    files: np.ndarray  # str paths
    labels: np.ndarray  # int64
    num_classes: int


# ---------------------------------------------------------------------------------------------
# Listing


def _image_files(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, as torchvision's ``make_dataset`` orders them."""
    found = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _imagenet_layout_error(path: str, problem: str) -> DataError:
    return DataError(
        f"{problem}; an ImageNet folder is <path>/train|val/<wnid>/<image>.JPEG "
        f"(torchvision's layout; data.path={path}, nothing is downloaded)"
    )


def list_imagenet(path: str, split: str, max_classes: int | None = None) -> ImageListing:
    """The ImageNet split under ``path``, as torchvision's ``ImageFolder`` lists it (module docstring).

    Args:
      path: ``data.path``, holding ``train/`` and ``val/``.
      split: ``training`` (``train/``) or ``validation`` (``val/``).
      max_classes: keep the labels below it (ImageNetAnimals: ``ANIMAL_CLASSES``); ``None`` keeps all.

    Returns:
      The files, their labels (the sorted class folders' numbers) and the number of classes.

    Raises:
      DataError: no split folder, no class folders, or a class folder without images.

    Example::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for wnid in ("n01", "n02"):
        ...         os.makedirs(os.path.join(root, "train", wnid))
        ...         open(os.path.join(root, "train", wnid, "0.JPEG"), "w").close()
        ...     animals = list_imagenet(root, "training", max_classes=1)
        >>> animals.labels.tolist(), animals.num_classes
        ([0], 1)
    """
    root = os.path.expanduser(path)
    folder = os.path.join(root, IMAGENET_SPLITS[split])
    if not os.path.isdir(folder):
        raise _imagenet_layout_error(path, f"ImageNet split folder not found: {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise _imagenet_layout_error(path, f"no class folders in {folder}")
    files, labels = [], []
    for label, wnid in enumerate(classes):
        found = _image_files(os.path.join(folder, wnid))
        if not found:
            raise _imagenet_layout_error(path, f"class folder {os.path.join(folder, wnid)} holds no images")
        files += found
        labels += [label] * len(found)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(classes)
    if max_classes is not None:
        keep = labels < max_classes
        files, labels = [f for f, k in zip(files, keep) if k], labels[keep]
        num_classes = min(num_classes, max_classes)
    return ImageListing(files=np.asarray(files, dtype=str), labels=labels, num_classes=num_classes)


def _read_lines(file: str, what: str, path: str) -> list[str]:
    try:
        with open(file, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle if line.strip()]
    except OSError as err:
        raise DataError(
            f"TinyImageNet {what} not readable: {file} ({err.strerror or err}); a TinyImageNet folder is "
            f"<path>/{TINY_FOLDER}/ with wnids.txt, train/<wnid>/images/ and val/ (data.path={path})"
        ) from None


def list_tiny_imagenet(path: str, split: str) -> ImageListing:
    """The TinyImageNet split under ``path`` (the extracted ``tiny-imagenet-200`` archive).

    Args:
      path: ``data.path``, holding ``tiny-imagenet-200/``.
      split: ``training`` (``train/<wnid>/images/``) or ``validation`` (``val/images/``, labelled
        by ``val/val_annotations.txt``).

    Returns:
      The files in sorted path order, their labels (the class's place in the sorted
      ``wnids.txt``) and the number of classes.

    Raises:
      DataError: ``wnids.txt`` or the annotations missing, no images, or an image of no listed class.

    Example::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     tiny = os.path.join(root, "tiny-imagenet-200")
        ...     os.makedirs(os.path.join(tiny, "val", "images"))
        ...     with open(os.path.join(tiny, "wnids.txt"), "w") as wnids:
        ...         _ = wnids.write("n02\\nn01\\n")
        ...     with open(os.path.join(tiny, "val", "val_annotations.txt"), "w") as annotations:
        ...         _ = annotations.write("val_0.JPEG\\tn02\\t0\\t0\\t63\\t63\\n")
        ...     open(os.path.join(tiny, "val", "images", "val_0.JPEG"), "w").close()
        ...     listing = list_tiny_imagenet(root, "validation")
        >>> listing.labels.tolist(), listing.num_classes  # n02 is the second of the sorted classes
        ([1], 2)
    """
    root = os.path.join(os.path.expanduser(path), TINY_FOLDER)
    wnids = sorted(line.strip() for line in _read_lines(os.path.join(root, "wnids.txt"), "class list", path))
    number = {wnid: i for i, wnid in enumerate(wnids)}
    split_dir = os.path.join(root, IMAGENET_SPLITS[split])
    files = sorted(f for f in _image_files(split_dir) if f.endswith(".JPEG"))
    if not files:
        raise DataError(
            f"no .JPEG images under {split_dir}; a TinyImageNet folder is <path>/{TINY_FOLDER}/ with "
            f"wnids.txt, train/<wnid>/images/ and val/images/ with val/val_annotations.txt (data.path={path})"
        )
    if split == "training":
        # train/<wnid>/images/<wnid>_<n>.JPEG: the label is the class folder.
        wnid_of = {f: os.path.basename(os.path.dirname(os.path.dirname(f))) for f in files}
    else:
        annotations = _read_lines(os.path.join(split_dir, "val_annotations.txt"), "val annotations", path)
        by_name = dict(line.split("\t")[:2] for line in annotations)
        wnid_of = {f: by_name.get(os.path.basename(f)) for f in files}
    unknown = [f for f in files if wnid_of[f] not in number]
    if unknown:
        raise DataError(f"TinyImageNet image {unknown[0]} has no class in wnids.txt (class {wnid_of[unknown[0]]!r})")
    labels = np.asarray([number[wnid_of[f]] for f in files], dtype=np.int64)
    return ImageListing(files=np.asarray(files, dtype=str), labels=labels, num_classes=len(wnids))


BIRDSNAP_FOLDER = "birdsnap"  # breaching's Birdsnap.BASE_FOLDER
JPEG_MAGIC = b"\xff\xd8\xff"  # breaching keeps a listed file only if it starts so


def _birdsnap_table(file: str, columns: tuple[str, ...], path: str) -> list[dict[str, str]]:
    """A tab-separated Birdsnap metadata file, read as breaching reads it (``csv.DictReader``, tab delimiter)."""
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except OSError as err:
        raise DataError(
            f"Birdsnap metadata not readable: {file} ({err.strerror or err}); a Birdsnap folder is "
            f"<path>/{BIRDSNAP_FOLDER}/ with images.txt, species.txt and the images at the paths images.txt names "
            f"(breaching's layout; data.path={path}, nothing is downloaded)"
        ) from None
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise DataError(f"malformed Birdsnap metadata {file}: expected a tab-separated header with "
                        f"{', '.join(columns)} and at least one row")
    return rows


def _starts_as_jpeg(file: str) -> bool:
    try:
        with open(file, "rb") as handle:
            return handle.read(len(JPEG_MAGIC)) == JPEG_MAGIC
    except OSError:
        return False


def list_birdsnap(path: str) -> ImageListing:
    """breaching's ``Birdsnap`` listing under ``path``: every image of ``images.txt`` that is a JPEG file, in order.

    As breaching's class (``datasets_vision.Birdsnap``, which has no splits: every split reads the
    same images): ``<path>/birdsnap/images.txt`` lists the images (its ``path`` column, relative to
    ``<path>/birdsnap/``) and their ``species_id``; ``species.txt`` the classes (one a row). A
    listed file is kept if it starts with the JPEG marker (``_purge_missing_data``: breaching's
    download leaves a non-JPEG file where flickr no longer has the image); a listed file that does
    not exist is dropped as well, where breaching would first try to download it. Labels are the
    ``species_id`` as written, as breaching keeps them: Birdsnap numbers its species 1..500.

    Args:
        path: ``data.path``.

    Returns:
        The kept files, their labels, and the number of species.

    Raises:
        DataError: ``images.txt`` or ``species.txt`` missing or malformed (naming where it looked),
            a ``species_id`` that is not an integer, or no listed image a JPEG file.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     list_birdsnap(root)
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: Birdsnap metadata not readable: .../birdsnap/species.txt ...
    """
    root = os.path.join(os.path.expanduser(path), BIRDSNAP_FOLDER)
    # species.txt first: breaching's _parse_metadata reads both, and a missing folder lacks both.
    species = _birdsnap_table(os.path.join(root, "species.txt"), ("common",), path)
    images = _birdsnap_table(os.path.join(root, "images.txt"), ("path", "species_id"), path)
    files, labels = [], []
    for row in images:
        file = os.path.join(root, row["path"])
        if _starts_as_jpeg(file):
            try:
                labels.append(int(row["species_id"]))
            except (TypeError, ValueError):
                raise DataError(f"malformed Birdsnap metadata {os.path.join(root, 'images.txt')}: species_id "
                                f"{row['species_id']!r} of {row['path']} is not an integer") from None
            files.append(file)
    if not files:
        raise DataError(f"none of the {len(images)} images in {os.path.join(root, 'images.txt')} is a JPEG file under "
                        f"{root} (data.path={path}, nothing is downloaded)")
    return ImageListing(files=np.asarray(files, dtype=str), labels=np.asarray(labels, dtype=np.int64),
                        num_classes=len(species))


# ---------------------------------------------------------------------------------------------
# Decoding and transforms


def _pair(value: Any, name: str) -> tuple[int, int] | int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, Sequence) and len(value) in (1, 2) and all(isinstance(v, int) and v > 0 for v in value):
        return (value[0], value[-1]) if len(value) == 2 else value[0]
    raise DataError(f"data.augmentations_val.{name} needs a positive size or [height, width], got {value!r}")


def _resize(image, size):
    from PIL import Image

    width, height = image.size
    if isinstance(size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def _center_crop(image, size):
    from PIL import ImageOps

    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    width, height = image.size
    if crop_w > width or crop_h > height:
        pad_left, pad_top = max(crop_w - width, 0) // 2, max(crop_h - height, 0) // 2
        pad_right, pad_bottom = max(crop_w - width + 1, 0) // 2, max(crop_h - height + 1, 0) // 2
        canvas = ImageOps.expand(image, border=(pad_left, pad_top, pad_right, pad_bottom), fill=0)
        image, (width, height) = canvas, canvas.size
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


TRANSFORMS: dict[str, Callable] = {"Resize": _resize, "CenterCrop": _center_crop}


def parse_transforms(augmentations: Any) -> tuple[tuple[Callable, Any], ...]:
    """``data.augmentations_val`` as the transforms to apply, in order.

    Args:
      augmentations: a mapping of transform name (``Resize``, ``CenterCrop``) to its size (an
        int, or ``[height, width]``), or ``None``.

    Returns:
      ``((transform, size), ...)`` for ``decode_image``; empty for ``None``.

    Raises:
      DataError: not a mapping, another transform, or a size that is not positive.

    Example::

        >>> [(transform.__name__, size) for transform, size in parse_transforms({"Resize": 256, "CenterCrop": 224})]
        [('_resize', 256), ('_center_crop', 224)]
    """
    if augmentations is None:
        return ()
    if not hasattr(augmentations, "items"):
        raise DataError(f"data.augmentations_val must be a mapping of transforms, got {augmentations!r}")
    steps = []
    for name, value in augmentations.items():
        if name not in TRANSFORMS:
            raise DataError(
                f"data.augmentations_val.{name} is not supported; supported: {', '.join(TRANSFORMS)}"
            )
        steps.append((TRANSFORMS[name], _pair(value, name)))
    return tuple(steps)


def decode_image(file: str, transforms: tuple[tuple[Callable, Any], ...]) -> np.ndarray:
    """One image file, RGB, transformed, as float32 HWC in [0, 1] (``ToTensor``'s scaling).

    Args:
      file: the image file (any format Pillow reads; a truncated one decodes what it holds).
      transforms: ``parse_transforms``' result.

    Returns:
      ``[H, W, 3]`` float32 in [0, 1].

    Raises:
      DataError: the file cannot be decoded.

    Example::

        >>> import os, tempfile, numpy as np
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     Image.fromarray(np.full((4, 6, 3), 255, np.uint8)).save(os.path.join(folder, "white.png"))
        ...     transforms = parse_transforms({"Resize": 2, "CenterCrop": 2})
        ...     image = decode_image(os.path.join(folder, "white.png"), transforms)
        >>> image.shape, float(image.max())
        ((2, 2, 3), 1.0)
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    # As breaching (which sets this globally): a truncated file decodes what it holds.
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        with Image.open(file) as handle:
            image = handle.convert("RGB")
        for transform, size in transforms:
            image = transform(image, size)
        pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode image {file}: {type(err).__name__}: {err}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return pixels.astype(np.float32) / np.float32(255)


def image_decoder(transforms: tuple[tuple[Callable, Any], ...]) -> Callable[[np.ndarray], np.ndarray]:
    """``Examples.decode`` for a folder of images.

    Args:
      transforms: ``parse_transforms``' result, applied to every image.

    Returns:
      ``decode(files) -> [N, H, W, 3]`` float32, each file through ``decode_image``; images of
      different shapes are a ``DataError`` naming the transform that would make them one.

    Example::

        >>> import os, tempfile, numpy as np
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     paths = [os.path.join(folder, f"{i}.png") for i in range(2)]
        ...     for size, path in zip((4, 6), paths):
        ...         Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(path)
        ...     batch = image_decoder(parse_transforms({"Resize": 3}))(np.array(paths))
        >>> batch.shape
        (2, 3, 3, 3)
    """

    def decode(files: np.ndarray) -> np.ndarray:
        images = [decode_image(str(f), transforms) for f in files]
        shapes = {i.shape for i in images}
        if len(shapes) > 1:
            raise DataError(
                f"images decode to different shapes {sorted(shapes)}: give data.augmentations_val a "
                f"CenterCrop (or a Resize to [height, width]) so every image has one shape"
            )
        return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.float32)

    return decode
