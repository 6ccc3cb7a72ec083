"""Where a ``fedjax-users run`` keeps what it computed: one folder per run, never overwritten.

A run folder holds the fully composed case (``config.yaml``), what was computed
(``summary.json``: the case, shapes, norms, the privacy guarantee, versions, timings) and the
shared update of each query (``shared_update.msgpack``, or ``shared_update.queryN.msgpack`` for
several queries; ``fedjax_users.io.load_shared`` reads them), and the same update for torch beside
it (``shared_update.safetensors`` and ``shared_update.metadata.json``: ``safetensors.torch.load_file``
reads it without this project). Without ``--out`` the folder is
``runs/<case>-<timestamp>/`` under the current folder; a folder or file that already exists is
only written over with ``--force``. Both are decided before anything is computed, and the folder
is made only once there is something to write.

Example::

    >>> import tempfile, os
    >>> from fedjax_users import runs
    >>> with tempfile.TemporaryDirectory() as root:
    ...     out = runs.prepare(None, "default_digits", force=False, root=root)
    >>> os.path.basename(out.folder).startswith("default_digits-"), os.path.basename(out.update_paths(1)[0])
    (True, 'shared_update.msgpack')
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from importlib import metadata
from typing import Any, Optional, Sequence

from fedjax_users.io import SharedFileError

UPDATE_FILE = "shared_update.msgpack"
VERSIONED = ("fedjax-users", "jax", "jaxlib", "flax", "numpy")

__all__ = ["RunOutput", "prepare", "run_id", "versions"]


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """Where one run writes: a run folder, or (``--out FILE.msgpack``) a single update file.

    Attributes:
      folder: the run folder (made by ``create``), or ``None`` for a single update file.
      update_file: the ``.msgpack`` file of ``--out FILE.msgpack``, else ``None``.
    """

    folder: Optional[str]
    update_file: Optional[str] = None

    def create(self) -> None:
        """Make the run folder (``prepare`` only checked that it can be made)."""
        if self.folder is not None:
            os.makedirs(self.folder, exist_ok=True)

    def update_paths(self, queries: int) -> list[str]:
        """The update file of each query.

        Args:
          queries: the number of queries.

        Returns:
          One path per query: ``shared_update.msgpack`` for one query, else
          ``shared_update.query<N>.msgpack`` (the stem of ``update_file`` for a single file).

        Example::

            >>> RunOutput(folder="runs/x").update_paths(2)
            ['runs/x/shared_update.query0.msgpack', 'runs/x/shared_update.query1.msgpack']
        """
        single = self.update_file if self.update_file is not None else os.path.join(self.folder, UPDATE_FILE)
        stem, ext = os.path.splitext(single)
        return [single] if queries == 1 else [f"{stem}.query{q}{ext}" for q in range(queries)]

    def safetensors_paths(self, queries: int) -> list[str]:
        """The torch update file of each query: its ``update_paths`` entry as ``.safetensors``.

        ``fedjax_users.io.save_shared_safetensors`` writes its metadata JSON beside it
        (``fedjax_users.io.metadata_path``).

        Args:
          queries: the number of queries.

        Returns:
          One ``.safetensors`` path per query.

        Example::

            >>> RunOutput(folder=None, update_file="out/update.msgpack").safetensors_paths(1)
            ['out/update.safetensors']
        """
        from fedjax_users import io

        return [os.path.splitext(path)[0] + io.SAFETENSORS_SUFFIX for path in self.update_paths(queries)]

    def write(self, config: dict, summary: dict) -> list[str]:
        """Write ``config.yaml`` and ``summary.json`` into the run folder (nothing for a single update file).

        Args:
          config: the fully composed case, as plain containers.
          summary: what was computed (NumPy scalars and arrays are written as JSON numbers and lists).

        Returns:
          The paths written.

        Example::

            >>> import os, tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     [os.path.basename(p) for p in RunOutput(folder=folder).write({"model": "lenet_zhu"}, {"norm": 1.5})]
            ['config.yaml', 'summary.json']
        """
        if self.folder is None:
            return []
        from omegaconf import OmegaConf

        paths = [os.path.join(self.folder, "config.yaml"), os.path.join(self.folder, "summary.json")]
        with open(paths[0], "w") as handle:
            handle.write(OmegaConf.to_yaml(OmegaConf.create(config)))
        with open(paths[1], "w") as handle:
            json.dump(summary, handle, indent=1, default=_plain)
            handle.write("\n")
        return paths


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars and arrays that a summary may hold."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def prepare(out: Optional[str], case_name: str, force: bool, root: str = ".") -> RunOutput:
    """Decide, before any computation, where a run writes, and create its folder.

    Args:
      out: ``--out``: a folder for the run, a path ending in ``.msgpack`` for the update alone (its
        torch pair goes beside it, ``.safetensors`` and ``.metadata.json`` of the same stem), or
        ``None`` for ``<root>/runs/<case_name>-<timestamp>/``.
      case_name: names the default folder.
      force: write into an ``out`` that already exists.
      root: the folder that holds ``runs/`` (default: the current folder).

    Returns:
      The :class:`RunOutput` to write to.

    Raises:
      SharedFileError: ``out`` exists and ``force`` is off, or it cannot be written.

    Example::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     open(os.path.join(folder, "summary.json"), "w").close()  # a run is there
        ...     prepare(folder, "default", force=False)
        Traceback (most recent call last):
        ...
        fedjax_users.io.SharedFileError: run folder ... already holds a run: name another --out, or add --force
    """
    from fedjax_users import io

    if out is not None and out.endswith(".msgpack"):
        output = RunOutput(folder=None, update_file=out)
        # The torch pair beside it (same stem) is written too: an existing one is as much a run.
        tensors = output.safetensors_paths(1)[0]
        existing = [path for path in (out, tensors, io.metadata_path(tensors)) if os.path.exists(path)]
        if existing and not force:
            raise SharedFileError(f"{existing[0]} exists: name another --out, or add --force to write over it")
        io.check_writable(out)
        return output
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = os.path.join(root, "runs", f"{_slug(case_name)}-{stamp}")
        folder, n = base, 1
        while os.path.exists(folder):  # two runs in the same second keep both
            n += 1
            folder = f"{base}-{n}"
    else:
        folder = out
        if os.path.isfile(folder):
            raise SharedFileError(f"--out {folder} is a file: name a folder (or a .msgpack file for the update alone)")
        if os.path.isdir(folder) and os.listdir(folder) and not force:
            raise SharedFileError(f"run folder {folder} already holds a run: name another --out, or add --force")
    # Checked now, created only when there is something to write: a run that fails leaves nothing.
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise SharedFileError(f"cannot create the run folder {folder}: {existing} is not a writable folder")
    return RunOutput(folder=folder)


def run_id(config_yaml: str, seed: int) -> str:
    """What identifies a run's computation: its composed config and seed (a checkpoint of another is refused).

    Args:
      config_yaml: the composed case as YAML text.
      seed: the run's seed.

    Returns:
      16 hexadecimal digits of the SHA-256 of both.

    Example::

        >>> run_id("model: lenet_zhu", 0) == run_id("model: lenet_zhu", 0) != run_id("model: lenet_zhu", 1)
        True
    """
    import hashlib

    return hashlib.sha256(f"{config_yaml}\nseed={seed}".encode()).hexdigest()[:16]


def versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    """Installed versions of packages.

    Args:
      names: distribution names (default: those a run's numbers depend on).

    Returns:
      Name -> its installed version, ``"-"`` for one that is not installed.

    Example::

        >>> versions(["numpy", "no-such-package"])["no-such-package"]
        '-'
    """
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found
