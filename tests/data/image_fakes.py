"""Fake ImageNet and TinyImageNet folders in their own layouts, small JPEGs written with Pillow.

A plain module, not a conftest (another conftest module name would clash with tests/conftest.py)."""

import os

import numpy as np
from PIL import Image


def write_jpeg(file, height, width, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(file, "JPEG")


def imagenet_wnids(num_classes):
    """Fake WordNet ids, in the order a sorted folder listing gives them."""
    return [f"n{i:08d}" for i in range(num_classes)]


def write_fake_imagenet(root, num_classes=1000, per_class=2, split="val", size=(6, 5)):
    """``root/<split>/<wnid>/*.JPEG`` as torchvision's ImageNet folder; returns ``[(file, label)]``."""
    samples = []
    for label, wnid in enumerate(imagenet_wnids(num_classes)):
        folder = os.path.join(root, split, wnid)
        os.makedirs(folder, exist_ok=True)
        for j in range(per_class):
            file = os.path.join(folder, f"{wnid}_{j}.JPEG")
            write_jpeg(file, size[0] + j, size[1], seed=label * per_class + j)
            samples.append((file, label))
    return samples


def write_fake_tiny_imagenet(root, num_classes=200, per_class=1):
    """``root/tiny-imagenet-200`` with wnids.txt, words.txt, train/<wnid>/images and val/images."""
    base = os.path.join(root, "tiny-imagenet-200")
    wnids = imagenet_wnids(num_classes)
    os.makedirs(os.path.join(base, "val", "images"), exist_ok=True)
    # wnids.txt is not sorted in the archive: breaching sorts it.
    with open(os.path.join(base, "wnids.txt"), "w") as handle:
        handle.write("\n".join(reversed(wnids)) + "\n")
    with open(os.path.join(base, "words.txt"), "w") as handle:
        handle.write("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    annotations = []
    for label, wnid in enumerate(wnids):
        train = os.path.join(base, "train", wnid, "images")
        os.makedirs(train, exist_ok=True)
        for j in range(per_class):
            write_jpeg(os.path.join(train, f"{wnid}_{j}.JPEG"), 64, 64, seed=label)
            index = label * per_class + j
            write_jpeg(os.path.join(base, "val", "images", f"val_{index}.JPEG"), 64, 64, seed=10_000 + index)
            annotations.append(f"val_{index}.JPEG\t{wnid}\t0\t0\t63\t63")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as handle:
        handle.write("\n".join(annotations) + "\n")
    return base
