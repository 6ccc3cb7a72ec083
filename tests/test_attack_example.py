"""The worked attack of ``docs/attacks.md``: a shipped digit inverted through the exact user.

The attack differentiates through ``fu.local_gradient`` / ``fu.local_update`` themselves. With the
user's true update it must reconstruct the digit closer than any other validation digit is to it;
with another image's update (the same attack, a wrong observation) it must not come near.
"""

import os

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from fedjax_users import attacks

# The true reconstruction must beat the best any *other* real digit scores against the image
# (attacks.nearest_other_digit_psnr, 17.8 dB) by this much: such a reconstruction is this image,
# not a look-alike. The wrong observation must stay below that same line.
MARGIN_DB = 3.0


@pytest.fixture(scope="module")
def example():
    """``results(*users)``: the example's attack on those users (each attacked once per module), by (user, observed).

    Each user is attacked on its own (``run_example(users=[user])``, the same attack as in a run of
    both): the default tier attacks the local_gradient user, the slower tier the local_update user too.
    """
    done = {}

    def results(*users):
        for user in users:
            if not any(key[0] == user for key in done):
                done.update({(r.user, r.observed): r for r in attacks.run_example(users=[user])})
        return {key: r for key, r in done.items() if key[0] in users}

    return results


# The local_update user's attack runs in the slower tier (make test-full): its multi-step objective
# is checked against a torch resimulation of the user in test_attack_parity.py.
@pytest.mark.parametrize("user", ["local_gradient", pytest.param("local_update", marks=pytest.mark.slow)])
def test_true_update_reconstructs_the_digit_and_a_wrong_one_does_not(example, user):
    results = example(user)
    nearest = attacks.nearest_other_digit_psnr()
    true, wrong = results[(user, "true")], results[(user, "wrong")]
    assert true.psnr > nearest + MARGIN_DB, (true.psnr, nearest)
    assert wrong.psnr < nearest, (wrong.psnr, nearest)
    images, labels = attacks.digit_images()
    other = int(np.flatnonzero(labels != labels[attacks.TRUE_INDEX])[0])
    # The labels read off the observed updates are those of the images behind them.
    assert (true.label, wrong.label) == (labels[attacks.TRUE_INDEX], labels[other])
    assert true.reconstruction.shape == images[:1].shape
    assert 0.0 <= true.reconstruction.min() and true.reconstruction.max() <= 1.0  # boxed


def test_cosine_distance():
    a = {"w": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([3.0])}
    assert float(attacks.cosine_distance(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(attacks.cosine_distance(a, {k: -3.0 * v for k, v in a.items()})) == pytest.approx(2.0)
    orthogonal = {"w": jnp.asarray([2.0, -1.0]), "b": jnp.asarray([0.0])}
    assert float(attacks.cosine_distance(a, orthogonal)) == pytest.approx(1.0)


def test_total_variation_and_psnr():
    flat = jnp.full((1, 4, 4, 3), 0.5)
    stripes = jnp.tile(jnp.asarray([0.0, 1.0]), 2)[None, None, :, None] * jnp.ones((1, 4, 1, 3))
    assert float(attacks.total_variation(flat)) == 0.0
    assert float(attacks.total_variation(stripes)) == pytest.approx(1.0)  # every horizontal step is 1
    assert attacks.psnr(flat + 0.1, flat) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)


def test_infer_label_from_a_gradient_and_a_parameter_difference():
    gradient = {"fc": {"0": {"bias": jnp.asarray([0.1, -0.7, 0.2, 0.4])}}}
    assert attacks.infer_label(gradient) == 1
    difference = {"fc": {"0": {"bias": -0.5 * gradient["fc"]["0"]["bias"]}}}
    assert attacks.infer_label(difference, parameter_difference=True) == 1


@pytest.mark.parametrize("users", [("local_gradient",), pytest.param(("local_gradient", "local_update"),
                                                                     marks=pytest.mark.slow)])
def test_the_picture_shows_the_original_and_both_reconstructions_of_each_user(example, users, tmp_path):
    results = example(*users)
    path = tmp_path / "grid.png"
    figure = attacks.write_grid(path, [(attacks.MODEL_SEED, list(results.values()))])
    picture = matplotlib.image.imread(path)
    assert picture.shape == (len(users) * 150, 3 * 150, 4)  # a row a user, three columns, 150-pixel panels
    truth = attacks.digit_images()[0][attacks.TRUE_INDEX]
    for row, user in enumerate(users):
        expected = [truth, results[(user, "true")].reconstruction[0], results[(user, "wrong")].reconstruction[0]]
        for column, image in enumerate(expected):
            ax = figure.axes[3 * row + column]
            np.testing.assert_array_equal(ax.images[0].get_array(), image)
            # The panel in the file is the image, not a blank square.
            box = ax.get_window_extent()
            panel = picture[picture.shape[0] - int(box.y1):picture.shape[0] - int(box.y0), int(box.x0):int(box.x1), :3]
            assert panel.std() > 0.1
        assert f"PSNR {results[(user, 'true')].psnr:.2f} dB" in figure.axes[3 * row + 1].get_title()
    assert figure.axes[0].get_title().startswith("original\n")
    assert all(user in figure.axes[3 * row].get_ylabel() for row, user in enumerate(users))


def test_demo_does_not_write_over_an_existing_picture_without_force(tmp_path, capsys, monkeypatch):
    existing = tmp_path / "grid.png"
    existing.write_bytes(b"keep")
    # Refused at once, before the attack runs (which would take a minute).
    monkeypatch.setattr(attacks, "run_example", lambda *a, **k: pytest.fail("the attack ran"))
    with pytest.raises(SystemExit) as stop:
        attacks.main(["--out", str(existing)])
    assert stop.value.code == 2 and "exists: name another file, or add --force" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep"
    assert attacks.picture_output(str(existing), force=True) == (str(existing), None)  # written over on request
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "attack_grid.png").write_bytes(b"keep")
    with pytest.raises(SystemExit) as stop:
        attacks.main(["--out", str(folder)])
    assert stop.value.code == 2 and "add --force" in capsys.readouterr().err


def test_demo_picture_goes_to_a_new_run_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    picture, folder = attacks.picture_output(None, force=False)
    assert os.path.basename(os.path.dirname(picture)).startswith("attack-") and picture.endswith("attack_grid.png")
    assert not os.path.exists(folder.folder)  # made only once there is a picture to write
    assert attacks.picture_output(str(tmp_path / "a.png"), force=False) == (str(tmp_path / "a.png"), None)


@pytest.mark.slow
def test_demo_prints_its_legend_and_writes_its_picture(tmp_path, capsys):
    # Two Adam steps, one restart: what is checked is the command, not the attack (15-35 s on 2 cores, compiling).
    path = tmp_path / "grid.png"
    attacks.main(["--steps", "2", "--restarts", "1", "--out", str(path)])
    printed = capsys.readouterr().out
    assert "the table's columns:" in printed and "  observed update  true: the user's own update" in printed
    assert f"picture: {path}, one row per model seed and user, 3 columns:" in printed
    assert "  from a wrong update   the reconstruction from digit" in printed
    assert matplotlib.image.imread(path).shape == (300, 450, 4)
