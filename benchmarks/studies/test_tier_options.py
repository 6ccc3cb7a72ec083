"""What would make ``make test`` cheaper? One test file under XLA options and with or without coverage.

``python -m benchmarks.studies.test_tier_options [TEST_FILE ...] [--variants NAME ...]`` runs
``pytest TEST_FILE -m "not slow and not heavy"`` in a fresh process once per variant, with JAX's
persistent compilation cache off (each run compiles what a fresh clone compiles), and prints
the wall time of each. Every variant starts from ``make test``'s own ``XLA_FLAGS``
(four CPU devices, LLVM optimisation level 1):

* ``baseline``: those flags, no coverage;
* ``codegen-split-1``: ``--xla_cpu_parallel_codegen_split_count=1`` (one LLVM module per program
  instead of several compiled in parallel);
* ``no-expensive-llvm``: ``--xla_llvm_disable_expensive_passes=true``;
* ``coverage``: the baseline under ``--cov=fedjax_users``, as ``make test`` runs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

MAKE_TEST_FLAGS = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=1"
VARIANTS = {
    "baseline": ("", []),
    "codegen-split-1": ("--xla_cpu_parallel_codegen_split_count=1", []),
    "no-expensive-llvm": ("--xla_llvm_disable_expensive_passes=true", []),
    "coverage": ("", ["--cov=fedjax_users", "--cov-report="]),
}


def run(test_file: str, variant: str) -> tuple[float, int]:
    """Wall seconds and exit status of one pytest run of ``test_file`` under ``variant``."""
    extra_flags, extra_args = VARIANTS[variant]
    env = dict(os.environ, XLA_FLAGS=f"{MAKE_TEST_FLAGS} {extra_flags}".strip(), FEDJAX_USERS_TEST_JAX_CACHE="")
    command = [sys.executable, "-m", "pytest", test_file, "-m", "not slow and not heavy", "-q",
               "-p", "no:randomly", "-p", "no:cacheprovider", *extra_args]
    start = time.perf_counter()
    status = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - start, status


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=["tests/test_semantics.py"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    for test_file in args.files:
        for variant in args.variants:
            seconds, status = run(test_file, variant)
            print(f"{test_file:40s} {variant:18s} {seconds:7.1f} s{'' if status == 0 else f'  (exit {status})'}",
                  flush=True)


if __name__ == "__main__":
    main()
