"""Save a shared update (with the config it came from) to one file, and load it back, checked.

A file is a msgpack envelope ``{format, version, sha256, payload}`` whose ``payload`` holds the
update, buffers, metadata and config (flax msgpack) and whose ``sha256`` is the payload's digest:
a truncated, corrupted or foreign file is refused, and ``load_shared(path, like=payload)`` also
refuses an update whose tree does not fit the model's parameters. Every error is a
``SharedFileError`` that names the file. Version 1 files (no checksum) are refused with a message
saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Mapping, Optional

import flax.serialization
import jax
import msgpack
import numpy as np

from fedjax_users.types import LocalHyperparams, Metadata, ServerPayload, SharedData

FORMAT = "fedjax_users.shared"
VERSION = 2
# Version 1 wrote its format as one string and no checksum.
FORMAT_V1 = "fedjax_users.shared/1"


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``SharedFileError`` unless a file can be written at ``path`` (its folder exists and is writable)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SharedFileError(f"cannot write the shared update to {path}: it is a folder")
    if not os.path.isdir(folder):
        raise SharedFileError(f"cannot write the shared update to {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SharedFileError(f"cannot write the shared update to {path}: folder {folder} is not writable")


def save_shared(path: str | os.PathLike, shared: SharedData, config: Optional[dict] = None) -> None:
    """Write ``shared`` and the (plain, YAML-like) ``config`` that produced it, with a checksum."""
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
        raise SharedFileError(f"cannot write {path}: the update or config is not serialisable ({_first_line(err)})") from err
    envelope = msgpack.packb(
        {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload},
        use_bin_type=True,
    )
    try:
        handle = open(path, "wb")
    except OSError as err:
        raise SharedFileError(f"cannot write {path}: {err.strerror or _first_line(err)}") from err
    try:
        with handle:
            handle.write(envelope)
    except OSError as err:
        # A partial file would only be refused later: leave none.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise SharedFileError(f"cannot write {path}: {err.strerror or _first_line(err)}") from err


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise SharedFileError(f"shared-update file not found: {path}") from None
    except IsADirectoryError:
        raise SharedFileError(f"{path} is a folder, not a shared-update file") from None
    except OSError as err:
        raise SharedFileError(f"cannot read {path}: {err.strerror or _first_line(err)}") from None


def _payload(path: str, raw: bytes) -> bytes:
    """The checked payload bytes of a file's envelope."""
    if not raw:
        raise SharedFileError(f"{path} is empty, not a shared-update file")
    try:
        envelope = msgpack.unpackb(raw, raw=False)
    except Exception as err:  # noqa: BLE001  (msgpack raises several types for bad bytes)
        raise SharedFileError(
            f"{path} is not a fedjax_users shared-update file, or is truncated ({_first_line(err)})"
        ) from None
    if isinstance(envelope, Mapping) and envelope.get("format") == FORMAT_V1:
        raise SharedFileError(
            f"{path} is in shared-update format version 1, which has no checksum; this fedjax_users reads "
            f"version {VERSION} only: save the update again"
        )
    if not isinstance(envelope, Mapping) or envelope.get("format") != FORMAT:
        raise SharedFileError(f"{path} is not a fedjax_users shared-update file")
    if envelope.get("version") != VERSION:
        raise SharedFileError(
            f"{path} is in shared-update format version {envelope.get('version')!r}; this fedjax_users reads "
            f"version {VERSION}"
        )
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
    """Read a file written by ``save_shared``: the shared data and its config.

    ``like``: the payload of the model the update is for (arrays or ``jax.ShapeDtypeStruct`` s);
    the gradients must have its params' tree and shapes, and buffers, if both hold them, its
    buffers'. Without it only the file's own integrity is checked.
    """
    path = os.fspath(path)
    if like is not None and not isinstance(like, ServerPayload):
        raise SharedFileError(f"cannot check {path}: like must be a fedjax_users.ServerPayload, got {type(like).__name__}")
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
        raise SharedFileError(f"{path} is a malformed shared-update file ({_first_line(err)})") from None
    shared = SharedData(gradients=state["gradients"], batch_stats=state.get("batch_stats"), metadata=metadata)
    if like is not None:
        _check_like(path, "gradients", shared.gradients, like.params)
        if like.batch_stats is not None and shared.batch_stats is not None:
            _check_like(path, "batch_stats", shared.batch_stats, like.batch_stats)
    return shared, config
