"""Save a shared update (with the config it came from) to one file, and load it back."""

from __future__ import annotations

import os
from typing import Any, Optional

import flax.serialization
import jax
import numpy as np

from fedjax_users.types import LocalHyperparams, Metadata, SharedData

FORMAT = "fedjax_users.shared/1"


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


def save_shared(path: str | os.PathLike, shared: SharedData, config: Optional[dict] = None) -> None:
    """Write ``shared`` and the (plain, YAML-like) ``config`` that produced it, as msgpack."""
    state = {
        "format": FORMAT,
        "gradients": _to_numpy(shared.gradients),
        "batch_stats": None if shared.batch_stats is None else _to_numpy(shared.batch_stats),
        "metadata": _metadata_state(shared.metadata),
        "config": config,
    }
    with open(path, "wb") as handle:
        handle.write(flax.serialization.msgpack_serialize(state))


def load_shared(path: str | os.PathLike) -> tuple[SharedData, Optional[dict]]:
    """Read a file written by ``save_shared``: the shared data and its config."""
    with open(path, "rb") as handle:
        state = flax.serialization.msgpack_restore(handle.read())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fedjax_users shared-update file")
    shared = SharedData(
        gradients=state["gradients"], batch_stats=state.get("batch_stats"),
        metadata=_metadata_from_state(state["metadata"]),
    )
    return shared, state.get("config")
