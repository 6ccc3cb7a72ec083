"""``benchmarks.studies.checkout_ab.compare``: a row is slower only beyond the old checkout's own spread."""

import pytest

from benchmarks.studies.checkout_ab import compare

A, B, C = ("local_gradient", "m", "B=8"), ("aggregate", "m", "U=10"), ("local_update", "m", "1 steps")


def test_rows_compare_best_medians_against_the_old_runs_spread():
    old = [{A: 1.0, B: 2.0, C: 1.0}, {A: 1.2, B: 2.0, C: 1.0}]
    new = [{A: 1.3, B: 2.1, C: 1.05}, {A: 1.15, B: 2.6, C: 0.9}]
    rows = {r["workload"]: r for r in compare(old, new)}
    a, b, c = rows["local_gradient m B=8"], rows["aggregate m U=10"], rows["local_update m 1 steps"]
    assert a["new_over_old"] == pytest.approx(1.15) and a["old_spread"] == pytest.approx(1.2)
    assert not a["beyond_spread"]  # 15% slower, but the old code alone varied by 20%
    assert b["new_over_old"] == pytest.approx(1.05) and b["beyond_spread"]  # the old runs did not vary at all
    assert c["new_over_old"] == pytest.approx(0.9) and not c["beyond_spread"]


def test_a_workload_missing_from_any_run_is_left_out():
    rows = compare([{A: 1.0, B: 1.0}, {A: 1.0}], [{A: 1.0, B: 1.0}, {A: 1.0, B: 1.0}])
    assert [r["workload"] for r in rows] == ["local_gradient m B=8"]
