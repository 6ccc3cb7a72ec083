"""``python -m parity``'s two processes: float32 rows here, float64 rows from a child, both kept as they go."""

import pytest

pytest.importorskip("torch")
from parity import __main__ as parity_main  # noqa: E402
from parity.harness import Result  # noqa: E402
from parity.report import load_with_fingerprints, write_json  # noqa: E402


@pytest.fixture
def child_commands(monkeypatch):
    """Each float64 child's command line; the child writes one row, as a real one writes its --json."""
    commands = []

    def fake_child(command, **_):
        commands.append(command)
        write_json([Result("m/float64", 0.0, 0.0, 1e-10, True)], command[command.index("--json") + 1], {},
                   {"m/float64": "f64print"})

    monkeypatch.setattr(parity_main.subprocess, "run", fake_child)
    monkeypatch.setattr(parity_main, "_run", lambda precision, args: (
        [Result("m", 0.0, 0.0, 1e-5, True)], {"m": "f32print"}))
    return commands


def test_a_partial_run_has_its_float64_child_keep_its_rows_beside_the_file(tmp_path, child_commands):
    partial = tmp_path / "run.json"
    results, prints = parity_main._run_all(parity_main._parse(["--partial", str(partial), "--filter", "m"]))
    (command,) = child_commands
    assert command[command.index("--partial") + 1] == str(tmp_path / "run.float64.json")
    assert [r.name for r in results] == ["m", "m/float64"] and prints == {"m": "f32print", "m/float64": "f64print"}


def test_without_partial_the_child_writes_only_its_result(tmp_path, child_commands):
    parity_main._run_all(parity_main._parse(["--filter", "m"]))
    assert "--partial" not in child_commands[0]


def test_the_float64_child_writes_its_rows_back_where_the_parent_does(tmp_path, child_commands):
    parity_main._run_all(parity_main._parse(["--into", str(tmp_path / "r.json"), "--filter", "m"]))
    (command,) = child_commands
    assert command[command.index("--into") + 1] == str(tmp_path / "r.json")


def test_a_row_written_back_replaces_its_namesake_and_a_new_one_goes_after_the_others(tmp_path):
    path = str(tmp_path / "r.json")
    write_json([Result("a", 1.0, 1.0, 1e-5, False), Result("b", 0.0, 0.0, 1e-5, True)], path, {"kept": 1}, {"b": "old"})
    parity_main._write_back(path, Result("a", 0.0, 0.0, 1e-5, True), "new-a")
    parity_main._write_back(path, Result("c", 0.0, 0.0, 1e-5, True), "new-c")
    meta, rows, prints = load_with_fingerprints(path)
    assert meta == {"kept": 1} and [(r.name, r.passed) for r in rows] == [("a", True), ("b", True), ("c", True)]
    assert prints == {"a": "new-a", "b": "old", "c": "new-c"}
