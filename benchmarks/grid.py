"""The benchmark workloads: what is computed, on which model and at which size.

A workload is one user computation of the core at one size. Every user holds ``steps`` local
steps of ``batch`` examples (``local_gradient``: one step, the batch is the user's data), and an
``aggregate`` has ``users`` of them, so its floor is one batch gradient over ``examples``.
"""

from __future__ import annotations

import dataclasses

KINDS = ("local_gradient", "local_update", "aggregate")
GRIDS = ("smoke", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One point of the grid."""

    kind: str
    model: str
    batch: int
    steps: int = 1
    users: int = 1
    skip: tuple[str, ...] = ()  # contenders left out at this size (see the grid's notes)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    @property
    def examples(self) -> int:
        """Examples the workload differentiates through (the floor's batch size)."""
        return self.users * self.steps * self.batch

    @property
    def label(self) -> str:
        """Short human-readable size, e.g. ``B=64`` or ``U=100 x 4x2``."""
        if self.kind == "local_gradient":
            return f"B={self.batch}"
        if self.kind == "local_update":
            return f"{self.steps} steps x {self.batch}"
        return f"U={self.users} x {self.steps}x{self.batch}"


def _local_gradients(model: str, batches) -> list[Workload]:
    return [Workload("local_gradient", model, batch=b) for b in batches]


def _local_updates(model: str, batch: int, steps) -> list[Workload]:
    return [Workload("local_update", model, batch=batch, steps=s) for s in steps]


def _aggregates(model: str, users, steps: int = 4, batch: int = 2, breaching_up_to: int = 1000) -> list[Workload]:
    # 4 local steps of 2 examples: issue 5's reference MultiUserAggregate case (8 examples a user).
    return [
        Workload("aggregate", model, batch=batch, steps=steps, users=u, skip=("breaching",) * (u > breaching_up_to))
        for u in users
    ]


def _cpu_full() -> list[Workload]:
    # See CPU_CAPS for why the large models stop at small sizes.
    return (
        _local_gradients("lenet_zhu", (8, 32, 64, 128, 256))
        + _local_gradients("resnet18", (8, 32))
        + _local_gradients("ConvNet", (8,))
        + _local_updates("lenet_zhu", 8, (1, 4, 16))
        + _local_updates("resnet18", 2, (1, 4))
        + _local_updates("ConvNet", 2, (1, 4))
        + _aggregates("lenet_zhu", (10, 100, 1000))
        + _aggregates("resnet18", (4,), steps=2, batch=1)
        + _aggregates("ConvNet", (4,), steps=1, batch=1)
    )


def _accelerator_full() -> list[Workload]:
    models = ("lenet_zhu", "ConvNet", "resnet18")
    return (
        [w for m in models for w in _local_gradients(m, (8, 32, 64, 128, 256))]
        + [w for m in models for w in _local_updates(m, 8, (1, 4, 16))]
        + _aggregates("lenet_zhu", (10, 100, 1000, 10000))
        + _aggregates("ConvNet", (10, 100), breaching_up_to=10)
        + _aggregates("resnet18", (10, 100, 1000), breaching_up_to=100)
    )


CPU_CAPS = (
    "CPU grid capped: a ConvNet example costs ~10.6 GFLOP to train and a resnet18 one ~2.9 "
    "(lenet_zhu 0.004), and vectorised per-user convolution gradients run far below the batch "
    "gradient's speed on XLA:CPU, so on a few CPU cores ConvNet stops at batch 8 and resnet18 at 32 "
    "for local_gradient, both at 4 steps of 2 for local_update, and their aggregates at 4 users "
    "(ConvNet: one-example fedSGD users; resnet18: 2 local steps of 1 example). lenet_zhu covers "
    "batch 8-256, 1-16 steps and 10-1000 users; 10,000 users: see the memory runs."
)


ACCELERATOR_CAPS = (
    "breaching's MultiUserAggregate is left out above 1,000 lenet_zhu users, 100 resnet18 users and "
    "10 ConvNet users: it keeps a deep copy of the model per user on the host and runs users one by one."
)


def notes(name: str, accelerator: bool = False) -> list[str]:
    """What the grid leaves out on this device, for the report."""
    if name != "full":
        return []
    return [ACCELERATOR_CAPS] if accelerator else [CPU_CAPS]


def grid(name: str, accelerator: bool = False) -> list[Workload]:
    """The workloads of grid ``name`` (``smoke`` < ``quick`` < ``full``) for this kind of device."""
    if name == "smoke":
        return (
            _local_gradients("lenet_zhu", (2,))
            + _local_updates("lenet_zhu", 2, (2,))
            + _aggregates("lenet_zhu", (3,), steps=2, batch=1)
        )
    if name == "quick":
        return (
            _local_gradients("lenet_zhu", (8, 64))
            + _local_updates("lenet_zhu", 8, (4,))
            + _aggregates("lenet_zhu", (10, 100))
        )
    if name == "full":
        return _accelerator_full() if accelerator else _cpu_full()
    raise ValueError(f"unknown grid {name!r}; expected one of {', '.join(GRIDS)}")
