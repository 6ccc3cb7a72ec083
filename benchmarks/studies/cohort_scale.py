"""Peak memory and wall time of an aggregate against the size of its cohort (issue 28).

``python -m benchmarks.studies.cohort_scale --workload lenet-cifar --users 100 1000 10000``
``python -m benchmarks.studies.cohort_scale --workload resnet18-imagenet --users 100 1000``
``python -m benchmarks.studies.cohort_scale --workload resnet18-imagenet --users 1 3 --per-user 1000``
(the case's own 1,000 images a user: each user's examples then run a chunk at a time,
``fedjax_users.strategy.examples``)

Each size runs breaching's ``8_industry_scale_fl`` case file through ``fedjax-users run`` in a
fresh process (so each has its own peak), with ``user.user_range=[0, USERS]``,
``data.default_clients=USERS``, ``user.num_data_points=2`` (``--per-user``) and ``data.partition=random`` (the
case's ``balanced`` partition needs an example of every one of the 397 classes for every user: 397
images a user). ``lenet-cifar``: lenet_zhu on breaching's synthetic images at CIFAR's 32x32;
``resnet18-imagenet``: the case's own ResNet18 on a generated ImageNet folder (``val/<wnid>/*.JPEG``,
397 classes, 500x375 JPEGs as ImageNet's validation images are about, decoded, resized to 256 and
centre-cropped to 224 as breaching's validation transforms do), written once under ``--data``.

Printed per size: wall time of the process, its peak resident memory (``ru_maxrss`` of that child),
the first query's time, and how long the users waited for their examples (``fedjax-users run``'s
``summary.json``). ``--json FILE`` keeps the rows. ``--reader`` instead times the reader alone
(the case's cohort read through Grain's threads as ``aggregate`` reads it, nothing computed): the
images a second the data path delivers on this machine, against what the computation consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CASE = "8_industry_scale_fl"
PER_USER = 2
ANIMAL_CLASSES = 397


def write_imagenet_folder(root: str, images: int, size: tuple[int, int] = (500, 375)) -> str:
    """``root/val/<wnid>/<wnid>_<i>.JPEG``: ``images`` random JPEGs over the 397 animal classes (kept if present)."""
    import numpy as np
    from PIL import Image

    marker = os.path.join(root, f".written-{images}")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(0)
    per_class = -(-images // ANIMAL_CLASSES)
    for label in range(ANIMAL_CLASSES):
        folder = os.path.join(root, "val", f"n{label:08d}")
        os.makedirs(folder, exist_ok=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"n{label:08d}_{j}.JPEG"), quality=90)
    open(marker, "w").close()
    return root


def overrides(workload: str, users: int, data: str, per_user: int = PER_USER) -> list[str]:
    common = [f"user.user_range=[0,{users}]", f"data.default_clients={users}", f"user.num_data_points={per_user}",
              "data.partition=random", "server.pretrained=False"]
    if workload == "lenet-cifar":
        return common + ["data=synthetic", "data.like=CIFAR10", "data.shape=[3,32,32]", f"data.size={users * per_user}", "model=lenet_zhu"]
    return common + [f"data.path={write_imagenet_folder(data, users * per_user)}"]


def run_size(workload: str, users: int, data: str, per_user: int = PER_USER) -> dict:
    """One ``fedjax-users run`` of the case at ``users`` users, in its own process."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "fedjax_users.cli", "run", CASE, *overrides(workload, users, data, per_user),
                   "--out", os.path.join(out, "run"), "--quiet"]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        stdout, stderr = process.stdout.read(), process.stderr.read()
        if status != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
        summary = json.load(open(os.path.join(out, "run", "summary.json")))
    seconds = summary["seconds"]
    return dict(workload=workload, users=users, per_user=per_user, wall_s=round(wall, 1), peak_rss_mib=round(usage.ru_maxrss / 1024),
                first_call_s=round(seconds["first_call"], 1), streaming_s=round(seconds["streaming"] or 0, 1),
                waiting_for_data_s=round(seconds["waiting_for_data"] or 0, 2),
                waiting_share=round((seconds["waiting_for_data"] or 0) / (seconds["streaming"] or 1), 3),
                last_line=stdout.strip().splitlines()[-2] if stdout.strip() else "")


def reader_rate(workload: str, users: int, data: str, threads: int = 2) -> dict:
    """Images a second of the case's cohort read chunk by chunk in Grain's threads, nothing computed."""
    import jax

    from fedjax_users.data import catalog, construct_users, load_case
    from fedjax_users.strategy import streaming

    cfg_case = load_case(catalog.resolve(CASE), overrides(workload, users, data))
    cohort = construct_users(cfg_case, jax.random.key(0), stream=True).data
    plan = streaming.ChunkPlan(len(cohort), 1, len(cohort), 1)
    reader = streaming._reader(cohort, plan, np.arange(1), 0, threads, 2)
    start = time.perf_counter()
    for _ in range(plan.chunks):
        next(reader)
    seconds = time.perf_counter() - start
    return dict(workload=workload, users=users, threads=threads, seconds=round(seconds, 2),
                images_per_s=round(users * PER_USER / seconds, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("lenet-cifar", "resnet18-imagenet"), default="lenet-cifar")
    parser.add_argument("--users", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "fedjax-users-imagenet-fake"),
                        help="where the generated ImageNet folder is written (kept between runs)")
    parser.add_argument("--per-user", type=int, default=PER_USER, help=f"examples a user (default {PER_USER})")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--reader", action="store_true", help="time the reader alone (no computation)")
    args = parser.parse_args(argv)
    if args.reader:
        for users in args.users:
            print(reader_rate(args.workload, users, args.data), flush=True)
        return 0
    rows = []
    print(f"{CASE}, {args.workload}, {args.per_user} examples a user, {os.cpu_count()} CPUs")
    print(f"{'users':>7} {'wall s':>8} {'peak MiB':>9} {'query s':>8} {'stream s':>9} {'waited s':>9} {'share':>6}")
    for users in args.users:
        row = run_size(args.workload, users, args.data, args.per_user)
        rows.append(row)
        print(f"{users:>7} {row['wall_s']:>8} {row['peak_rss_mib']:>9} {row['first_call_s']:>8} "
              f"{row['streaming_s']:>9} {row['waiting_for_data_s']:>9} {row['waiting_share']:>6.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
