"""Digests of what our users compute for the parity grid's cases: a refactor's proof of "nothing changed".

A parity row says our result is within a bound of the reference; a refactor of the core promises
more: the same bits. ``python -m parity.digest --json before.json`` runs our side only of each case
(the drop-in users, as ``check_parity`` runs them: noise off, then the case's noise on) and
records a SHA-256 of every tensor the server and the attacker would see; ``--compare a.json
b.json`` names the cases and tensors whose bits differ. The reference is not run, so the quick
grid's 51 cases take minutes, not the grid's ten.

Run it on the code before a change (``git worktree add /tmp/before HEAD``, then from that folder)
and after it, then compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np
import torch

from fedjax_users.interop import parity_check
from parity import cases as grid
from parity import harness


def _flatten(value: Any, prefix: str, into: dict[str, str]) -> None:
    """``{"shared/gradients/0": sha256, ...}`` for every tensor or array in ``value``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) or np.isscalar(value):
        array = np.ascontiguousarray(np.asarray(value))
        into[prefix] = f"{array.dtype}{list(array.shape)}:{hashlib.sha256(array.tobytes()).hexdigest()[:16]}"
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _flatten(value[key], f"{prefix}/{key}", into)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}/{i}", into)
    elif value is not None and not isinstance(value, str):
        into[prefix] = repr(value)


def case_digest(case: grid.Case) -> dict[str, str]:
    """Digests of our outputs for ``case``: with its noise off and (if it has noise) on.

    Both runs take the noise-off run's key (``jax.random.key(case.seed)``), as the digests recorded
    so far do: the noised digest pins our noise draws; it is not the comparison's noisy run.
    """
    setting, torch_model, users_data = harness.case_setting(case)
    key = jax.random.key(case.seed)
    outputs = {"clean": parity_check.run_drop_in(setting, torch_model, users_data, setting.clean_cfg, key)}
    if setting.noisy:
        outputs["noised"] = parity_check.run_drop_in(setting, torch_model, users_data, setting.cfg, key)
    digests: dict[str, str] = {}
    _flatten(outputs, "", digests)
    return digests


def compare(before: dict, after: dict) -> list[str]:
    """Lines naming each case and tensor whose digest differs, or that one side lacks."""
    lines = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            lines.append(f"{name}: only in {'the second' if a is None else 'the first'}")
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                lines.append(f"{name} {key}: {a.get(key)} != {b.get(key)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.digest", description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the digests of the quick grid (or --cases) here")
    parser.add_argument("--cases", nargs="+", help="exact case names (default: the quick grid)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two digest files")
    parser.add_argument("--precision", choices=("float32", "float64"),
                        help="one precision only (float64 needs JAX's x64 mode from the start: a child process)")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.load(open(path)) for path in args.compare)
        lines = compare(before, after)
        print("\n".join(lines) if lines else f"{len(before)} cases, every tensor bit-identical")
        return 1 if lines else 0
    chosen = grid.all_cases(quick=True)
    if args.cases:
        by_name = grid.cases_by_name()
        chosen = [by_name[name] for name in args.cases]
    digests = {}
    if args.precision is None and any(c.precision == "float64" for c in chosen):
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            part = os.path.join(folder, "float64.json")
            names = [c.name for c in chosen if c.precision == "float64"]
            subprocess.run([sys.executable, "-m", "parity.digest", "--precision", "float64", "--json", part,
                            "--cases", *names], check=True)
            digests.update(json.load(open(part)))
    if args.precision == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    chosen = [c for c in chosen if c.precision == (args.precision or "float32")]
    for i, case in enumerate(chosen):
        digests[case.name] = case_digest(case)
        print(f"[{i + 1}/{len(chosen)}] {case.name}: {len(digests[case.name])} tensors", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(digests, handle, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
