"""The parity report's marks and the perturbation behind the reference-spread yardstick."""

import pytest

torch = pytest.importorskip("torch")
harness = pytest.importorskip("parity.harness")
parity_check = pytest.importorskip("fedjax_users.interop.parity_check")
report = pytest.importorskip("parity.report")


def _row(name, passed, ours=None, ref=None, spread=None):
    return harness.Result(name, 1e-3, 1e-3, 1e-5, passed, "", ours, ref, spread)


def test_marks_say_which_yardstick_passed_a_case():
    table = report.format_table([
        _row("a", True), _row("b", True, 1e-3, 1e-3), _row("c", True, 1e-2, 1e-6, 8e-3),
        _row("d", False, 1e-1, 1e-6, 1e-3), _row("e/float64", True, spread=6e-4),
    ]).splitlines()
    marks = {line.split()[0]: line.split()[4] for line in table[1:6]}
    assert marks == {"a": "yes", "b": "yes*", "c": "yes~", "d": "NO", "e/float64": "yes~"}
    assert "8.00e-03" in table[3]
    # A float64 row has no float64 distances, only its spread, in the spread column.
    assert table[5].split()[5:] == ["-", "-", "6.00e-04"]
    assert table[-1] == "4 passed, 1 failed"


def test_rows_without_a_spread_still_load():
    row = _row("a", True, 1e-3, 1e-3).as_dict()
    del row["reference_spread"]
    assert harness.Result(**row).reference_spread is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jitter_is_a_relative_perturbation_of_the_stated_size(dtype):
    tensor = torch.linspace(-3.0, 3.0, 10_001, dtype=dtype)
    moved = parity_check.jitter(tensor, torch.Generator().manual_seed(0))
    assert moved.dtype == dtype
    relative = ((moved.double() - tensor.double()).abs() / tensor.double().abs().clamp_min(1e-30)).max().item()
    size = parity_check.spread_perturbation(dtype)
    # Forming 1 + u and the product, and rounding back to the dtype, add at most one ulp of it.
    assert 0.5 * size < relative <= size + torch.finfo(dtype).eps


def test_a_diverged_reference_is_a_mismatch_not_a_pass():
    import numpy as np

    errors = parity_check.Errors()
    errors.tensor_lists("gradients", [np.array([1e30, 1.0])], [np.array([1e30, 1.0])])
    assert errors.mismatches and "diverged" in errors.mismatches[0]
    errors = parity_check.Errors()
    errors.tensor_lists("gradients", [np.array([0.5, 1.0])], [np.array([0.5, 1.0])])
    assert not errors.mismatches and errors.max_rel == 0.0


def test_summary_groups_by_model_and_precision(tmp_path):
    rows = [_row("m/local_gradient/buffers/none", True), _row("m/aggregate/buffers/clip", True, 2e-2, 1e-2),
            _row("m/local_update/buffers/none/float64", True), _row("n/local_update/buffers/none", False)]
    path = tmp_path / "r.json"
    report.write_json(rows, str(path), {"quick": False})
    meta, loaded = report.load(str(path))
    assert meta == {"quick": False} and [r.name for r in loaded] == [r.name for r in rows]
    lines = report.summary(loaded).splitlines()
    assert lines[2] == "| m | float32 | 2 | 2 | 1 / 1 / 0 | 1.0e-03 (1e-05) | 2.0e-02 (1.0e-02) |"
    assert lines[3].startswith("| m | float64 | 1 | 1 |") and lines[4].startswith("| n | float32 | 1 | 0 |")
