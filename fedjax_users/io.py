"""Save a shared update (with the config it came from) to one file, and load it back, checked.

A file is a msgpack envelope ``{format, version, sha256, payload}`` whose ``payload`` holds the
update, buffers, metadata and config (flax msgpack) and whose ``sha256`` is the payload's digest:
a truncated, corrupted or foreign file is refused, and ``load_shared(path, like=payload)`` also
refuses an update whose tree does not fit the model's parameters. Every error is a
``SharedFileError`` that names the file. Version 1 files (no checksum) are refused with a message
saying so.

The same update for torch: ``save_shared_safetensors`` writes ``NAME.safetensors`` (the tensors
under torch's names, in torch's layouts) and ``NAME.metadata.json`` beside it (breaching's
metadata, the config and the tensors file's sha256). ``safetensors.torch.load_file`` reads the
tensors without this project; the ``__metadata__`` of the file lists them in breaching's order
(``"gradients"``: ``model.parameters()``, ``"buffers"``: ``model.buffers()`` or ``null``), and
``load_shared`` reads the pair back into the very ``SharedData`` that was written.

Example::

    >>> import tempfile, os, numpy as np
    >>> import fedjax_users as fu
    >>> from fedjax_users import io
    >>> from fedjax_users.interop.order import TorchOrder
    >>> shared = fu.SharedData(gradients={"fc": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}},
    ...                        batch_stats=None, metadata=fu.Metadata(num_data_points=1, labels=np.array([1])))
    >>> order = TorchOrder(params=(("fc", "kernel"), ("fc", "bias")))  # torch's: weight, then bias
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "update.safetensors")
    ...     written = [os.path.basename(p) for p in io.save_shared_safetensors(path, shared, order)]
    ...     loaded, config = io.load_shared(path)
    >>> written, loaded.gradients["fc"]["kernel"].shape
    (['update.safetensors', 'update.metadata.json'], (3, 2))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from typing import Any, Mapping, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from fedjax_users.interop import naming
from fedjax_users.interop.metadata import metadata_from_dict, metadata_to_dict
from fedjax_users.interop.order import TorchOrder
from fedjax_users.types import LocalHyperparams, Metadata, ServerPayload, SharedData
from fedjax_users.validation.errors import first_line

__all__ = [
    "SharedFileError",
    "check_writable",
    "load_shared",
    "metadata_path",
    "save_shared",
    "save_shared_safetensors",
]

FORMAT = "fedjax_users.shared"
VERSION = 2
# Version 1 wrote its format as one string and no checksum.
FORMAT_V1 = "fedjax_users.shared/1"

# The torch pair: NAME.safetensors and NAME.metadata.json.
SAFETENSORS_SUFFIX = ".safetensors"
METADATA_SUFFIX = ".metadata.json"
SAFETENSORS_FORMAT = "fedjax_users.shared.safetensors"
METADATA_FORMAT = "fedjax_users.shared.metadata"
SAFETENSORS_VERSION = 1
# safetensors' dtype codes (file header) as NumPy dtypes.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SharedFileError(ValueError):
    """A shared-update file that cannot be written, read or trusted; the message names the file."""


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def _metadata_state(metadata: Metadata) -> dict:
    hyper = metadata.local_hyperparams
    return {
        "num_data_points": metadata.num_data_points,
        "labels": None if metadata.labels is None else np.asarray(metadata.labels),
        "data_key": metadata.data_key,
        "num_users": metadata.num_users,
        "local_hyperparams": None if hyper is None else {
            "lr": hyper.lr, "steps": hyper.steps, "data_per_step": hyper.data_per_step,
            "labels": None if hyper.labels is None else {str(i): np.asarray(l) for i, l in enumerate(hyper.labels)},
        },
    }


def _metadata_from_state(state: dict) -> Metadata:
    hyper = state.get("local_hyperparams")
    if hyper is not None:
        labels = hyper.get("labels")
        hyper = LocalHyperparams(
            lr=hyper["lr"], steps=hyper["steps"], data_per_step=hyper["data_per_step"],
            labels=None if labels is None else [labels[str(i)] for i in range(len(labels))],
        )
    return Metadata(
        num_data_points=state.get("num_data_points"), labels=state.get("labels"), local_hyperparams=hyper,
        data_key=state.get("data_key"), num_users=state.get("num_users"),
    )


def _check_format(path: str, document: Any, name: str, version: int, what: str) -> None:
    """``document`` is a mapping of ``format`` ``name`` at ``version``, else one line naming ``path``."""
    if not isinstance(document, Mapping) or document.get("format") != name:
        raise SharedFileError(f"{path} is not a fedjax_users {what} file")
    if document.get("version") != version:
        raise SharedFileError(
            f"{path} is in {what} format version {document.get('version')!r}; this fedjax_users reads version {version}"
        )


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``SharedFileError`` unless a file can be written at ``path`` (its folder exists and is writable).

    Args:
      path: the file to be written (it need not exist).

    Raises:
      SharedFileError: ``path`` is a folder, or its folder is missing or not writable.

    Example::

        >>> check_writable("/no/such/folder/update.msgpack")
        Traceback (most recent call last):
        ...
        fedjax_users.io.SharedFileError: cannot write the shared update to ...: folder /no/such/folder does not exist
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SharedFileError(f"cannot write the shared update to {path}: it is a folder")
    if not os.path.isdir(folder):
        raise SharedFileError(f"cannot write the shared update to {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SharedFileError(f"cannot write the shared update to {path}: folder {folder} is not writable")


def save_shared(path: str | os.PathLike, shared: SharedData, config: Optional[dict] = None) -> None:
    """Write ``shared`` and the config that produced it to one file, with a checksum.

    Args:
      path: the file (conventionally ``.msgpack``); written over if it exists.
      shared: what a user shared.
      config: the plain (YAML-like) config that produced ``shared``, or ``None``.

    Raises:
      SharedFileError: ``shared`` is not a ``SharedData``, the path cannot be written, or the
        update or config cannot be serialised.

    Example::

        >>> import os, tempfile, numpy as np
        >>> from fedjax_users.types import Metadata, SharedData
        >>> shared = SharedData(gradients={"fc": {"bias": np.ones(2, np.float32)}}, batch_stats=None,
        ...                     metadata=Metadata(num_data_points=1))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_shared(os.path.join(folder, "update.msgpack"), shared, {"user": {"num_data_points": 1}})
        ...     loaded, config = load_shared(os.path.join(folder, "update.msgpack"))
        >>> loaded.gradients["fc"]["bias"].tolist(), config
        ([1.0, 1.0], {'user': {'num_data_points': 1}})
    """
    path = os.fspath(path)
    if not isinstance(shared, SharedData):
        raise SharedFileError(f"cannot write {path}: shared must be a fedjax_users.SharedData, got {type(shared).__name__}")
    check_writable(path)
    state = {
        "gradients": _to_numpy(shared.gradients),
        "batch_stats": None if shared.batch_stats is None else _to_numpy(shared.batch_stats),
        "metadata": _metadata_state(shared.metadata),
        "config": config,
    }
    try:
        payload = flax.serialization.msgpack_serialize(state)
    except (TypeError, ValueError) as err:
        raise SharedFileError(f"cannot write {path}: the update or config is not serialisable ({first_line(err)})") from err
    envelope = msgpack.packb(
        {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload},
        use_bin_type=True,
    )
    _write(path, envelope)


def _write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``; on failure leave no partial file (it would only be refused later)."""
    try:
        handle = open(path, "wb")
    except OSError as err:
        raise SharedFileError(f"cannot write {path}: {err.strerror or first_line(err)}") from err
    try:
        with handle:
            handle.write(data)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise SharedFileError(f"cannot write {path}: {err.strerror or first_line(err)}") from err


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise SharedFileError(f"shared-update file not found: {path}") from None
    except IsADirectoryError:
        raise SharedFileError(f"{path} is a folder, not a shared-update file") from None
    except OSError as err:
        raise SharedFileError(f"cannot read {path}: {err.strerror or first_line(err)}") from None


def _payload(path: str, raw: bytes) -> bytes:
    """The checked payload bytes of a file's envelope."""
    if not raw:
        raise SharedFileError(f"{path} is empty, not a shared-update file")
    try:
        envelope = msgpack.unpackb(raw, raw=False)
    except Exception as err:  # noqa: BLE001  (msgpack raises several types for bad bytes)
        raise SharedFileError(
            f"{path} is not a fedjax_users shared-update file, or is truncated ({first_line(err)})"
        ) from None
    if isinstance(envelope, Mapping) and envelope.get("format") == FORMAT_V1:
        raise SharedFileError(
            f"{path} is in shared-update format version 1, which has no checksum; this fedjax_users reads "
            f"version {VERSION} only: save the update again"
        )
    _check_format(path, envelope, FORMAT, VERSION, "shared-update")
    payload, digest = envelope.get("payload"), envelope.get("sha256")
    if not isinstance(payload, bytes) or not isinstance(digest, str):
        raise SharedFileError(f"{path} is a damaged shared-update file: no payload or checksum")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise SharedFileError(f"{path} is corrupt: its checksum does not match its contents")
    return payload


def _check_like(path: str, name: str, given: Any, expected: Any) -> None:
    """``given`` (a loaded tree) has ``expected``'s structure and leaf shapes."""
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    have = dict(jax.tree_util.tree_flatten_with_path(given)[0])
    for key, leaf in want.items():
        entry = f"{name}{jax.tree_util.keystr(key)}"
        if key not in have:
            raise SharedFileError(f"{path} does not fit the model: {entry} is missing")
        if tuple(np.shape(have[key])) != tuple(np.shape(leaf)):
            raise SharedFileError(
                f"{path} does not fit the model: {entry} has shape {tuple(np.shape(have[key]))}, "
                f"the model's has {tuple(np.shape(leaf))}"
            )
    extra = [key for key in have if key not in want]
    if extra:
        raise SharedFileError(f"{path} does not fit the model: unexpected entry {name}{jax.tree_util.keystr(extra[0])}")


def load_shared(
    path: str | os.PathLike, like: Optional[ServerPayload] = None
) -> tuple[SharedData, Optional[dict]]:
    """Read a file written by ``save_shared``, or a ``.safetensors`` update written by
    ``save_shared_safetensors`` (with its metadata JSON beside it): the shared data and its config.

    Args:
      path: the ``.msgpack`` file, or the ``.safetensors`` file.
      like: the payload of the model the update is for (arrays or ``jax.ShapeDtypeStruct`` s);
        the gradients must have its params' tree and shapes, and buffers, if both hold them, its
        buffers'. Without it only the files' own integrity is checked.

    Returns:
      ``(shared, config)``: the :class:`~fedjax_users.types.SharedData` as it was written (NumPy
      leaves, Flax layouts and tree) and the config saved with it (``None`` if none was).

    Raises:
      SharedFileError: a missing, damaged or foreign file, or one that does not fit ``like``.

    Example::

        >>> import os, tempfile, numpy as np
        >>> from fedjax_users.types import Metadata, ServerPayload, SharedData
        >>> shared = SharedData(gradients={"fc": {"bias": np.ones(2, np.float32)}}, batch_stats=None,
        ...                     metadata=Metadata(num_data_points=1))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_shared(os.path.join(folder, "update.msgpack"), shared)
        ...     model = ServerPayload(params={"fc": {"bias": np.ones(3)}})
        ...     load_shared(os.path.join(folder, "update.msgpack"), like=model)
        Traceback (most recent call last):
        ...
        fedjax_users.io.SharedFileError: ... does not fit the model: gradients['fc']['bias'] has shape (2,), ...
    """
    path = os.fspath(path)
    if like is not None and not isinstance(like, ServerPayload):
        raise SharedFileError(f"cannot check {path}: like must be a fedjax_users.ServerPayload, got {type(like).__name__}")
    if path.endswith(SAFETENSORS_SUFFIX):
        shared, config = _load_safetensors(path)
        _check_fits(path, shared, like)
        return shared, config
    payload = _payload(path, _read(path))
    try:
        state = flax.serialization.msgpack_restore(payload)
        if not isinstance(state, Mapping) or not isinstance(state.get("gradients"), Mapping):
            raise TypeError("no gradients")
        metadata = _metadata_from_state(state["metadata"])
        config = state.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError("config is not a mapping")
    except Exception as err:  # noqa: BLE001  (a checksummed payload of the wrong structure)
        raise SharedFileError(f"{path} is a malformed shared-update file ({first_line(err)})") from None
    shared = SharedData(gradients=state["gradients"], batch_stats=state.get("batch_stats"), metadata=metadata)
    _check_fits(path, shared, like)
    return shared, config


def _check_fits(path: str, shared: SharedData, like: Optional[ServerPayload]) -> None:
    """The update has ``like``'s params tree and shapes (and its buffers', where both hold them)."""
    if like is None:
        return
    _check_like(path, "gradients", shared.gradients, like.params)
    if like.batch_stats is not None and shared.batch_stats is not None:
        _check_like(path, "batch_stats", shared.batch_stats, like.batch_stats)


# ---------------------------------------------------------------------------------------------
# The update for torch: NAME.safetensors + NAME.metadata.json


def metadata_path(path: str | os.PathLike) -> str:
    """The metadata JSON that goes with a ``.safetensors`` update: ``x.safetensors`` -> ``x.metadata.json``.

    Args:
      path: the ``.safetensors`` file.

    Returns:
      The path of its metadata JSON, in the same folder.

    Example::

        >>> metadata_path("runs/x/shared_update.safetensors")
        'runs/x/shared_update.metadata.json'
    """
    path = os.fspath(path)
    stem = path[: -len(SAFETENSORS_SUFFIX)] if path.endswith(SAFETENSORS_SUFFIX) else path
    return stem + METADATA_SUFFIX


def _json_plain(value: Any) -> Any:
    """JSON for the NumPy / JAX scalars a metadata or config may hold."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _label_dtype(metadata: Metadata) -> Optional[str]:
    """The one dtype all label arrays are read back as (they are slices of the same labels)."""
    hyper = metadata.local_hyperparams
    arrays = ([] if metadata.labels is None else [metadata.labels]) + list(
        [] if hyper is None or hyper.labels is None else hyper.labels)
    return np.result_type(*[np.asarray(labels).dtype for labels in arrays]).name if arrays else None


def _torch_tensors(path: str, tree: Any, paths: tuple, collection: str) -> tuple[dict, list[str], dict]:
    """One collection's leaves as torch-layout arrays by torch name; the names in torch's order;
    each name's Flax path and dtype (to read the tree back without the model)."""
    flat = traverse_util.flatten_dict(dict(tree))
    wanted = set(paths)
    missing = [p for p in flat if p not in wanted] or [p for p in paths if p not in flat]
    if missing or len(paths) != len(set(paths)):
        where = "/".join(missing[0]) if missing else "a repeated path"
        raise SharedFileError(
            f"cannot write {path}: the torch order does not fit the update's {collection} ({where}): "
            "compute it for the model that produced the update"
        )
    tensors, names, flax = {}, [], {}
    for flax_path in paths:
        name = naming.torch_name(flax_path, collection)
        try:
            # The name must lead back to this leaf, as interop pairs a torch model with the tree.
            item = naming.link(name, tree, collection)
        except ValueError as err:
            raise SharedFileError(f"cannot write {path}: {first_line(err)}") from None
        if item.flax_path != flax_path or name in tensors:
            raise SharedFileError(
                f"cannot write {path}: Flax {collection}/{'/'.join(flax_path)} and another leaf share the "
                f"torch name {name!r}"
            )
        value = np.asarray(flat[flax_path])
        torch_value = naming.layout_to_torch(value, item)
        # torch's integer buffers (num_batches_tracked, position_ids) are int64; Flax keeps int32.
        if np.issubdtype(torch_value.dtype, np.integer):
            torch_value = torch_value.astype(np.int64)
        tensors[name] = np.array(torch_value, order="C")
        names.append(name)
        flax[name] = {"path": list(flax_path), "dtype": value.dtype.name}
    return tensors, names, flax


def save_shared_safetensors(
    path: str | os.PathLike, shared: SharedData, order: TorchOrder, config: Optional[dict] = None
) -> list[str]:
    """Write ``shared`` for torch: ``path`` (safetensors) and its metadata JSON beside it.

    The tensors file holds the gradients and the buffers under torch's names
    (:func:`fedjax_users.interop.naming.torch_name`: breaching's names without its container
    prefix ``model.``), in torch's layouts (OIHW convolution kernels, ``[out, in]`` linear
    weights, int64 integer buffers). Its ``__metadata__`` holds ``"gradients"`` and ``"buffers"``,
    JSON lists of the names in breaching's order (``null`` where breaching shares no buffers), and
    each name's Flax path and dtype. The JSON file holds breaching's ``metadata`` dict (labels as
    lists), the labels' dtype, ``config`` and the tensors file's sha256.

    Args:
      path: the tensors file; must end in ``.safetensors``. The metadata goes to
        :func:`metadata_path` ``(path)``.
      shared: what a user shared.
      order: the Flax paths in torch's order, from
        :func:`fedjax_users.interop.order.torch_order` (the Flax model) or
        :func:`~fedjax_users.interop.order.order_from_torch_names` (a torch model).
      config: the plain (YAML-like) config that produced ``shared``, or ``None``.

    Returns:
      ``[path, metadata path]``, the files written.

    Raises:
      SharedFileError: the path cannot be written, or ``order`` does not fit ``shared``.

    Example::

        >>> import os, tempfile, numpy as np
        >>> import safetensors.numpy
        >>> from fedjax_users.interop.order import TorchOrder
        >>> from fedjax_users.types import Metadata, SharedData
        >>> fc = {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}
        >>> shared = SharedData(gradients={"fc": fc}, batch_stats=None, metadata=Metadata(num_data_points=1))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "update.safetensors")
        ...     _ = save_shared_safetensors(path, shared, TorchOrder(params=(("fc", "kernel"), ("fc", "bias"))))
        ...     tensors = safetensors.numpy.load_file(path)  # what safetensors.torch.load_file reads
        >>> {name: value.shape for name, value in sorted(tensors.items())}  # torch's names and [out, in] layout
        {'fc.bias': (2,), 'fc.weight': (2, 3)}
    """
    path = os.fspath(path)
    if not isinstance(shared, SharedData):
        raise SharedFileError(f"cannot write {path}: shared must be a fedjax_users.SharedData, got {type(shared).__name__}")
    if not isinstance(order, TorchOrder):
        raise SharedFileError(f"cannot write {path}: order must be a fedjax_users.interop.order.TorchOrder, "
                              f"got {type(order).__name__}")
    if not path.endswith(SAFETENSORS_SUFFIX):
        raise SharedFileError(f"cannot write {path}: a torch update file must end in {SAFETENSORS_SUFFIX}")
    meta_path = metadata_path(path)
    check_writable(path)
    tensors, header = {}, {"format": SAFETENSORS_FORMAT, "version": str(SAFETENSORS_VERSION)}
    flax = {}
    for collection, key, tree in ((naming.PARAMS, "gradients", shared.gradients),
                                  (naming.BATCH_STATS, "buffers", shared.batch_stats)):
        names = None
        if tree is not None:
            found, names, info = _torch_tensors(path, tree, order.paths(collection), collection)
            clash = sorted(set(found) & set(tensors))
            if clash:  # torch forbids a parameter and a buffer of one name
                raise SharedFileError(f"cannot write {path}: {clash[0]!r} names both a gradient and a buffer")
            tensors.update(found)
            flax.update(info)
        header[key] = json.dumps(names)
    header["flax"] = json.dumps(flax)
    raw = safetensors.numpy.save(tensors, metadata=header)
    document = {
        "format": METADATA_FORMAT, "version": SAFETENSORS_VERSION, "tensors": os.path.basename(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "metadata": metadata_to_dict(shared.metadata, lambda labels: np.asarray(labels).tolist()),
        "label_dtype": _label_dtype(shared.metadata), "config": config,
    }
    try:
        text = json.dumps(document, default=_json_plain) + "\n"
    except (TypeError, ValueError) as err:
        raise SharedFileError(f"cannot write {meta_path}: the metadata or config is not JSON ({first_line(err)})") from err
    _write(path, raw)
    try:
        _write(meta_path, text.encode())
    except SharedFileError:
        with contextlib.suppress(OSError):  # a tensors file without its metadata would only be refused
            os.unlink(path)
        raise
    return [path, meta_path]


def _read_metadata_file(path: str) -> dict:
    """The checked metadata JSON of the tensors file ``path``."""
    meta_path = metadata_path(path)
    try:
        with open(meta_path, "rb") as handle:
            document = json.loads(handle.read())
    except FileNotFoundError:
        raise SharedFileError(f"{path} has no metadata file beside it: {meta_path} not found") from None
    except OSError as err:
        raise SharedFileError(f"cannot read {meta_path}: {err.strerror or first_line(err)}") from None
    except ValueError as err:
        raise SharedFileError(f"{meta_path} is not a fedjax_users metadata file ({first_line(err)})") from None
    _check_format(meta_path, document, METADATA_FORMAT, SAFETENSORS_VERSION, "metadata")
    return dict(document)


def _safetensors_header(path: str, raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian length, then a JSON header."""
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        return dict(header["__metadata__"])
    except Exception as err:  # noqa: BLE001  (struct, JSON and key errors for bytes that are not one)
        raise SharedFileError(f"{path} is not a safetensors file, or is truncated ({first_line(err)})") from None


def _load_safetensors(path: str) -> tuple[SharedData, Optional[dict]]:
    """The ``SharedData`` and config of a pair written by ``save_shared_safetensors``."""
    raw = _read(path)
    document = _read_metadata_file(path)
    if hashlib.sha256(raw).hexdigest() != document.get("sha256"):
        raise SharedFileError(
            f"{path} is corrupt, or not the file {metadata_path(path)} was written with: their checksums differ"
        )
    header = _safetensors_header(path, raw)
    if header.get("format") != SAFETENSORS_FORMAT or header.get("version") != str(SAFETENSORS_VERSION):
        raise SharedFileError(f"{path} is not a fedjax_users shared update in safetensors version {SAFETENSORS_VERSION}")
    try:
        stored = dict(safetensors.deserialize(raw))
        flax = json.loads(header["flax"])
        trees = {}
        for collection, key in ((naming.PARAMS, "gradients"), (naming.BATCH_STATS, "buffers")):
            names = json.loads(header[key])
            if names is None:
                trees[collection] = None
                continue
            leaves = {}
            for name in names:
                entry, info = stored.pop(name), flax[name]
                value = np.frombuffer(entry["data"], _SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
                item = naming.Link(name, collection, tuple(info["path"]))
                # A copy in the Flax dtype: the bytes are read-only, and integers go back to int32.
                leaves[item.flax_path] = np.array(naming.layout_from_torch(value, item), dtype=jnp.dtype(info["dtype"]))
            trees[collection] = traverse_util.unflatten_dict(leaves)
        if stored:
            raise ValueError(f"tensor {next(iter(stored))!r} is in no list")
        label_dtype = document.get("label_dtype")
        metadata = metadata_from_dict(document["metadata"], lambda labels: np.asarray(labels, dtype=label_dtype))
        config = document.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError("config is not a mapping")
    except Exception as err:  # noqa: BLE001  (a checksummed pair of the wrong structure)
        raise SharedFileError(f"{path} is a malformed shared-update file ({first_line(err)})") from None
    return SharedData(gradients=trees[naming.PARAMS], batch_stats=trees[naming.BATCH_STATS], metadata=metadata), config
