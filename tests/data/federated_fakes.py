"""Tiny federated datasets in their real layouts: TFF's sqlite files, a Birdsnap folder, a CoLA datasets cache.

* TFF: the tables TFF's ``save_to_sql_client_data`` creates (``examples``, ``client_metadata``),
  one serialized ``tf.train.Example`` a row, written by ``encode_example``: the wire format
  spelled out by hand from TensorFlow's ``example.proto`` / ``feature.proto`` field numbers, so the
  files do not come from the descriptor fedjax_users parses them with. (It gives the same bytes as
  TensorFlow 2.21's ``SerializeToString``: ``test_federated_datasets`` checks it against bytes
  TensorFlow wrote.) ``fake_tensorflow`` is the one piece of TensorFlow breaching's readers call,
  ``tf.io.parse_example`` with ``FixedLenFeature(shape=())``, decoded by hand as well.
* Birdsnap: ``<root>/birdsnap/images.txt`` and ``species.txt`` (tab-separated, with the archive's
  header), JPEGs where images.txt says, a non-JPEG file where breaching's download leaves one.
* CoLA: ``glue-<split>.arrow`` Arrow streams (``pyarrow``, as ``datasets`` writes them) in the
  folders ``datasets`` uses.

A plain module, not a conftest (another conftest module name would clash with tests/conftest.py).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import types
from typing import Callable, Mapping, Sequence

from image_fakes import write_jpeg

# ---------------------------------------------------------------------------------------------
# tf.train.Example on the wire (protobuf encoding; field numbers of TensorFlow's .proto files)

KIND_FIELDS = {"bytes": 1, "float": 2, "int64": 3}  # Feature's oneof: bytes_list, float_list, int64_list


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as protobuf writes it: negative numbers in ten bytes
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: Mapping[str, tuple[str, Sequence]]) -> bytes:
    """``Example{features{feature{key: name, value: Feature}}}`` for ``name -> (kind, values)``.

    Lists are written as TensorFlow writes them: bytes one field each, floats and int64s packed.
    """
    entries = b""
    for name, (kind, values) in features.items():
        if kind == "bytes":
            listed = b"".join(_delimited(1, v) for v in values)
        elif kind == "float":
            listed = _delimited(1, struct.pack(f"<{len(values)}f", *values)) if values else b""
        else:
            listed = _delimited(1, b"".join(_varint(v) for v in values)) if values else b""
        feature = _delimited(KIND_FIELDS[kind], listed)
        entries += _delimited(1, _delimited(1, name.encode()) + _delimited(2, feature))
    return _delimited(1, entries)


def _fields(buffer: bytes):
    """``(field number, wire type, value)`` of a message: bytes for length-delimited fields, ints for varints."""
    index = 0
    while index < len(buffer):
        key, index = _read_varint(buffer, index)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, index = _read_varint(buffer, index)
        elif wire == 2:
            length, index = _read_varint(buffer, index)
            value, index = buffer[index : index + length], index + length
        elif wire == 5:
            value, index = buffer[index : index + 4], index + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def _read_varint(buffer: bytes, index: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[index]
        value |= (byte & 0x7F) << shift
        index, shift = index + 1, shift + 7
        if not byte & 0x80:
            return value, index


def decode_example(serialized: bytes) -> dict[str, tuple[str, list]]:
    """``name -> (kind, values)`` of a serialized ``tf.train.Example`` (the inverse of ``encode_example``)."""
    kinds = {v: k for k, v in KIND_FIELDS.items()}
    found = {}
    for _, _, features in _fields(serialized):
        for _, _, entry in _fields(features):
            parts = {number: value for number, _, value in _fields(entry)}
            name = parts[1].decode()
            for number, _, listed in _fields(parts.get(2, b"")):
                values = []
                for _, wire, item in _fields(listed):
                    if number == 1:
                        values.append(bytes(item))
                    elif number == 3:
                        packed, index = bytes(item) if wire == 2 else None, 0
                        while packed is not None and index < len(packed):
                            value, index = _read_varint(packed, index)
                            values.append(value - (1 << 64) if value >= 1 << 63 else value)
                        if wire == 0:
                            values.append(item - (1 << 64) if item >= 1 << 63 else item)
                    else:
                        values += list(struct.unpack(f"<{len(item) // 4}f", item))
                found[name] = (kinds[number], values)
    return found


def fake_tensorflow() -> types.ModuleType:
    """The part of TensorFlow breaching's TFF readers call: ``tf.io.parse_example`` of ``FixedLenFeature(shape=())``."""
    tf = types.ModuleType("tensorflow")
    tf.string, tf.int64 = "bytes", "int64"

    class Tensor:
        def __init__(self, value):
            self.value = value

        def numpy(self):
            return self.value

    def parse_example(serialized, spec):
        features = decode_example(serialized)
        parsed = {}
        for name, (kind, shape) in spec.items():
            assert shape == () and name in features, name
            stored_kind, values = features[name]
            assert stored_kind == kind and len(values) == 1, (name, stored_kind, values)
            parsed[name] = Tensor(values[0])
        return parsed

    tf.io = types.SimpleNamespace(
        FixedLenFeature=lambda dtype, shape: (dtype, tuple(shape)), parse_example=parse_example
    )
    return tf


# ---------------------------------------------------------------------------------------------
# TFF's sqlite files

SHAKESPEARE_CLIENTS = ["THE_TRAGEDY_OF_KING_LEAR_KENT", "ALLS_WELL_THAT_ENDS_WELL_HELENA", "MUCH_ADO_BEATRICE",
                       "HAMLET_OPHELIA", "ZED_THE_LAST"]
SO_CLIENTS = ["00000421", "00000007", "00123456", "00000100"]
WORDS = ("thou art the fairest of them all and i shall speak to the king of france tomorrow at noon "
         "how do i join two lists in python with a comprehension").split()


def _words(seed: int, count: int) -> str:
    return " ".join(WORDS[(seed * 7 + 3 * i) % len(WORDS)] for i in range(count))


def shakespeare_example(client: str, split: str, k: int) -> bytes:
    """A TFF Shakespeare example: one ``snippets`` bytes feature (a role's speech, newlines kept)."""
    text = f"{_words(len(client) + k, 12 + 3 * k)}\n{_words(k + len(split), 6)}."
    return encode_example({"snippets": ("bytes", [text.encode("ascii")])})


def stackoverflow_example(client: str, split: str, k: int) -> bytes:
    """A TFF StackOverflow example: its six features, ``tokens`` the text, ``score`` possibly negative."""
    return encode_example({
        "creation_date": ("bytes", [f"2010-0{k % 9 + 1}-1{k % 9} 00:00:00+00:00".encode()]),
        "score": ("int64", [3 - 2 * k]),
        "tags": ("bytes", [b"python|sqlite"]),
        "title": ("bytes", [f"question {k} of {client}".encode()]),
        "tokens": ("bytes", [f"{_words(int(client) % 97 + k, 10 + 2 * k)} ? {split}".encode("ascii")]),
        "type": ("bytes", [b"question" if k % 2 else b"answer"]),
    })


def write_tff_sqlite(file: str, splits: Mapping[str, Sequence[str]], make: Callable[[str, str, int], bytes],
                     index: bool = False, per_client: Callable[[int], int] = lambda c: 2 + c % 3) -> str:
    """A database in TFF's ``sql_client_data`` layout: client ``c`` of a split gets ``per_client(c)`` examples.

    ``index``: also the indexes a database can carry (with them sqlite returns the distinct
    client ids in index order, without them in insertion order: users follow breaching's query).
    """
    if os.path.exists(file):
        os.remove(file)
    connection = sqlite3.connect(file)
    connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                       "serialized_example_proto BLOB NOT NULL);")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                       "num_examples INTEGER NOT NULL);")
    if index:
        connection.execute("CREATE INDEX client_metadata_client_id ON client_metadata (client_id);")
        connection.execute("CREATE INDEX examples_client_split ON examples (client_id, split_name);")
    for split, clients in splits.items():
        for c, client in enumerate(clients):
            count = per_client(c)
            for k in range(count):
                connection.execute("INSERT INTO examples VALUES (?, ?, ?);", (split, client, make(client, split, k)))
            connection.execute("INSERT INTO client_metadata VALUES (?, ?, ?);", (client, split, count))
    connection.commit()
    connection.close()
    return file


def write_shakespeare(folder, index: bool = False) -> str:
    """``<folder>/shakespeare.sqlite``: train and test, the test clients in another order."""
    os.makedirs(folder, exist_ok=True)
    splits = {"train": SHAKESPEARE_CLIENTS, "test": SHAKESPEARE_CLIENTS[::-1][:4]}
    return write_tff_sqlite(os.path.join(folder, "shakespeare.sqlite"), splits, shakespeare_example, index)


def write_stackoverflow(folder, index: bool = False) -> str:
    """``<folder>/stackoverflow.sqlite``: train, heldout and test."""
    os.makedirs(folder, exist_ok=True)
    splits = {"train": SO_CLIENTS, "heldout": SO_CLIENTS[1:][::-1], "test": SO_CLIENTS[::2]}
    return write_tff_sqlite(os.path.join(folder, "stackoverflow.sqlite"), splits, stackoverflow_example, index)


# ---------------------------------------------------------------------------------------------
# Birdsnap

IMAGE_COLUMNS = ["url", "md5", "path", "species_id", "bb_x1", "bb_y1", "bb_x2", "bb_y2"]


def write_birdsnap(root, species: int = 4, per_species: int = 2, not_jpeg=(), missing=(), size=(10, 12)) -> str:
    """``<root>/birdsnap/`` as breaching's ``Birdsnap`` reads it; species ids ``1..species`` as the archive's.

    ``not_jpeg``: image numbers written as an HTML page (a failed download); ``missing``: listed, no file.
    """
    base = os.path.join(str(root), "birdsnap")
    rows = []
    for s in range(1, species + 1):
        folder = os.path.join(base, "images", f"Species_{s}")
        os.makedirs(folder, exist_ok=True)
        for j in range(per_species):
            number = len(rows)
            relative = f"images/Species_{s}/{1000 + number}.jpg"
            file = os.path.join(base, relative)
            if number in not_jpeg:
                with open(file, "wb") as handle:
                    handle.write(b"<html>404 Not Found</html>")
            elif number not in missing:
                write_jpeg(file, size[0] + j, size[1], seed=number)
            rows.append([f"http://farm.example/{number}.jpg", f"{number:032x}", relative, str(s), "1", "2", "8", "9"])
    with open(os.path.join(base, "images.txt"), "w") as handle:
        handle.write("\t".join(IMAGE_COLUMNS) + "\n" + "".join("\t".join(row) + "\n" for row in rows))
    with open(os.path.join(base, "species.txt"), "w") as handle:
        handle.write("id\tcommon\tscientific\tdir\n")
        handle.write("".join(f"{s}\tBird {s}\tAvis {s}\tBird_{s}\n" for s in range(1, species + 1)))
    return base


# ---------------------------------------------------------------------------------------------
# CoLA

COLA_SENTENCES = ["the game was released in north america .", "players who had finished the story .",
                  "war between two nations and its soldiers was .", "the story of the war .",
                  "new levels for players were released in europe with the game and the story of two nations ."]


def write_cola_cache(root, rows_by_split: Mapping[str, Sequence[tuple[str, int]]], folder: str = "glue",
                     version: str = "1.0.0", digest: str = "dacbe3125aa31d7f", shards: int = 1) -> str:
    """``<root>/<folder>/cola/<version>/<digest>/glue-<split>.arrow``: Arrow streams as ``datasets`` writes them."""
    import pyarrow as pa

    base = os.path.join(str(root), folder, "cola", version, digest)
    os.makedirs(base, exist_ok=True)
    for split, rows in rows_by_split.items():
        table = pa.table({"sentence": pa.array([r[0] for r in rows], pa.string()),
                          "label": pa.array([r[1] for r in rows], pa.int64()),
                          "idx": pa.array(list(range(len(rows))), pa.int32())})
        bounds = [len(rows) * i // shards for i in range(shards + 1)]
        for shard in range(shards):
            name = f"glue-{split}.arrow" if shards == 1 else f"glue-{split}-{shard:05d}-of-{shards:05d}.arrow"
            part = table.slice(bounds[shard], bounds[shard + 1] - bounds[shard])
            with pa.OSFile(os.path.join(base, name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(part)
    return base
