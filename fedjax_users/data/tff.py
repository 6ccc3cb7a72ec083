"""breaching's Shakespeare and StackOverflow users, read from TensorFlow Federated's sqlite files without TensorFlow.

breaching reads both (``cases/data/datasets_text.py``: ``load_shakespeare_tff``,
``load_stackoverflow_tff``) from the files TFF publishes, decompressed into ``data.path``; nothing
is downloaded here:

* ``<data.path>/shakespeare.sqlite`` (TFF's ``shakespeare.sqlite.lzma``, decompressed): splits
  ``train`` and ``test``. breaching's ``training`` reads ``train``; ``validation`` and ``test``
  read ``test``. Each example's text is its one ``snippets`` bytes feature.
* ``<data.path>/stackoverflow.sqlite``: splits ``train``, ``heldout`` and ``test``; ``training``
  reads ``train``, ``validation`` ``heldout``, ``test`` ``test``. breaching's parse spec requires
  all six features (``creation_date``, ``score`` (int64), ``tags``, ``title``, ``tokens``,
  ``type``), so they are required here too; the text is ``tokens``.

The files are TFF's ``sql_client_data`` layout: a table ``client_metadata (client_id, split_name,
num_examples)`` and a table ``examples (split_name, client_id, serialized_example_proto)``, one
serialized ``tf.train.Example`` a row (parsed by fedjax_users.data.tf_example). User ``i`` is
row ``i`` of breaching's own query ``SELECT DISTINCT client_id FROM client_metadata WHERE
split_name = '<split>';``, in the order sqlite returns it (TFF's ``SqlClientData`` sorts its ids;
breaching does not, so neither do we). A user's texts are its examples in the order of
breaching's ``SELECT serialized_example_proto FROM examples WHERE client_id=... and
split_name=...``, each text decoded as ASCII, as breaching decodes it. From there they take
breaching's text pipeline (``fedjax_users.data.text.given_text``: its tokenizer, blocks of
``data.shape[0]`` tokens, the ``data.size`` cut, the masked-lm collator).

Not reproduced: breaching's per-user text cache. Its ``load_shakespeare`` / ``load_stackoverflow``
write a user's texts, concatenated with no separator, to ``<data.path>/cache/<name>_cache_<user>.txt``
on the first read and on every later run read that file back as *lines* (``list(file)``), keyed
by the user alone whatever the split: a later run can see other texts than the first (texts
without a newline run together; a ``training`` cache answers for ``validation``). Here the
database is read every time, which is breaching's first run, and nothing is written into
``data.path``.

Example::

    >>> from fedjax_users.data import tff
    >>> tff.DATASETS["shakespeare"].splits["validation"], tff.DATASETS["stackoverflow"].splits["validation"]
    ('test', 'heldout')

A database in TFF's layout, written here with two clients, read as breaching reads it::

    >>> import os, sqlite3, tempfile
    >>> from omegaconf import OmegaConf
    >>> from fedjax_users.data.tf_example import Example
    >>> with tempfile.TemporaryDirectory() as root:
    ...     with sqlite3.connect(os.path.join(root, "shakespeare.sqlite")) as db:
    ...         _ = db.execute("CREATE TABLE client_metadata (client_id, split_name, num_examples)")
    ...         _ = db.execute("CREATE TABLE examples (split_name, client_id, serialized_example_proto)")
    ...         for client, lines in (("ROMEO", [b"But soft", b"what light"]), ("JULIET", [b"O Romeo"])):
    ...             _ = db.execute("INSERT INTO client_metadata VALUES (?, 'train', ?)", (client, len(lines)))
    ...             for line in lines:
    ...                 example = Example()
    ...                 example.features.feature["snippets"].bytes_list.value.append(line)
    ...                 row = ("train", client, example.SerializeToString())
    ...                 _ = db.execute("INSERT INTO examples VALUES (?, ?, ?)", row)
    ...     db.close()
    ...     file = tff.find_database(root, tff.DATASETS["shakespeare"])
    ...     clients = tff.client_ids(file, "train")
    ...     romeo = tff.client_texts(file, tff.DATASETS["shakespeare"], "train", "ROMEO")
    ...     juliet = tff.user_texts(OmegaConf.create({"path": root}), tff.DATASETS["shakespeare"], "training")()(1)
    >>> clients, romeo, juliet
    (['ROMEO', 'JULIET'], ['But soft', 'what light'], ['O Romeo'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sqlite3
from typing import Callable, Mapping

from fedjax_users.data.errors import DataError
from fedjax_users.data.tf_example import BYTES, INT64, parse_fixed

# What TFF's SqlClientData requires of a database (``_check_database_format``).
TABLES = ("examples", "client_metadata")
EXAMPLE_COLUMNS = ("split_name", "client_id", "serialized_example_proto")

__all__ = ["DATASETS", "SPLITS", "TffDataset", "client_ids", "client_texts", "find_database", "tff_text", "user_texts"]


@dataclasses.dataclass(frozen=True)
class TffDataset:
    """One of TFF's sqlite datasets as breaching reads it.

    Attributes:
      name: breaching's dataset name (``data.name``).
      file: the sqlite file's name under ``data.path``.
      splits: breaching's split name -> TFF's ``split_name``.
      features: breaching's parse spec: feature -> its kind (every feature required, one value each).
      text: the feature that is a user's text.
    """

    name: str
    file: str
    splits: Mapping[str, str]
    features: Mapping[str, str]
    text: str


DATASETS: dict[str, TffDataset] = {
    "shakespeare": TffDataset(
        name="shakespeare", file="shakespeare.sqlite",
        splits={"training": "train", "validation": "test", "test": "test"},
        features={"snippets": BYTES}, text="snippets",
    ),
    "stackoverflow": TffDataset(
        name="stackoverflow", file="stackoverflow.sqlite",
        splits={"training": "train", "validation": "heldout", "test": "test"},
        features={"creation_date": BYTES, "score": INT64, "tags": BYTES, "title": BYTES, "tokens": BYTES,
                  "type": BYTES},
        text="tokens",
    ),
}
SPLITS = ("training", "validation", "test")


def _rows(file: str, query: str, parameters: tuple = ()) -> list[tuple]:
    """Every row of ``query`` on ``file``, opened read-only (a wrong path must not leave an empty database behind,
    as a plain ``connect`` would) and closed again (a connection's ``with`` only commits)."""
    with contextlib.closing(sqlite3.connect(pathlib.Path(os.path.abspath(file)).as_uri() + "?mode=ro",
                                            uri=True)) as connection:
        return connection.execute(query, parameters).fetchall()


def find_database(path: str, dataset: TffDataset) -> str:
    """The dataset's sqlite file under ``path`` (breaching's ``cache_dir``), its format checked.

    Args:
        path: ``data.path``.
        dataset: ``DATASETS[name]``.

    Returns:
        The path of ``<path>/<dataset.file>``.

    Raises:
        DataError: the file is missing (naming where it looked, and how to decompress TFF's
            ``.lzma`` if that is there), is not an sqlite database, or lacks TFF's tables.

    Example (the module docstring reads a database written in the layout)::

        >>> find_database("/no/such/folder", DATASETS["stackoverflow"])
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: no /no/such/folder/stackoverflow.sqlite (TFF's ...
    """
    file = os.path.join(os.path.expanduser(path), dataset.file)
    if not os.path.isfile(file):
        archive = f"{file}.lzma"
        hint = (f"decompress {archive} there: xz -dk {archive}" if os.path.isfile(archive)
                else f"TFF's {dataset.file}.lzma, decompressed")
        raise DataError(f"no {file} ({hint}; nothing is downloaded)")
    try:
        tables = {row[0] for row in _rows(file, "SELECT name FROM sqlite_master WHERE type='table';")}
        columns = {row[1] for row in _rows(file, "PRAGMA table_info(examples);")}
    except sqlite3.DatabaseError as err:
        raise DataError(f"{dataset.name}: {file} is not a readable sqlite database ({err})") from None
    missing = [t for t in TABLES if t not in tables] + [f"examples.{c}" for c in EXAMPLE_COLUMNS
                                                       if "examples" in tables and c not in columns]
    if missing:
        raise DataError(f"{dataset.name}: {file} is not TFF's sql_client_data layout: it lacks {', '.join(missing)}")
    return file


def client_ids(file: str, split_name: str) -> list[str]:
    """The split's clients in breaching's order (``_fetch_client_id``: row ``i`` is user ``i``).

    Args:
        file: the sqlite database (``find_database``).
        split_name: TFF's split name (``train``, ``test``, ``heldout``).

    Returns:
        The client ids as sqlite returns breaching's query, not sorted (module docstring).

    Raises:
        DataError: a split name none of the datasets has.
    """
    if split_name not in {s for d in DATASETS.values() for s in d.splits.values()}:
        raise DataError(f"unknown TFF split {split_name!r}")
    # breaching's query text, literally: the order of DISTINCT is sqlite's plan's, so the same text
    # gives the same users in the same order. The split name is one of ours (checked above), never input.
    query = f"SELECT DISTINCT client_id FROM client_metadata WHERE split_name = '{split_name}';"
    return [row[0] for row in _rows(file, query)]


def client_texts(file: str, dataset: TffDataset, split_name: str, client_id: str) -> list[str]:
    """One client's texts: its examples in breaching's order, the text feature decoded as ASCII.

    Args:
        file: the sqlite database (``find_database``).
        dataset: ``DATASETS[name]``.
        split_name: TFF's split name.
        client_id: the client (``client_ids``).

    Returns:
        One text per example, in the order of breaching's query.

    Raises:
        DataError: an example is not a ``tf.train.Example`` with breaching's features, or its
            text is not ASCII (breaching's ``.decode("ascii")`` fails there too).
    """
    # breaching's query with the id bound rather than pasted in (an id holding a quote would break
    # the pasted text); sqlite plans a bound value as it plans the literal, so the row order is the same.
    query = "SELECT serialized_example_proto FROM examples WHERE client_id=? and split_name=?;"
    rows = _rows(file, query, (client_id, split_name))
    texts = []
    for number, (serialized,) in enumerate(rows):
        where = f"{dataset.name} client {client_id!r} ({split_name}), example {number} in {file}"
        try:
            value = parse_fixed(serialized, dataset.features)[dataset.text]
            texts.append(value.decode("ascii"))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        except UnicodeDecodeError:
            raise DataError(f"{where}: its {dataset.text!r} is not ASCII (breaching decodes it as ASCII and fails "
                            f"there too)") from None
    return texts


def user_texts(cfg_data, dataset: TffDataset, split: str) -> Callable[[], Callable[[int], list[str]]]:
    """``locate`` for ``text.given_text``: finds the database, lists the split's clients, returns user -> texts.

    Args:
        cfg_data: the data config (``path``).
        dataset: ``DATASETS[name]``.
        split: breaching's split name (``training``, ``validation``, ``test``).

    Returns:
        A function that checks the file and returns ``user index -> that client's texts``.
    """
    if split not in dataset.splits:
        raise DataError(f"unknown split {split!r} for {dataset.name}; expected one of {', '.join(dataset.splits)}")
    split_name = dataset.splits[split]

    def locate() -> Callable[[int], list[str]]:
        file = find_database(str(cfg_data.get("path") or "~/data"), dataset)
        clients = client_ids(file, split_name)

        def texts(user_idx: int) -> list[str]:
            if not 0 <= user_idx < len(clients):
                raise DataError(f"{dataset.name} user {user_idx} does not exist: split {split_name!r} of {file} has "
                                f"{len(clients)} clients")
            return client_texts(file, dataset, split_name, clients[user_idx])

        return texts

    return locate


def tff_text(cfg_data, split: str):
    """breaching's ``shakespeare`` / ``stackoverflow`` ``split`` (by ``cfg_data.name``): users are the file's clients.

    Args:
        cfg_data: the case's data config.
        split: breaching's split name.

    Returns:
        ``Examples`` with ``given(user)`` that client's token blocks (module docstring).

    Example (needs ``shakespeare.sqlite`` and a cached tokenizer under ``data.path``)::

        tff_text(load_case("10_causal_lang_training", ["data=shakespeare"]).data, "training").given(0)
    """
    from fedjax_users.data.text import given_text  # text.py builds Examples: imported when called

    dataset = DATASETS[cfg_data.name]
    return given_text(cfg_data, dataset.name, user_texts(cfg_data, dataset, split))
