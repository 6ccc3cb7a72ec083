"""Fake CIFAR folders in the python-version format, written by the tests themselves.

A plain module, not a conftest: another conftest module name would clash with tests/conftest.py."""

import os
import pickle

import numpy as np

CIFAR_FILES = {
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"),
    "CIFAR100": ("cifar-100-python", ["train", "test"], "fine_labels"),
}


def dump_array_pickle(obj, file, style="py3"):
    """Pickle ``obj`` as CIFAR's files are: ``py2`` mimics the originals (protocol 2, numpy.core)."""
    if style == "py2":
        payload = pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy.core.multiarray" in payload
    else:
        payload = pickle.dumps(obj, protocol=int(style.removeprefix("protocol")))
    with open(file, "wb") as handle:
        handle.write(payload)


def write_fake_cifar(root, name="CIFAR10", per_file=20, seed=0, style="py2"):
    """A CIFAR folder under ``root`` with ``per_file`` random images per batch; returns its contents."""
    folder, files, label_key = CIFAR_FILES[name]
    classes = 10 if name == "CIFAR10" else 100
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    contents = {}
    for file in files:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_file).tolist()
        entry = {"batch_label": f"fake {file}", label_key: labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(per_file)]}
        if name == "CIFAR100":
            entry["coarse_labels"] = [label // 5 for label in labels]
        dump_array_pickle(entry, os.path.join(root, folder, file), style)
        contents[file] = (data, np.asarray(labels))
    return contents

