"""``python -m parity [--quick] [--json PATH] [--filter TEXT]``: run the parity grid and print the table.

float32 cases run in this process; float64 cases need ``jax_enable_x64`` before JAX computes
anything, so they run in a child process (``--precision float64``) whose rows are merged in.
Every row records the fingerprint of the code it ran on (``parity.fingerprint``);
``python -m parity --stale RESULTS.json [MORE.json ...]`` reruns only the rows of each file whose fingerprint
no longer matches today's code and writes each back in place as it finishes, so a stopped run
resumes where it stopped (``--list`` only names them); it fails if a row it reran, or a committed
row proven on today's code, fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the subset CI runs on every push")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--filter", default="",
                        help="only cases whose name contains this text (or one of several, comma-separated)")
    parser.add_argument("--precision", choices=("float32", "float64"), help="run one precision only")
    parser.add_argument("--verbose", action="store_true", help="print details of every case")
    parser.add_argument("--partial", metavar="PATH", help="rewrite PATH with the results so far after each case (the float64 child: "
                             "PATH with .float64 before its extension)")
    parser.add_argument("--cases", default="", help="only the cases with exactly these names (comma-separated)")
    parser.add_argument("--stale", metavar="RESULTS", nargs="+",
                        help="rerun the rows of each RESULTS file whose fingerprint differs from today's code, in place")
    parser.add_argument("--list", action="store_true", help="with --stale: name the stale rows, run nothing")
    parser.add_argument("--into", metavar="RESULTS", help="write each row into RESULTS as it finishes, in place of the row "
                        "of its name or after the others (what --stale does; its float64 child is given it too)")
    # --filter also narrows --stale: a results file too long to rerun at once (the zoo's 320 rows)
    # is brought up to date a model at a time, each row written back in place as it finishes.
    return parser.parse_args(argv)


def _matches(name: str, filter_text: str) -> bool:
    """Whether a case name contains the ``--filter`` text (or one of several, comma-separated)."""
    return not filter_text or any(text in name for text in filter_text.split(","))


def _selected(case, args) -> bool:
    if args.cases:
        return case.name in args.cases.split(",")
    return _matches(case.name, args.filter)


def _run(precision, args):
    import jax

    if precision == "float64":
        jax.config.update("jax_enable_x64", True)
    from parity.cases import all_cases, cases_by_name
    from parity.fingerprint import fingerprint
    from parity.harness import Result, run_case

    results, fingerprints = [], {}
    if args.cases:  # exact names may come from either grid
        cases = [c for c in cases_by_name().values() if c.precision == precision]
    else:
        cases = all_cases(quick=args.quick, precision=precision)
    for case in cases:
        if not _selected(case, args):
            continue
        fingerprints[case.name] = fingerprint(case)
        start = time.perf_counter()
        crashed = False
        try:
            result = run_case(case)
        except Exception as err:  # a crash is a failed case, reported with its cause
            crashed = True
            result = Result(case.name, float("nan"), float("nan"), case.bound, False, f"{type(err).__name__}: {err}")
        if args.verbose or not result.passed:
            print(f"  {result.name}: rel {result.max_rel:.2e} ({time.perf_counter() - start:.1f}s) {result.detail}",
                  file=sys.stderr, flush=True)
        results.append(result)
        if args.into and not crashed:
            _write_back(args.into, result, fingerprints[case.name])
        # Every case compiles its own executables (new model objects are new static arguments), and
        # XLA:CPU maps each one's code: ~170 cases into one process it ran out of memory mappings
        # ("LLVM ERROR: Unable to allocate section memory"). Nothing compiled carries to the next case.
        jax.clear_caches()
        if args.partial:
            # A long run leaves what it has done so far.
            from parity.report import write_json

            write_json(results, args.partial, dict(partial=True, precision=precision), fingerprints)
    return results, fingerprints


def _write_back(path: str, result, fingerprint: str) -> None:
    """Put ``result`` and its fingerprint in place of the row of its name in the results file ``path`` (or after its rows).

    A ``--stale`` run keeps each row as it finishes, so one stopped (a machine's end of day, an
    out-of-memory kill) resumes with the rows it has not proven yet. A crash is not written back:
    it proves nothing about the code, and the row stays stale to be run again.
    """
    from parity.report import load_with_fingerprints, write_json

    meta, rows, fingerprints = load_with_fingerprints(path)
    if any(r.name == result.name for r in rows):
        rows = [result if r.name == result.name else r for r in rows]
    else:
        rows = rows + [result]
    write_json(rows, path, meta, {**fingerprints, result.name: fingerprint})


def float64_partial(path: str) -> str:
    """Where the float64 child of a ``--partial PATH`` run leaves its rows so far (beside PATH)."""
    root, ext = os.path.splitext(path)
    return f"{root}.float64{ext or '.json'}"


def _run_all(args):
    """float32 here, float64 in a child process; the rows and their fingerprints."""
    from parity.harness import Result
    from parity.report import load_with_fingerprints

    if args.precision:
        return _run(args.precision, args)
    results, fingerprints = _run("float32", args)
    with tempfile.TemporaryDirectory() as tmp:
        child = os.path.join(tmp, "f64.json")
        command = [sys.executable, "-m", "parity", "--precision", "float64", "--json", child,
                   "--filter", args.filter, "--cases", args.cases] + (["--quick"] if args.quick else []) + (
            ["--verbose"] if args.verbose else []) + (["--partial", float64_partial(args.partial)] if args.partial else []) + (
            ["--into", args.into] if args.into else [])
        subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
        if os.path.exists(child):
            _, rows, prints = load_with_fingerprints(child)
            results, fingerprints = results + rows, {**fingerprints, **prints}
        else:
            results.append(Result("float64 child process", float("nan"), float("nan"), 0.0, False, "crashed"))
    return results, fingerprints


def _meta(args, start, **extra) -> dict:
    import jax
    import torch

    from parity.fingerprint import versions

    return dict(quick=args.quick, seconds=round(time.perf_counter() - start, 1), jax=jax.__version__,
                torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
                cpus=os.cpu_count(), versions=versions(), **extra)


def _stale(args, path: str) -> int:
    """``--stale`` for one results file: rerun its rows whose fingerprint is not today's, each written back as it finishes."""
    from parity.report import format_table, freshness_line, load_with_fingerprints, proven_on_today, write_json

    start = time.perf_counter()
    print(f"{path}:")
    meta, rows, fingerprints = load_with_fingerprints(path)
    proven, stale, unknown = proven_on_today(rows, fingerprints)
    print(freshness_line(rows, fingerprints))
    for name in unknown:
        print(f"  not in today's grid (kept as it is, proves nothing): {name}")
    for name in stale:
        print(f"  stale: {name}")
    if args.filter:
        stale = [name for name in stale if _matches(name, args.filter)]
        print(f"  {len(stale)} of them match --filter {args.filter}")
    # A committed row proven on today's code that fails is today's code failing, rerun or not.
    failing = [r for r in rows if r.name in proven and not r.passed and _matches(r.name, args.filter)]
    if args.list or not stale:
        return _failed(failing)
    args.cases, args.filter, args.quick, args.into = ",".join(stale), "", False, path
    new_rows, _ = _run_all(args)
    # Each row was written back as it finished (float64 ones by the child process): read them all again.
    meta, merged, fingerprints = load_with_fingerprints(path)
    print(format_table(new_rows))
    reruns = dict(meta.get("stale_reruns", {}))
    reruns[time.strftime("%Y-%m-%dT%H:%M:%S")] = dict(rows=len(new_rows), **_meta(args, start))
    write_json(merged, path, {**meta, "stale_reruns": reruns}, fingerprints)
    print(freshness_line(merged, fingerprints))
    return _failed(failing + [r for r in new_rows if not r.passed])


def _failed(rows) -> int:
    """Exit status 1, with each failing row named, if there is any."""
    from parity.report import failures

    if rows:
        print(failures(rows))
    return 1 if rows else 0


def main(argv=None) -> int:
    """Entry point; exit status 1 if any case fails."""
    args = _parse(argv)
    if args.stale:
        # One process for several files (CI lists three): each file its own run, on its own copy of the options.
        return max([_stale(argparse.Namespace(**vars(args)), path) for path in args.stale])
    from parity.report import format_table, write_json

    start = time.perf_counter()
    results, fingerprints = _run_all(args)
    print(format_table(results))
    if args.json:
        write_json(results, args.json, _meta(args, start), fingerprints)
    return _failed([r for r in results if not r.passed])


if __name__ == "__main__":
    sys.exit(main())
