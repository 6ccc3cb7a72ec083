"""The step-by-step rounding study: each step count is its own run, judged by the yardsticks of a miss."""

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("torch")
amplification = pytest.importorskip("parity.amplification")


def test_each_step_count_runs_and_reports_the_references_own_spread():
    with jax.enable_x64(True):
        one, three = amplification.rows("lenet_zhu/local_update/no-buffers/none/float64", [1, 3])
    assert one.name.endswith("/steps=1") and three.name.endswith("/steps=3")
    # bound 0 sends both to the float64 yardstick: lenet_zhu is well conditioned, so both sides
    # agree to float64 rounding and the reference's own spread is of that size too.
    for r in (one, three):
        assert r.passed and r.reference_spread is not None and 0 < r.max_rel < 1e-12 and r.reference_spread < 1e-12
    assert one.max_rel != three.max_rel


def test_a_single_step_case_has_no_steps_to_vary():
    with pytest.raises(SystemExit, match="single-step"):
        amplification.rows("lenet_zhu/local_gradient/no-buffers/none", [1])
