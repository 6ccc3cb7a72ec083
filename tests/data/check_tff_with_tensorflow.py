"""A check run by hand, not by pytest: breaching's TFF readers with TensorFlow itself against fedjax_users' reader.

The test suite cannot install TensorFlow, so ``test_federated_datasets`` runs breaching's
``load_shakespeare_tff`` / ``load_stackoverflow_tff`` with a stand-in for ``tf.io.parse_example``.
This script closes that gap where TensorFlow can be installed (any scratch environment):

1. With TensorFlow (``pip install tensorflow-cpu tqdm`` in a scratch venv; breaching's module is
   loaded by path, its ``import torch`` answered by a stub it never uses)::

       python tests/data/check_tff_with_tensorflow.py write-and-read OUT BREACHING_DATASETS_TEXT_PY

   writes ``shakespeare.sqlite`` and ``stackoverflow.sqlite`` in TFF's layout with
   ``tf.train.Example(...).SerializeToString()``, in ``OUT/index0`` (no indexes: sqlite returns
   clients in the order written) and ``OUT/index1`` (indexes: in index order), and saves every
   user's texts as breaching's readers return them (every split, one user past the last) to
   ``OUT/breaching_tf.json``.
2. In this project's environment::

       python tests/data/check_tff_with_tensorflow.py compare OUT

   reads the same files with ``fedjax_users.data.tff`` and asserts the same users, order and
   texts, and the same users missing.

Last run with TensorFlow 2.21.0 (tensorflow-cpu from PyPI): 60 users equal, 12 past-the-end users refused by both.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from federated_fakes import write_tff_sqlite  # noqa: E402

CLIENTS = ["THE_TRAGEDY_OF_KING_LEAR_KENT", "ALLS_WELL_ROSSILLION", "MUCH_ADO_BEATRICE", "HAMLET_OPHELIA", "ZED"]
SPLITS = {"shakespeare": ["train", "test"], "stackoverflow": ["train", "heldout", "test"]}
READ_SPLITS = ["train", "validation", "test"]  # what _build_and_split_dataset_text hands the readers
USERS = 6  # one more than there are clients


def write_and_read(out: str, datasets_text_py: str) -> None:
    import importlib.util
    import types

    import tensorflow as tf

    sys.modules.setdefault("torch", types.ModuleType("torch"))  # breaching's module imports it; its readers never use it
    spec = importlib.util.spec_from_file_location("datasets_text", datasets_text_py)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)

    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def example(name: str, client: str, split: str, k: int) -> bytes:
        if name == "shakespeare":
            features = {"snippets": feature(f"{client.lower()} says line {k} in {split}\nand more {k}".encode())}
        else:
            features = {"creation_date": feature(b"2010-01-0%d" % (k + 1)), "score": feature(-k),
                        "tags": feature(b"python|sqlite"), "title": feature(b"title %d" % k),
                        "tokens": feature(f"tokens of {client} {split} {k} ?".encode()), "type": feature(b"question")}
        return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()

    results = {}
    for index in (0, 1):
        folder = os.path.join(out, f"index{index}")
        os.makedirs(folder, exist_ok=True)
        for name, splits in SPLITS.items():
            # The same layout and clients as the tests' files, the protos written by TensorFlow itself.
            order = {split: CLIENTS if split == splits[0] else CLIENTS[::-1] for split in splits}
            write_tff_sqlite(os.path.join(folder, f"{name}.sqlite"), order,
                             lambda client, split, k, name=name: example(name, client, split, k), index=bool(index))
            read = getattr(reference, f"load_{name}_tff")
            for split in READ_SPLITS:
                users = []
                for user in range(USERS):
                    try:
                        users.append(read(cache_dir=folder, user_idx=user, split=split))
                    except ValueError as err:
                        users.append(f"ValueError: {err}")
                results[f"index{index}/{name}/{split}"] = users
    with open(os.path.join(out, "breaching_tf.json"), "w") as handle:
        json.dump(dict(tensorflow=tf.__version__, results=results), handle, indent=1)
    print(f"TensorFlow {tf.__version__}: {len(results)} reads saved in {out}")


def compare(out: str) -> None:
    from omegaconf import OmegaConf

    from fedjax_users.data import DataError, tff

    with open(os.path.join(out, "breaching_tf.json")) as handle:
        saved = json.load(handle)
    equal = missing = 0
    for key, users in saved["results"].items():
        index, name, split = key.split("/")
        locate = tff.user_texts(OmegaConf.create({"path": os.path.join(out, index)}), tff.DATASETS[name],
                                {"train": "training"}.get(split, split))
        texts = locate()
        for user, expected in enumerate(users):
            if isinstance(expected, str):
                assert "larger than number of clients" in expected, expected
                try:
                    texts(user)
                except DataError:
                    missing += 1
                    continue
                raise AssertionError(f"{key} user {user}: breaching has no such user, fedjax_users has")
            assert texts(user) == expected, (key, user)
            equal += 1
    print(f"TensorFlow {saved['tensorflow']}: {equal} users equal, {missing} past-the-end users refused by both")


if __name__ == "__main__":
    if sys.argv[1:2] == ["write-and-read"] and len(sys.argv) == 4:
        write_and_read(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 3:
        compare(sys.argv[2])
    else:
        sys.exit(__doc__)
