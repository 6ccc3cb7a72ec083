"""Parity rows name the code they prove: a change to a file a case runs makes exactly its rows stale."""

import json

import pytest
from conftest import append_code, copy_of_sources

torch = pytest.importorskip("torch")
from parity import __main__ as parity_main  # noqa: E402
from parity import fingerprint, report  # noqa: E402
from parity.cases import Case, cases_by_name  # noqa: E402

LENET = Case("lenet_zhu", "local_gradient", False)
VGG = Case("VGG11", "local_update", True, image_shape=(3, 32, 32))
RESNET = Case("resnet18", "local_gradient", True, image_shape=(3, 64, 64), data_name="ImageNet")
TEXT = Case("transformer3", "local_update", False)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the package and the harness that the fingerprints read instead of the checkout."""
    return copy_of_sources(tmp_path, monkeypatch, ("fedjax_users", "parity"))


def test_sources_follow_the_imports_but_not_the_registry():
    lenet, vgg, text = (set(fingerprint.case_sources(c)) for c in (LENET, VGG, TEXT))
    core = {"fedjax_users/semantics.py", "fedjax_users/users.py", "fedjax_users/strategy/clipping.py",
            "fedjax_users/interop/breaching.py", "fedjax_users/interop/parity_check.py",
            "fedjax_users/models/__init__.py", "parity/harness.py"}
    assert core <= lenet and core <= vgg and core <= text
    assert "fedjax_users/models/vgg.py" in vgg and "fedjax_users/models/vgg.py" not in lenet
    assert "fedjax_users/models/text.py" in text and "fedjax_users/models/vision.py" not in text
    assert "fedjax_users/models/resnets.py" in fingerprint.case_sources(RESNET)


def test_a_core_change_makes_every_row_stale_and_a_model_change_only_its_own(tree):
    cases = (LENET, VGG, RESNET, TEXT)
    before = {c: fingerprint.fingerprint(c) for c in cases}
    assert before == {c: fingerprint.fingerprint(c) for c in cases}  # deterministic

    append_code(tree / "fedjax_users" / "models" / "vgg.py")
    after_vgg = {c: fingerprint.fingerprint(c) for c in cases}
    assert [c for c in cases if after_vgg[c] != before[c]] == [VGG]

    append_code(tree / "fedjax_users" / "semantics.py")
    after_core = {c: fingerprint.fingerprint(c) for c in cases}
    assert all(after_core[c] != after_vgg[c] for c in cases)

    # The comparison itself is code every row ran: a change to it makes every row stale.
    append_code(tree / "fedjax_users" / "interop" / "parity_check.py")
    after_checker = {c: fingerprint.fingerprint(c) for c in cases}
    assert all(after_checker[c] != after_core[c] for c in cases)


def test_comments_and_docstrings_leave_rows_proven_and_code_does_not(tree):
    before = fingerprint.fingerprint(LENET)
    semantics = tree / "fedjax_users" / "semantics.py"
    text = semantics.read_text()
    # The module's docstring and the first function's reworded, a comment added: the code is unchanged.
    function_doc = text.index('"""', text.index("\ndef ")) + 3
    reworded = text[:function_doc] + "Reworded. " + text[function_doc:]
    semantics.write_text(reworded.replace('"""', '"""Reworded. ', 1) + "\n# a comment\n")
    assert fingerprint.fingerprint(LENET) == before
    semantics.write_text(text + "\n_changed = 1\n")
    assert fingerprint.fingerprint(LENET) != before


def test_a_new_library_version_makes_rows_stale():
    versions = fingerprint.versions()
    assert fingerprint.fingerprint(LENET, versions) == fingerprint.fingerprint(LENET)
    assert fingerprint.fingerprint(LENET, {**versions, "jax": "0.0.1"}) != fingerprint.fingerprint(LENET)


def _results_file(path, cases, prints, failing=()):
    """Rows that fail (max_rel 1.0) unless they carry a fingerprint; those in ``failing`` fail with one."""
    def passes(c):
        return c in prints and c not in failing

    rows = [dict(name=c.name, max_abs=0.0, max_rel=0.0 if passes(c) else 1.0, bound=c.bound, passed=passes(c), **(
        {"fingerprint": prints[c]} if c in prints else {})) for c in cases]
    path.write_text(json.dumps({"meta": {}, "results": rows}))
    return str(path)


def test_report_counts_proven_stale_and_unknown_rows(tree, tmp_path):
    path = _results_file(tmp_path / "r.json", (LENET, VGG, TEXT), {LENET: fingerprint.fingerprint(LENET),
                                                                   VGG: fingerprint.fingerprint(VGG)})
    meta, rows, prints = report.load_with_fingerprints(path)
    rows.append(report.Result("no/such/case", 0.0, 0.0, 1e-5, True))
    assert report.proven_on_today(rows, prints) == ([LENET.name, VGG.name], [TEXT.name], ["no/such/case"])
    append_code(tree / "fedjax_users" / "models" / "vgg.py")
    assert report.proven_on_today(rows, prints)[1] == [VGG.name, TEXT.name]
    assert report.freshness_line(rows, prints).startswith("1 of 4 rows proven on today's code")


@pytest.fixture
def ran(monkeypatch):
    """The ``--cases`` of each run ``python -m parity`` starts (the runs themselves go ahead)."""
    calls = []
    real = parity_main._run

    def counting_run(precision, args):
        calls.append(args.cases)
        return real(precision, args)

    monkeypatch.setattr(parity_main, "_run", counting_run)
    return calls


def test_stale_reruns_only_what_changed_and_then_nothing(tmp_path, ran, capsys):
    cheap = Case("linear", "local_gradient", False)
    assert cheap.name in cases_by_name()
    path = _results_file(tmp_path / "r.json", (cheap, LENET), {LENET: fingerprint.fingerprint(LENET)})
    assert parity_main.main(["--stale", path, "--precision", "float32"]) == 0
    assert ran == [cheap.name]
    _, rows, prints = report.load_with_fingerprints(path)
    assert [r.name for r in rows] == [cheap.name, LENET.name]
    assert rows[0].passed and rows[0].max_rel < rows[0].bound and prints[cheap.name] == fingerprint.fingerprint(cheap)
    # An unchanged checkout reruns nothing.
    assert parity_main.main(["--stale", path, "--precision", "float32"]) == 0
    assert ran == [cheap.name]
    assert "2 of 2 rows proven on today's code" in capsys.readouterr().out


def test_stale_with_a_filter_reruns_only_the_stale_rows_it_matches(tmp_path, ran):
    cheap, mlp = Case("linear", "local_gradient", False), Case("MLP", "local_gradient", False)
    assert {cheap.name, mlp.name} <= set(cases_by_name())
    path = _results_file(tmp_path / "r.json", (cheap, mlp), {})  # both stale
    assert parity_main.main(["--stale", path, "--precision", "float32", "--filter", "linear/"]) == 0
    assert ran == [cheap.name]
    _, rows, prints = report.load_with_fingerprints(path)
    assert [r.name for r in rows] == [cheap.name, mlp.name]  # the other row kept, still stale
    assert prints.get(cheap.name) == fingerprint.fingerprint(cheap) and prints.get(mlp.name) != fingerprint.fingerprint(mlp)


@pytest.fixture
def outcomes(monkeypatch):
    """``run_case`` replaced by a table: a case name gives its ``Result``, or the exception it raises."""
    table = {}

    def run_case(case):
        outcome = table[case.name]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr("parity.harness.run_case", run_case)
    return table


def _passing(case):
    return report.Result(case.name, 0.0, 0.0, case.bound, True)


def test_a_stopped_stale_run_keeps_the_rows_it_finished_and_resumes_after_them(tmp_path, outcomes, ran):
    first, second = Case("linear", "local_gradient", False), Case("MLP", "local_gradient", False)
    path = _results_file(tmp_path / "r.json", (first, second), {})  # both stale
    outcomes.update({first.name: _passing(first), second.name: KeyboardInterrupt()})  # the run is stopped there
    with pytest.raises(KeyboardInterrupt):
        parity_main.main(["--stale", path, "--precision", "float32"])
    _, rows, prints = report.load_with_fingerprints(path)
    assert [r.passed for r in rows] == [True, False]
    assert report.proven_on_today(rows, prints)[:2] == ([first.name], [second.name])

    outcomes[second.name] = _passing(second)
    assert parity_main.main(["--stale", path, "--precision", "float32"]) == 0
    assert ran[-1] == second.name  # the finished row is not run again
    _, rows, prints = report.load_with_fingerprints(path)
    assert report.proven_on_today(rows, prints)[0] == [first.name, second.name]


def test_a_crashed_row_stays_stale_and_the_run_fails(tmp_path, outcomes, capsys):
    case = Case("linear", "local_gradient", False)
    path = _results_file(tmp_path / "r.json", (case,), {})
    outcomes[case.name] = MemoryError("out of memory")
    assert parity_main.main(["--stale", path, "--precision", "float32"]) == 1
    assert "FAIL linear/local_gradient/no-buffers/none: MemoryError: out of memory" in capsys.readouterr().out
    _, rows, prints = report.load_with_fingerprints(path)
    assert report.proven_on_today(rows, prints)[1] == [case.name]  # not written back: run again next time


def test_a_failing_row_proven_on_todays_code_fails_the_run_though_nothing_reruns(tmp_path, ran):
    case = Case("linear", "local_gradient", False)
    path = _results_file(tmp_path / "r.json", (case,), {case: fingerprint.fingerprint(case)}, failing=(case,))
    assert parity_main.main(["--stale", path, "--precision", "float32"]) == 1
    assert ran == []
    # A --filter that leaves it out judges only the rows it names.
    assert parity_main.main(["--stale", path, "--precision", "float32", "--filter", "MLP/"]) == 0


def test_stale_over_several_files_runs_each_and_fails_if_any_holds_a_failing_row(tmp_path, outcomes, ran, capsys):
    linear, mlp = Case("linear", "local_gradient", False), Case("MLP", "local_gradient", False)
    stale_file = _results_file(tmp_path / "a.json", (linear,), {})
    failing_file = _results_file(tmp_path / "b.json", (mlp,), {mlp: fingerprint.fingerprint(mlp)}, failing=(mlp,))
    outcomes[linear.name] = _passing(linear)
    assert parity_main.main(["--stale", stale_file, failing_file, "--precision", "float32"]) == 1
    assert ran == [linear.name]
    _, rows, prints = report.load_with_fingerprints(stale_file)
    assert report.proven_on_today(rows, prints)[0] == [linear.name]
    out = capsys.readouterr().out
    assert f"{stale_file}:" in out and f"{failing_file}:" in out and f"FAIL {mlp.name}" in out
    assert parity_main.main(["--stale", stale_file, "--list"]) == 0
