"""Why does the same test suite take 21 minutes one day and 47 the next? Time a test file under load.

``python -m benchmarks.studies.suite_load [TEST_FILE] [--hogs 0,1,2] [--cache off|cold|warm]``
runs ``pytest TEST_FILE`` in a fresh process once per entry of ``--hogs``, each time beside that
many busy-looping processes (what another job on the 2 cores does to it), and prints the wall
time, the CPU time the run got, its involuntary context switches (the kernel taking the core
away) and the largest memory of any run so far. ``--cache off`` (the default) disables JAX's persistent compilation
cache so that every run compiles what the suite compiles on a fresh machine; ``cold`` gives each
run an empty cache, ``warm`` one filled by a first, untimed run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time


def _spin(stop) -> None:  # a CPU-bound neighbour: another job on the same cores
    while not stop.is_set():
        sum(range(10_000))


def run_once(test_file: str, hogs: int, cache_dir: str) -> dict:
    """One pytest run of ``test_file`` beside ``hogs`` busy processes; its wall, CPU and switches."""
    stop = multiprocessing.Event()
    neighbours = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(hogs)]
    for process in neighbours:
        process.start()
    env = dict(os.environ, FEDJAX_USERS_TEST_JAX_CACHE=cache_dir,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider",
                           "-m", "not slow and not heavy"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    for process in neighbours:
        process.join()
    return dict(hogs=hogs, wall_s=round(wall, 1), cpu_s=round(after.ru_utime + after.ru_stime
                                                                - before.ru_utime - before.ru_stime, 1),
                involuntary_switches=after.ru_nivcsw - before.ru_nivcsw,
                largest_rss_so_far_mib=round(after.ru_maxrss / 1024), passed=done.returncode == 0,
                summary=next((line for line in reversed(done.stdout.splitlines()) if " passed" in line or " failed" in line),
                             "(no summary)"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_file", nargs="?", default="tests/test_users.py")
    parser.add_argument("--hogs", default="0,1,2", help="busy neighbours per run, comma-separated")
    parser.add_argument("--cache", choices=("off", "cold", "warm"), default="off")
    args = parser.parse_args(argv)
    print(f"{args.test_file}, {os.cpu_count()} CPUs, compilation cache {args.cache}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache == "warm":
            run_once(args.test_file, 0, tmp)
        for index, hogs in enumerate(int(h) for h in args.hogs.split(",")):
            cache = "" if args.cache == "off" else (tmp if args.cache == "warm" else os.path.join(tmp, str(index)))
            row = run_once(args.test_file, hogs, cache)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
