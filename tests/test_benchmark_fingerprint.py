"""Benchmark rows name the code they were measured on, and ``--stale`` measures only what changed."""

import json
import os

import pytest
from conftest import append_code, copy_of_sources

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from benchmarks import cli, memory, suite  # noqa: E402
from benchmarks import fingerprint as bench_fingerprint  # noqa: E402
from parity import fingerprint  # noqa: E402

SUITE, MEMORY = bench_fingerprint.SUITE, bench_fingerprint.MEMORY
COMMITTED = os.path.join(fingerprint.ROOT, "benchmarks", "results")


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the sources the fingerprints read instead of the checkout."""
    return copy_of_sources(tmp_path, monkeypatch, ("fedjax_users", "parity", "benchmarks"),
                           skip=("__pycache__", "*.npz", "results", "studies"))


def test_sources_follow_the_runner_into_the_package_the_harness_and_the_reference():
    lenet, resnet, peaks = (set(bench_fingerprint.row_sources(runner, model))
                            for runner, model in ((SUITE, "lenet_zhu"), (SUITE, "resnet18"), (MEMORY, "lenet_zhu")))
    timed = {"fedjax_users/users.py", "fedjax_users/semantics.py", "fedjax_users/strategy/clipping.py",
             "benchmarks/timing.py", "benchmarks/contenders.py", "parity/reference.py"}
    assert timed <= lenet and timed <= resnet
    assert {"benchmarks/memory.py", "fedjax_users/users.py"} <= peaks
    assert "fedjax_users/models/resnets.py" in resnet and "fedjax_users/models/resnets.py" not in lenet
    # Neither another model family nor the parity grid's own case list is what a timing ran.
    assert not {"fedjax_users/models/vgg.py", "parity/cases.py", "parity/harness.py"} & (lenet | resnet | peaks)


def test_a_change_stales_the_rows_that_ran_it_and_words_stale_none(tree):
    rows = ((SUITE, "lenet_zhu"), (SUITE, "resnet18"), (MEMORY, "lenet_zhu"))

    def prints():
        return {row: bench_fingerprint.row_fingerprint(*row, library_versions={}) for row in rows}

    before = prints()
    append_code(tree / "fedjax_users" / "models" / "resnets.py")
    after_model = prints()
    assert [row for row in rows if after_model[row] != before[row]] == [(SUITE, "resnet18")]
    append_code(tree / "parity" / "cases.py")  # the parity grid's cases: no timing ran them
    assert prints() == after_model
    timing = tree / "benchmarks" / "timing.py"
    timing.write_text(timing.read_text() + "\n# a comment\n")
    assert prints() == after_model
    append_code(timing)  # the harness that times: every row it timed (and the memory runner imports it too)
    after_timing = prints()
    assert all(after_timing[row] != after_model[row] for row in rows)
    append_code(tree / "fedjax_users" / "users.py")
    assert all(prints()[row] != after_timing[row] for row in rows)


def test_a_new_library_version_stales_rows():
    versions = fingerprint.versions(bench_fingerprint.LIBRARIES)
    today = bench_fingerprint.row_fingerprint(SUITE, "lenet_zhu")
    assert bench_fingerprint.row_fingerprint(SUITE, "lenet_zhu", versions) == today
    assert bench_fingerprint.row_fingerprint(SUITE, "lenet_zhu", {**versions, "torch": "9.9"}) != today


@pytest.fixture
def results_dir(tmp_path):
    """The committed results with their first timing row and first memory row stamped as today's."""
    results = json.loads(open(os.path.join(COMMITTED, "results.json")).read())
    runs = json.loads(open(os.path.join(COMMITTED, "memory.json")).read())
    for row in results["results"]:
        row.pop("fingerprint", None)
    for run in runs["runs"]:
        run.pop("fingerprint", None)
    results["results"][0]["fingerprint"] = bench_fingerprint.row_fingerprint(SUITE, results["results"][0]["model"])
    runs["runs"][0]["fingerprint"] = bench_fingerprint.row_fingerprint(MEMORY, runs["runs"][0]["model"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "memory.json").write_text(json.dumps(runs))
    return tmp_path, results, runs


def test_stale_list_counts_and_names_and_measures_nothing(results_dir, monkeypatch, capsys):
    out, results, runs = results_dir
    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(memory, "run", lambda *a, **k: pytest.fail("measured"))
    assert cli.main(["--stale", "--list", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    total, total_runs = len(results["results"]), len(runs["runs"])
    assert f"1 of {total} timing rows measured on today's code" in printed
    assert f"1 of {total_runs} memory rows measured on today's code" in printed
    assert printed.count("  stale: ") == total - 1 + total_runs - 1
    first = results["results"][0]
    assert f"stale: {first['kind']} {first['model']} {first['label']}\n" not in printed


@pytest.fixture
def measured(results_dir, monkeypatch):
    """What ``--stale`` asks the suite and the memory runner to measure; they answer with the
    committed rows, measured anew on today's code (as the real ones would, only sooner)."""
    out, results, runs = results_dir
    asked = {}

    def fake_run(grid_name, keys=None, **_):
        asked["grid"], asked["keys"] = grid_name, keys
        rows = [dict(r, measured_at="now", fingerprint=bench_fingerprint.row_fingerprint(SUITE, r["model"]))
                for r in results["results"] if suite.row_key(r) in keys]
        return dict({k: v for k, v in results.items() if k != "parts"}, created="now", results=rows)

    def fake_memory(specs, log=print):
        asked["specs"] = list(specs)
        committed = {cli._memory_key(r): r for r in runs["runs"]}
        return dict(method=runs["method"], runs=[
            dict(committed[cli._memory_key(spec)], peak_rss_mib=1.0,
                 fingerprint=bench_fingerprint.row_fingerprint(MEMORY, spec["model"])) for spec in specs])

    monkeypatch.setattr(suite, "run", fake_run)
    monkeypatch.setattr(memory, "run", fake_memory)
    return asked


def test_stale_measures_only_the_stale_rows_and_keeps_the_rest(results_dir, measured, monkeypatch, capsys):
    out, results, runs = results_dir
    asked = measured  # what --stale asks to measure
    assert cli.main(["--stale", "--out", str(out)]) == 0
    assert asked["grid"] == results["grid"]
    assert asked["keys"] == {suite.row_key(r) for r in results["results"][1:]}
    assert [spec["model"] for spec in asked["specs"]] == [r["model"] for r in runs["runs"][1:]]
    written = json.loads((out / "results.json").read_text())
    by_key = {suite.row_key(r): r for r in written["results"]}
    assert len(by_key) == len(results["results"])
    assert by_key[suite.row_key(results["results"][0])] == results["results"][0]  # fresh: kept as it was
    assert all(r["measured_at"] == "now" for r in written["results"] if r is not by_key[suite.row_key(results["results"][0])])
    written_runs = json.loads((out / "memory.json").read_text())["runs"]
    assert written_runs[0] == runs["runs"][0] and all(r["peak_rss_mib"] == 1.0 for r in written_runs[1:])
    assert len(written["parts"]) == len(results.get("parts", [None])) + 1  # merged: the new run is one more part
    assert (out / "results.md").exists()
    capsys.readouterr()
    # Measured again, everything is on today's code, and a second --stale measures nothing.
    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("measured twice"))
    monkeypatch.setattr(memory, "run", lambda *a, **k: pytest.fail("measured twice"))
    assert cli.main(["--stale", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(results['results'])} of {len(results['results'])} timing rows measured on today's code" in printed


def test_when_every_row_is_stale_the_new_run_replaces_the_old_parts(results_dir, measured):
    out, results, _ = results_dir
    results["results"][0].pop("fingerprint")
    results["parts"] = [suite._part(results), suite._part(results)]  # as a grid measured in parts
    (out / "results.json").write_text(json.dumps(results))
    assert cli.main(["--stale", "--out", str(out)]) == 0
    assert measured["keys"] == {suite.row_key(r) for r in results["results"]}
    written = json.loads((out / "results.json").read_text())
    assert written["created"] == "now" and "parts" not in written
    assert len(written["results"]) == len(results["results"])
