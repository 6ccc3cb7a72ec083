"""``fedjax-users``: run a case (``run``), the parity suite (``parity``) or the benchmarks (``bench``).

``parity`` and ``bench`` run from a checkout of the repository; the wheel holds ``fedjax_users`` only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

USER_MISTAKES = (ValueError, FileNotFoundError, KeyError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedjax-users", description="breaching's federated-learning users as pure JAX functions."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="build a case's users and compute what they share")
    run.add_argument("case", nargs="?", help="case YAML (default: the embedded digits case)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. user.num_local_updates=8")
    run.add_argument("--out", default="shared_update.msgpack", help="where to save the shared update")
    run.add_argument("--seed", type=int, default=0, help="PRNG seed for noise and random partitions")
    run.add_argument("--no-progress", action="store_true", help="no progress bar for many users")
    commands.add_parser("parity", help="run the parity suite (python -m parity)", add_help=False)
    commands.add_parser("bench", help="run the benchmarks (python -m benchmarks)", add_help=False)
    return parser


def _split_case_argument(case: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """``fedjax-users run key=value`` (no case file) treats the first word as an override."""
    if case is not None and "=" in case and not os.path.exists(case):
        return None, [case] + overrides
    return case, overrides


def _parameter_count(tree) -> int:
    import jax

    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def _describe_metadata(metadata) -> str:
    parts = []
    if metadata.num_data_points is not None:
        parts.append(f"num_data_points={metadata.num_data_points}")
    if metadata.num_users is not None:
        parts.append(f"num_users={metadata.num_users}")
    if metadata.labels is not None:
        labels = [int(v) for v in metadata.labels.ravel()[:16]]
        parts.append(f"labels={labels}{'...' if metadata.labels.size > 16 else ''}")
    if metadata.data_key is not None:
        parts.append(f"data_key={metadata.data_key}")
    hyper = metadata.local_hyperparams
    if hyper is not None:
        parts.append(f"local_hyperparams(lr={hyper.lr}, steps={hyper.steps}, data_per_step={hyper.data_per_step})")
    return ", ".join(parts) or "nothing"


def _compute(case, key, progress: bool):
    """Run the case's user computation; returns (shared, seconds of first call, seconds of second)."""
    import jax

    import fedjax_users as fu
    from fedjax_users.progress import TextProgress

    cfg = case.user_cfg
    if cfg.user_type == "multiuser_aggregate":
        def call():
            # Only the first call reports progress: waiting on each chunk would slow the timed one.
            bar = TextProgress(label="users (first call, with compile) ") if progress else None
            return fu.aggregate(case.model, case.payload, case.data, cfg, key, loss=case.loss, progress=bar)[0]
    else:
        compute = fu.local_update if cfg.user_type == "local_update" else fu.local_gradient

        def call():
            return compute(case.model, case.payload, case.data, cfg, key, loss=case.loss)[0]

    timings = []
    for _ in range(2):
        start = time.perf_counter()
        shared = call()
        jax.block_until_ready(shared.gradients)
        timings.append(time.perf_counter() - start)
        progress = False
    return shared, timings[0], timings[1]


def run(args) -> int:
    """``fedjax-users run``: build the users of a case, compute, summarise, save."""
    import jax
    import jax.numpy as jnp
    from omegaconf import OmegaConf

    from fedjax_users import io, privacy
    from fedjax_users.data import construct_users, load_case

    case_path, overrides = _split_case_argument(args.case, list(args.overrides))
    cfg_case = load_case(case_path, overrides)
    key = jax.random.key(args.seed)
    case = construct_users(cfg_case, key)
    cfg = case.user_cfg
    shared, first, steady = _compute(case, key, progress=not args.no_progress)
    examples = int(case.data.labels.shape[0] * (case.data.labels.shape[1] if cfg.user_type ==
                                                "multiuser_aggregate" else 1))
    num_users = cfg.num_users if cfg.user_type == "multiuser_aggregate" else 1
    kind = "parameter difference" if cfg.is_multi_step else "gradient"
    print(f"case        {cfg_case.get('name', case_path or 'default')}")
    print(f"user type   {cfg.user_type} ({num_users} user{'s' if num_users > 1 else ''}, "
          f"{cfg.num_data_points} examples each, user index {', '.join(map(str, case.user_indices[:8]))}"
          f"{'...' if len(case.user_indices) > 8 else ''})")
    print(f"data        {case.data_cfg.name}, {examples} examples held, inputs {tuple(case.data.inputs.shape)}")
    print(f"model       {cfg_case.model}, {_parameter_count(case.payload.params):,} parameters, "
          f"BatchNorm {'eval mode (server buffers)' if case.payload.batch_stats is not None else 'train mode'}")
    print(f"update      {kind}, global norm {float(privacy.global_norm(shared.gradients)):.6g}")
    print(f"server sees {_describe_metadata(shared.metadata)}"
          f"{', buffers' if shared.batch_stats is not None else ''}")
    print(f"wall time   {steady * 1e3:.1f} ms steady state, {max(first - steady, 0.0):.2f} s compile "
          f"(first call {first:.2f} s) on {jax.devices()[0].platform}")
    io.save_shared(args.out, shared, OmegaConf.to_container(cfg_case, resolve=True))
    print(f"saved       {args.out} (load with fedjax_users.io.load_shared)")
    del jnp
    return 0


# The parity suite and the benchmarks need torch and breaching and are not part of the wheel:
# they run from a checkout of the repository, as ``python -m parity`` / ``python -m benchmarks``.
CHECKOUT_SUITES = {"parity": ("parity", "main", []), "bench": ("benchmarks", "main", ["--quick"])}


def find_checkout(start: Optional[str] = None, package_parent: Optional[str] = None) -> Optional[str]:
    """The repository checkout holding ``parity/`` and ``benchmarks/``: ``start`` (default: the
    current folder) or one above it, else ``package_parent`` (default: the folder above this
    ``fedjax_users``, a checkout when installed with ``pip install -e``); ``None`` if none is."""
    here = os.path.abspath(start or os.getcwd())
    package_parent = package_parent or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [here, *_parents(here), package_parent]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name, "__main__.py")) for name in ("parity", "benchmarks")):
            return folder
    return None


def _parents(folder: str) -> list[str]:
    parents = []
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        parents.append(folder)
    return parents


def _run_checkout_suite(command: str, argv: list[str]) -> int:
    """``fedjax-users parity|bench``: run that suite from the repository checkout, or say how."""
    import importlib

    module_name, entry, default_argv = CHECKOUT_SUITES[command]
    checkout = find_checkout()
    if checkout is None:
        print(
            f"fedjax-users: error: `{command}` runs from a checkout of the fedjax_users repository "
            f"(it is not in the wheel): clone it, cd into it and run `python -m {module_name}`",
            file=sys.stderr,
        )
        return 2
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    module = importlib.import_module(f"{module_name}.__main__" if module_name == "parity" else module_name)
    return getattr(module, entry)(argv or default_argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fedjax-users`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["parity"], ["bench"]):
        return _run_checkout_suite(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except USER_MISTAKES as err:
        # A user mistake (bad case, missing data folder, bad config) is one line, not a traceback.
        print(f"fedjax-users: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
