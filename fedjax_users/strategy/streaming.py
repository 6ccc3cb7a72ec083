"""Users streamed a chunk at a time from a ``fedjax_users.cohort.Cohort``, resumable after an interruption.

In memory, ``aggregate`` places every user on the devices and each step reads a chunk of them in
place (``chunking.run_chunk``): device ``d`` holds users ``d * per_device ...`` (the last device's
block padded with copies of the last user) and runs their ``chunk``-th block of ``size``, the
last block shifted back to end at its last user. ``ChunkPlan`` names, on the host, exactly the
users each chunk holds in that layout; ``stream_chunks`` reads them from the cohort (Grain:
threads decode the next chunks while the current one computes) and hands each chunk to the same
compiled chunk program as a cohort of its own. The users, their keys, the order of the sums and
the program are those of the in-memory run, so the result is the same bit for bit (tested).

A ``Checkpoint`` saves the running sum, the users' outputs so far and the next chunk with orbax
every ``every`` chunks; a run given the same checkpoint folder resumes from it and gives the
uninterrupted result. Peak memory is a few chunks' examples, plus the users' outputs (their
BatchNorm statistics, when the server sends no buffers), whatever the cohort's size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from fedjax_users.strategy import chunking

PyTree = Any
LOGGER = logging.getLogger(__name__)
# (chunk, this process's users' examples, every user's positions, kept, which of them are this
# process's) -> (summed update, outputs)
ChunkStep = Callable[[int, dict, np.ndarray, np.ndarray, np.ndarray], tuple[PyTree, PyTree]]

__all__ = ["Checkpoint", "ChunkPlan", "stream_chunks"]


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """The users of each chunk, device by device, as ``chunking.run_chunk`` reads stacked users.

    Attributes:
      num_users: users in the cohort.
      groups: devices the users are split over.
      per_device: users each device holds (padding included).
      size: users a device runs at a time.

    Example::

        >>> plan = ChunkPlan(num_users=5, groups=1, per_device=5, size=2)
        >>> plan.chunks
        3
    """

    num_users: int
    groups: int
    per_device: int
    size: int

    @property
    def chunks(self) -> int:
        """How many chunks cover a device's users."""
        return chunking.num_chunks(self.per_device, self.size)

    def positions(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``chunk``'s users and which of them are kept.

        A user is kept when it is real (not padding) and not already summed by the chunk before
        (the shifted last chunk repeats some).

        Args:
          chunk: the chunk, ``0 <= chunk < self.chunks``.

        Returns:
          ``(positions, kept)``, both ``[groups * size]``: the users each device runs, group by
          group (padding repeats the last user), and whether each counts.

        Example::

            >>> positions, kept = ChunkPlan(num_users=5, groups=1, per_device=5, size=2).positions(2)
            >>> positions.tolist(), kept.tolist()  # the last chunk, shifted back: user 3 was chunk 1's
            ([3, 4], [False, True])
        """
        start = min(chunk * self.size, self.per_device - self.size)
        offsets = start + np.arange(self.size)
        stacked = (np.arange(self.groups)[:, None] * self.per_device + offsets[None, :]).ravel()
        kept = (stacked < self.num_users) & np.tile(offsets >= chunk * self.size, self.groups)
        return np.minimum(stacked, self.num_users - 1), kept

    def fingerprint(self) -> dict:
        """What a checkpoint records of the plan, to refuse resuming another one.

        Returns:
          The fields as a plain dict.
        """
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where and how often a streamed aggregate saves its progress.

    Attributes:
      directory: the folder of the checkpoints (made if missing). A folder that holds a
        checkpoint of the same run (same users, chunks and ``run_id``) is resumed from.
      every: save after every this many chunks (default: every chunk unless ``seconds`` is given).
      seconds: save when this long has passed since the last save (or the start).
      run_id: what else identifies the run (the config, the key); a checkpoint of another run
        in ``directory`` is an error, not resumed.
    """

    directory: str
    every: Optional[int] = None
    seconds: Optional[float] = None
    run_id: str = ""

    def __post_init__(self):
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"Checkpoint.every must be a positive integer, got {self.every!r}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"Checkpoint.seconds must be positive, got {self.seconds!r}")


class _Saver:
    """orbax's CheckpointManager over ``Checkpoint.directory``, keeping the latest step only."""

    def __init__(self, checkpoint: Checkpoint, plan: ChunkPlan):
        import orbax.checkpoint as ocp

        if jax.process_count() > 1:
            # The saved state is gathered on the host; across processes it would need orbax's
            # distributed save of global arrays, which no test here covers yet.
            raise ValueError("a checkpointed aggregate runs in one process; run it without checkpoint= "
                             "across several")

        self.ocp = ocp
        self.directory = os.path.abspath(checkpoint.directory)
        self.every = checkpoint.every if checkpoint.every or checkpoint.seconds else 1
        self.seconds, self.last = checkpoint.seconds, time.monotonic()
        identity = {"plan": plan.fingerprint(), "run_id": checkpoint.run_id}
        os.makedirs(self.directory, exist_ok=True)
        marker = os.path.join(self.directory, "run.json")
        if os.path.exists(marker):
            with open(marker) as handle:
                held = json.load(handle)
            if held != identity:
                raise ValueError(
                    f"checkpoint folder {checkpoint.directory} holds another run ({held}); name another folder"
                )
        else:
            with open(marker, "w") as handle:
                json.dump(identity, handle)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.directory, "steps"), options=ocp.CheckpointManagerOptions(max_to_keep=1)
        )

    def restore(self) -> Optional[tuple[int, dict]]:
        """(chunks done, {"total": leaves, "outputs": leaves}) of the latest checkpoint, or ``None``."""
        step = self.manager.latest_step()
        if step is None:
            return None
        state = self.manager.restore(step, args=self.ocp.args.StandardRestore())
        return step, {name: [np.asarray(leaf) for leaf in _as_list(state[name])] for name in ("total", "outputs")}

    def save(self, done: int, total: PyTree, outputs: list, final: bool) -> None:
        due = (self.every and done % self.every == 0) or (self.seconds and time.monotonic() - self.last >= self.seconds)
        if due or final:
            self.last = time.monotonic()
            # Leaves only: the trees' structure is the chunk program's, rebuilt from its next output.
            state = {"total": [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(total)],
                     "outputs": jax.tree_util.tree_leaves(_stack(outputs))}
            self.manager.save(done, args=self.ocp.args.StandardSave(state), force=True)
            self.manager.wait_until_finished()


def _as_list(value) -> list:
    """orbax gives a saved list back as a list, or as a mapping of its indices."""
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=int)]
    return list(value)


def _local_groups(plan: ChunkPlan, devices: Optional[tuple]) -> np.ndarray:
    """The groups (devices, in mesh order) whose users this process reads."""
    if not devices or jax.process_count() == 1:
        return np.arange(plan.groups)
    return np.asarray([g for g, d in enumerate(devices) if d.process_index == jax.process_index()])


def _reader(cohort, plan: ChunkPlan, groups: np.ndarray, first_chunk: int, threads: int, prefetch: int) -> Iterator:
    """Chunks ``first_chunk ..`` of this process's users, decoded ahead in Grain's threads."""
    import grain

    per_chunk = len(groups) * plan.size
    positions = np.concatenate(
        [plan.positions(c)[0].reshape(plan.groups, plan.size)[groups].ravel() for c in range(first_chunk, plan.chunks)]
    ) if first_chunk < plan.chunks else np.zeros((0,), np.int64)

    def load(position):
        inputs, labels = cohort.load_user(int(position))
        return {"inputs": inputs, "labels": labels}

    dataset = grain.MapDataset.source(positions).map(load).batch(per_chunk)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def stream_chunks(
    step: ChunkStep,
    cohort,
    plan: ChunkPlan,
    devices: Optional[tuple] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    checkpoint: Optional[Checkpoint] = None,
    on_load: Optional[Callable[[dict], None]] = None,
    threads: int = 2,
    prefetch: int = 2,
) -> tuple[PyTree, PyTree]:
    """Every chunk of ``cohort`` through ``step``: the summed update and the outputs in user order.

    Args:
      step: runs one chunk: ``step(chunk, examples, positions, kept, local)`` with this process's
        users' ``{"inputs", "labels"}`` stacked ``[local groups * size, ...]``, every group's
        ``positions`` and ``kept`` ``[groups * size]``, and ``local``, the indices into them of
        this process's users; returns the kept users' summed update and their outputs
        ``[1, groups, size, ...]`` (``chunking.sum_chunks``'s ``step`` for one chunk).
      cohort: a ``fedjax_users.cohort.Cohort``.
      plan: which users each chunk holds.
      devices: the mesh's devices in order (``None``: one device); a process reads the users of
        its own devices only.
      progress: ``progress(users done, users)``, before the first chunk and after each.
      checkpoint: save progress there, and resume from what it holds.
      on_load: called with each chunk's examples as they arrive (checks on the host).
      threads, prefetch: Grain's decoding threads and chunks read ahead.

    Returns:
      The summed update and the outputs ``[num_users, ...]`` (as ``chunking.sum_chunks``).

    Example::

        >>> import numpy as np
        >>> from fedjax_users.cohort import FunctionCohort
        >>> cohort = FunctionCohort(5, lambda i: (np.full((1,), float(i)), np.zeros(1)))
        >>> def step(chunk, examples, positions, kept, local):  # each user's update is its one input
        ...     x = examples["inputs"][:, 0]
        ...     return np.sum(x * kept), x[None, None]
        >>> total, outputs = stream_chunks(step, cohort, ChunkPlan(num_users=5, groups=1, per_device=5, size=2))
        >>> float(total), outputs.tolist()
        (10.0, [0.0, 1.0, 2.0, 3.0, 4.0])
    """
    saver = None if checkpoint is None else _Saver(checkpoint, plan)
    found = None if saver is None else saver.restore()
    start = 0 if found is None else found[0]
    total, outputs = None, []
    if progress is not None:
        progress(_users_done(plan, start), plan.num_users)
    groups = _local_groups(plan, devices)
    local = (groups[:, None] * plan.size + np.arange(plan.size)[None, :]).ravel()
    # A resumed run reads again the last chunk it finished (only to learn the trees' structure)
    # when nothing is left to compute.
    first = min(start, plan.chunks - 1)
    reader = _reader(cohort, plan, groups, first, threads, prefetch)
    waited, started = 0.0, time.perf_counter()
    for chunk in range(first, plan.chunks):
        before = time.perf_counter()
        examples = next(reader)
        waited += time.perf_counter() - before
        if on_load is not None:
            on_load(examples)
        positions, kept = plan.positions(chunk)
        chunk_total, chunk_outputs = step(chunk, examples, positions, kept, local)
        if found is not None:  # the saved leaves in this program's trees
            saved_total, saved_outputs = found[1]["total"], found[1]["outputs"]
            # As device arrays: what follows (the mean) must run where the uninterrupted run's does.
            total = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(chunk_total),
                                                 [jax.numpy.asarray(leaf) for leaf in saved_total])
            structure = jax.tree_util.tree_structure(chunk_outputs)
            outputs = list(_unstack(jax.tree_util.tree_unflatten(structure, saved_outputs), start))
            found = None
            if chunk < start:
                continue
        total = chunk_total if total is None else chunking.tree_add(total, chunk_total)
        outputs.append(chunk_outputs)
        done = chunk + 1
        if saver is not None:
            saver.save(done, total, outputs, final=done == plan.chunks)
        if progress is not None:
            jax.block_until_ready(total)
            progress(_users_done(plan, done), plan.num_users)
    ordered = jax.tree_util.tree_map(
        lambda *o: chunking.in_user_order(o, plan.chunks, plan.per_device, plan.size, plan.num_users), *outputs
    )
    # How long the computation waited for data: what a faster reader would save. Logged, not
    # printed: fedjax-users run shows it, a library caller may listen (logging.getLogger(__name__)).
    LOGGER.info("streamed %d chunks; waited %.3f s for data of %.3f s", plan.chunks - start, waited,
                time.perf_counter() - started, extra={"waited_s": waited, "seconds": time.perf_counter() - started,
                                                      "chunks": plan.chunks - start})
    return total, ordered


def _users_done(plan: ChunkPlan, chunks_done: int) -> int:
    return min(plan.num_users, plan.groups * min(plan.per_device, chunks_done * plan.size))


def _stack(outputs: list) -> PyTree:
    """Per-chunk outputs ``[1, groups, size, ...]`` as one tree ``[chunks, groups, size, ...]``."""
    return jax.tree_util.tree_map(lambda *o: np.concatenate([np.asarray(a) for a in o]), *outputs)


def _unstack(stacked: PyTree, chunks: int) -> Iterator[PyTree]:
    for c in range(chunks):
        yield jax.tree_util.tree_map(lambda a: a[c : c + 1], stacked)
