"""``fedjax_users.evaluate`` and ``fedjax-users evaluate``: each metric against a hand-computed value,
the grid's rows against single runs, a bad grid refused before any work, and a small run's files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import fedjax_users as fu
from fedjax_users import attacks, cli, evaluate
from fedjax_users.data import load_case

LENET_ONE = ["user=local_gradient", "user.num_data_points=1", "model=lenet_zhu"]


# ----------------------------------------------------------------------------------------------
# Metrics against hand-computed values


def test_psnr_is_ten_log10_of_one_over_the_mean_squared_error():
    truth = np.zeros((2, 4, 4, 1), np.float32)
    rec = np.stack([np.full((4, 4, 1), 0.5), np.full((4, 4, 1), 0.1)]).astype(np.float32)
    np.testing.assert_allclose(evaluate.psnr(rec, truth), [10 * math.log10(1 / 0.25), 10 * math.log10(1 / 0.01)],
                               rtol=1e-5)
    # Per image, and a reconstruction outside [0, 1] is clipped first: 1.7 scores as 1.
    assert evaluate.psnr(np.full((4, 4, 1), 1.7), np.zeros((4, 4, 1))).tolist() == pytest.approx([0.0], abs=1e-5)
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 8, 8, 3)), rng.random((3, 8, 8, 3))
    hand = [10 * math.log10(1 / np.mean((x - y) ** 2)) for x, y in zip(a, b)]
    np.testing.assert_allclose(evaluate.psnr(a, b), hand, rtol=1e-5)


def test_ssim_of_flat_images_is_the_luminance_term():
    # Flat images: no variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2: 0.636
    # for these dark greys, where C1 counts (0.6 without it). float32 filtering: ~1e-5 off.
    a, b, c1 = 0.01, 0.03, 0.01**2
    value = evaluate.ssim(np.full((16, 16, 1), a), np.full((16, 16, 1), b))
    np.testing.assert_allclose(value, [(2 * a * b + c1) / (a * a + b * b + c1)], rtol=1e-3)
    # A textured image against itself: 1; against its negative: below 0.
    image = np.random.default_rng(1).random((16, 16, 3))
    np.testing.assert_allclose(evaluate.ssim(image, image), [1.0], rtol=1e-5)
    assert evaluate.ssim(image, 1.0 - image)[0] < 0.0


def test_label_accuracy_counts_labels_as_multisets():
    assert evaluate.label_accuracy([3, 3, 7], [3, 7, 7]) == pytest.approx(2 / 3)
    assert evaluate.label_accuracy([7, 3], [3, 7]) == 1.0
    assert evaluate.label_accuracy([1], [0]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        evaluate.label_accuracy([], [])


def test_update_cosine_and_relative_error_by_hand():
    update = {"a": np.array([3.0, 0.0]), "b": {"c": np.array([[4.0]])}}
    reference = {"a": np.array([0.0, 0.0]), "b": {"c": np.array([[5.0]])}}
    # <u, r> = 20, |u| = 5, |r| = 5: cosine 0.8; |u - r| = sqrt(9 + 1) over |r| = 5.
    assert evaluate.update_cosine(update, reference) == pytest.approx(0.8)
    assert evaluate.relative_error(update, reference) == pytest.approx(math.sqrt(10) / 5)
    assert evaluate.update_cosine(update, update) == pytest.approx(1.0)


def test_infer_labels_reads_the_last_bias():
    update = {"body": {"bias": np.array([1.0, 1.0, 1.0])}, "fc": {"bias": np.array([0.2, -0.5, 0.3, -0.1])}}
    assert evaluate.infer_labels(update, 1, 4).tolist() == [1]
    assert evaluate.infer_labels(update, 1, 4, parameter_difference=True).tolist() == [2]
    assert evaluate.infer_labels(update, 2, 4).tolist() == [1, 3]
    with pytest.raises(ValueError, match="0 1-D 'bias' leaves of 5 entries"):
        evaluate.infer_labels(update, 1, 5)


def test_infer_labels_of_a_real_gradient_and_parameter_difference():
    model = fu.models.get("lenet_zhu", num_classes=10, num_channels=3)
    x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3))
    params = model.init(jax.random.key(1), x)["params"]
    payload = fu.ServerPayload(params=params, batch_stats=None)
    cfg = fu.UserConfig.from_dict(dict(user_type="local_gradient", num_data_points=1))
    multi = fu.UserConfig.from_dict(dict(user_type="local_update", num_data_points=1, num_local_updates=2,
                                         num_data_per_local_update_step=1, local_learning_rate=0.1))
    for label in (3, 8):
        data = fu.UserData(x, jnp.asarray([label]))
        grad = fu.local_gradient(model, payload, data, cfg, jax.random.key(2))[0].gradients
        diff = fu.local_update(model, payload, data, multi, jax.random.key(2))[0].gradients
        assert evaluate.infer_labels(grad, 1, 10).tolist() == [label]
        assert evaluate.infer_labels(diff, 1, 10, parameter_difference=True).tolist() == [label]


def test_match_images_pairs_each_original_with_its_closest_reconstruction():
    originals = np.stack([np.full((4, 4, 1), v) for v in (0.0, 0.5, 1.0)])
    reconstructions = originals[[2, 0, 1]] + 0.01
    order = evaluate.match_images(reconstructions, originals)
    assert order.tolist() == [1, 2, 0]
    np.testing.assert_allclose(reconstructions[order], originals + 0.01)


# ----------------------------------------------------------------------------------------------
# The grid


def test_defence_names_and_the_user_configs_they_make():
    grid = evaluate.parse_defences(["none", "clip=1.0,noise=0.10", "noise=0.5,clip=2,dist=laplacian",
                                    "clip=1,epsilon=10", "steps=4,batch=2", "input=0.1"])
    assert [d.name for d in grid] == ["none", "clip=1,noise=0.1", "clip=2,noise=0.5,dist=laplacian",
                                      "clip=1,epsilon=10", "steps=4,batch=2", "input=0.1"]
    case_user = fu.UserConfig.from_yaml("local_updates")  # laplacian noise 0, 4 steps of 1
    dp = grid[1].user_config(case_user).local_diff_privacy
    assert (dp.per_example_clipping, dp.gradient_noise, dp.distribution) == (1.0, 0.1, "gaussian")
    defended = grid[4].user_config(case_user)
    assert (defended.num_local_updates, defended.num_data_points) == (4, 2)
    assert grid[0].user_config(case_user).local_diff_privacy == fu.LocalDiffPrivacy(distribution="gaussian")
    assert [d.name for d in evaluate.DEFAULT_DEFENCES] == ["none", "clip=1,epsilon=100", "clip=1,epsilon=10",
                                                           "clip=1,epsilon=1"]


@pytest.mark.parametrize("grid, message", [
    (["none", "clip=1,noise=-0.1"], "defence 'clip=1,noise=-0.1': noise must be a finite number >= 0, got -0.1"),
    (["clip=1,noise=0.1,dist=cauchy"], "unknown distribution 'cauchy'; expected one of gaussian, laplacian"),
    (["clip=1,nosie=0.1"], "unknown key 'nosie' (did you mean noise?)"),
    (["clip=1,noise=abc"], "noise must be a number, got 'abc'"),
    (["steps=0"], "steps must be an int >= 1, got 0"),
    (["steps=1.5"], "steps must be an int, got '1.5'"),
    (["clip=1,noise=0.1,epsilon=2"], "give noise or epsilon, not both"),
    (["epsilon=2"], "epsilon needs clip > 0"),
    (["clip=1,clip=2"], "clip is given twice"),
    (["clip"], "'clip' is not key=value"),
    (["none", "clip=1,noise=0.1", "noise=0.1,clip=1"], "defence 'clip=1,noise=0.1' is in the grid twice"),
    ([], "at least one defence"),
])
def test_bad_grids_are_refused_with_one_line(grid, message):
    with pytest.raises(evaluate.DefenceError) as err:
        evaluate.parse_defences(grid)
    assert message in str(err.value) and "\n" not in str(err.value)


def run_cli(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["evaluate", *argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize("defences, message", [
    (["none", "clip=1,noise=-1"], "noise must be a finite number >= 0, got -1"),
    (["none", "clip=1,noise=0.1,dist=uniform"], "unknown distribution 'uniform'"),
    (["none", "steps=4"], "steps needs a local_update user, the case's is local_gradient"),
])
def test_the_cli_refuses_a_bad_grid_before_any_work(tmp_path, monkeypatch, capsys, defences, message):
    out = tmp_path / "run"
    code, printed = run_cli([*LENET_ONE, "--defences", *defences, "--out", str(out)], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert printed.out == ""
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedjax-users: error: ") and message in lines[0]
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_evaluation_settings_and_attack_presets():
    ev = evaluate.evaluation(["none"], attacks=["l2", "cosine"], steps=7, restarts=2, delta=1e-6)
    assert [name for name, _ in ev.attacks] == ["l2", "cosine"]
    assert all(c.steps == 7 and c.restarts == 2 for _, c in ev.attacks)
    assert dict(ev.attacks)["l2"].optimizer == "lbfgs" and dict(ev.attacks)["cosine"].objective == "cosine"
    assert ev.settings()["delta"] == 1e-6
    with pytest.raises(ValueError, match="unknown attack 'dlg'"):
        evaluate.evaluation(["none"], attacks=["dlg"])
    with pytest.raises(ValueError, match="unknown attack objective"):
        attacks.AttackConfig(objective="l1")


def test_breaching_step_schedule_drops_where_torch_does():
    # torch's MultiStepLR (breaching's step-lr) measured with milestones 800 // 2.667 = 299.0,
    # 800 // 1.6 = 499.0 (float division rounds 499.99.. down), 800 // 1.142 = 700.0: the step at
    # iteration 299 (0-based) is already a tenth.
    sizes = attacks.AttackConfig(steps=800, learning_rate=1.0, schedule="step").step_sizes()
    assert [float(sizes(i)) for i in (0, 298, 299, 498, 499, 699, 700)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_invert_each_equals_invert_of_each_observation():
    # A linear "user": its update is the candidate times a per-observation weight. Cheap to compile.
    def update(candidate, context):
        weight, scale = context
        return {"w": weight * candidate * scale}

    truths = jax.random.uniform(jax.random.key(3), (3, 1, 4, 4, 1))
    weights = jax.random.normal(jax.random.key(4), (4, 4, 1))
    scales = jnp.asarray([1.0, 2.0, 0.5])
    observed = {"w": weights * truths * scales[:, None, None, None, None]}
    config = attacks.AttackConfig(steps=30, restarts=2, tv_scale=0.0)
    recs, values = attacks.invert_each(update, observed, (weights, scales), (1, 4, 4, 1), config,
                                       context_axes=(None, 0))
    assert recs.shape == (3, 1, 4, 4, 1) and values.shape == (3,)
    for k in range(3):
        alone = attacks.invert(update, {"w": observed["w"][k]}, (weights, scales[k]), (1, 4, 4, 1), config)
        np.testing.assert_allclose(recs[k], alone, atol=1e-5)
    # The attack moved towards the truth.
    assert float(jnp.mean(jnp.abs(recs - truths))) < float(jnp.mean(jnp.abs(0.5 - truths)))


@pytest.mark.slow
def test_grid_rows_equal_single_runs_of_the_same_defence():
    cfg_case = load_case(None, LENET_ONE)
    key = jax.random.key(0)
    grid = ["none", "clip=1,noise=0.05", "clip=1,noise=2"]
    options = dict(attacks=["cosine"], steps=4, held_out=16)
    together = evaluate.evaluation(grid, **options).run(cfg_case, key)
    assert [r.defence for r in together.rows] == grid
    for defence in grid[1:]:
        alone = evaluate.evaluation([defence], **options).run(cfg_case, key).rows[0]
        row = next(r for r in together.rows if r.defence == defence)
        for field in ("epsilon", "noise", "label_accuracy", "labels_inferred", "labels_true", "utility_cosine",
                      "utility_relative_error", "held_out_loss_change", "psnr_random", "attack_steps"):
            assert getattr(row, field) == pytest.approx(getattr(alone, field), rel=1e-5), field
        # Attacked side by side under vmap or alone: the same steps, to float32 rounding.
        assert row.psnr == pytest.approx(alone.psnr, abs=1e-3)
        assert row.ssim == pytest.approx(alone.ssim, abs=1e-4)
    rows = {r.defence: r for r in together.rows}
    # No defence: no guarantee, the update itself; more noise: smaller epsilon, worse utility.
    assert rows["none"].epsilon == math.inf and rows["none"].utility_cosine == pytest.approx(1.0)
    assert rows["clip=1,noise=2"].epsilon < rows["clip=1,noise=0.05"].epsilon < math.inf
    assert rows["clip=1,noise=2"].utility_cosine < rows["clip=1,noise=0.05"].utility_cosine < 1.0


@pytest.mark.slow
def test_a_small_cli_run_writes_the_table_the_plot_and_the_grid(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, printed = run_cli([*LENET_ONE, "--defences", "none", "clip=1,epsilon=10", "--attack-steps", "3",
                             "--held-out", "8", "--out", str(out), "--quiet"], tmp_path, monkeypatch, capsys)
    assert code == 0, printed.err
    assert sorted(os.listdir(out)) == ["config.yaml", "evaluation.csv", "evaluation.json", "evaluation.png",
                                       "reconstructions.png"]
    with open(out / "evaluation.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["defence"], r["attack"]) for r in table] == [
        ("none", "cosine"), ("none", "l2"), ("clip=1,epsilon=10", "cosine"), ("clip=1,epsilon=10", "l2")]
    for column in ("defence", "epsilon", "psnr", "ssim", "label_accuracy", "utility_cosine", "attack_objective",
                   "attack_steps", "attack_optimizer", "attack_learning_rate", "attack_tv_scale"):
        assert column in table[0]
    document = json.load(open(out / "evaluation.json"))
    rows = document["rows"]
    assert rows[0]["epsilon"] == "inf" and float(rows[2]["epsilon"]) == pytest.approx(10.0, rel=2e-3)
    assert rows[0]["attack_steps"] == 3 and rows[1]["attack_optimizer"] == "lbfgs"
    assert document["settings"]["defences"] == ["none", "clip=1,epsilon=10"]
    assert matplotlib.image.imread(out / "evaluation.png").shape[:2] == (420, 1100)
    # The grid: one row per defence (150 px), original + one reconstruction per attack (3 x 150 px).
    assert matplotlib.image.imread(out / "reconstructions.png").shape[:2] == (300, 450)
    assert "none" in printed.out and "saved" in printed.out


def fake_row(defence: str, attack: str, images: int, epsilon: float) -> evaluate.Row:
    fields = {f.name: 0 for f in dataclasses.fields(evaluate.Row)}
    fields.update(defence=defence, attack=attack, epsilon=epsilon, psnr_per_image=(20.0,) * images,
                  ssim_per_image=(0.9,) * images, labels_true=(1,) * images, labels_inferred=(1,) * images,
                  batch=images, delta=1e-5, queries=1, psnr=20.0, psnr_random=5.0, utility_cosine=1.0)
    return evaluate.Row(**fields)


def test_pictures_of_a_grid_whose_defences_hold_different_numbers_of_images(tmp_path):
    # "none" holds one image, "batch=2" two: the grid is as wide as the widest row, the other ends empty.
    rows, images = [], []
    for defence, count, epsilon in (("none", 1, math.inf), ("batch=2", 2, 3.0)):
        rows += [fake_row(defence, attack, count, epsilon) for attack in ("cosine", "l2")]
        picture = np.full((count, 8, 8, 3), 0.5, np.float32)
        images.append(evaluate.DefenceImages(defence, picture, {"cosine": picture, "l2": picture}))
    result = evaluate.EvaluationResult("fake", tuple(rows), tuple(images), {}, {})
    figure = evaluate.reconstruction_grid(result, tmp_path / "grid.png")
    assert matplotlib.image.imread(tmp_path / "grid.png").shape[:2] == (300, 900)
    assert [len(ax.images) for ax in figure.axes] == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    evaluate.leakage_plot(result, tmp_path / "plot.png")
    assert matplotlib.image.imread(tmp_path / "plot.png").shape[:2] == (420, 1100)
