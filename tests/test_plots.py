"""``fedjax_users.plots``: the image grid holds its images where its size says, and ``fedjax-users
privacy --plot`` draws the accountant's own numbers."""

import math
import re

import matplotlib.image
import numpy as np
import pytest
from omegaconf import OmegaConf

from fedjax_users import UserConfig, accounting, cli, plots
from fedjax_users.data import load_case

DP = ["model=lenet_zhu", "user.local_diff_privacy.per_example_clipping=1.0",
      "user.local_diff_privacy.gradient_noise=2.5", "user.local_diff_privacy.distribution=gaussian"]


def panel_pixel(picture: np.ndarray, ax) -> np.ndarray:
    """The picture's pixel at the centre of ``ax`` (matplotlib counts pixels from the bottom)."""
    box = ax.get_window_extent()
    x, y = int((box.x0 + box.x1) / 2), int((box.y0 + box.y1) / 2)
    return picture[picture.shape[0] - 1 - y, x]


@pytest.mark.parametrize("rows, columns", [(1, 1), (2, 3), (4, 2)])
def test_image_grid_is_sized_by_its_panels_and_holds_each_image_in_place(tmp_path, rows, columns):
    # Each image a distinct flat grey (the grey of panel r, c is known), the last panel in colour.
    greys = np.linspace(0.1, 0.9, rows * columns).reshape(rows, columns)
    images = [[np.full((8, 8, 3), greys[r, c], np.float32) for c in range(columns)] for r in range(rows)]
    images[-1][-1] = np.zeros((8, 8, 3), np.float32) + np.asarray([1.0, 0.0, 0.0], np.float32)
    path = tmp_path / "grid.png"
    figure = plots.image_grid(images, path, titles=[[f"{r},{c}" for c in range(columns)] for r in range(rows)],
                              row_labels=[f"row {r}" for r in range(rows)],
                              column_labels=[f"column {c}" for c in range(columns)], panel_inches=1.5, dpi=100)
    picture = matplotlib.image.imread(path)
    assert picture.shape == (rows * 150, columns * 150, 4)
    for index, ax in enumerate(figure.axes):
        r, c = divmod(index, columns)
        expected = [1.0, 0.0, 0.0] if (r, c) == (rows - 1, columns - 1) else [greys[r, c]] * 3
        np.testing.assert_allclose(panel_pixel(picture, ax)[:3], expected, atol=1.5 / 255)


def test_image_grid_draws_grey_images_clips_to_the_range_and_leaves_none_empty(tmp_path):
    grey = np.full((4, 4), 5.0)  # in [0, 10]: drawn at half grey
    above = np.full((4, 4, 1), 20.0)  # outside the range: clipped to white
    path = tmp_path / "grid.png"
    figure = plots.image_grid(np.stack([[grey, above[..., 0]]]), path, value_range=(0.0, 10.0))
    picture = matplotlib.image.imread(path)
    np.testing.assert_allclose(panel_pixel(picture, figure.axes[0])[:3], 0.5, atol=1.5 / 255)
    np.testing.assert_allclose(panel_pixel(picture, figure.axes[1])[:3], 1.0, atol=1.5 / 255)
    figure = plots.image_grid([[above, None]], path, value_range=(0.0, 10.0))
    assert len(figure.axes[1].images) == 0 and len(figure.axes[0].images) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=[]), "at least one row"),
    (dict(images=[[np.zeros((2, 2))], [np.zeros((2, 2)), np.zeros((2, 2))]]), "every row of images must have 1"),
    (dict(titles=[["a"]]), "titles must be 1 rows of 2"),
    (dict(row_labels=["a", "b"]), "row_labels must have 1 entries"),
    (dict(column_labels=["a"]), "column_labels must have 2 entries"),
    (dict(images=[[np.zeros((2, 2, 2)), np.zeros((2, 2))]]), "got shape (2, 2, 2)"),
    (dict(value_range=(1.0, 1.0)), "value_range"),
])
def test_image_grid_mistakes(tmp_path, kwargs, message):
    arguments = dict(images=[[np.zeros((2, 2)), np.zeros((2, 2))]], path=tmp_path / "grid.png") | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        plots.image_grid(**arguments)
    assert not (tmp_path / "grid.png").exists()


def test_check_picture_path(tmp_path):
    existing = tmp_path / "grid.png"
    existing.write_bytes(b"")
    with pytest.raises(ValueError, match="exists: name another file, or add --force"):
        plots.check_picture_path(existing)
    assert plots.check_picture_path(existing, force=True) == str(existing)
    assert plots.check_picture_path(tmp_path / "new.svg") == str(tmp_path / "new.svg")
    with pytest.raises(ValueError, match=r"ending in one of .*\.png"):
        plots.check_picture_path(tmp_path / "grid.msgpack")
    with pytest.raises(ValueError, match="is not a writable folder"):
        plots.check_picture_path(tmp_path / "missing" / "grid.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValueError, match="it is a folder"):
        plots.check_picture_path(tmp_path / "folder.png")


def test_query_grid_spans_the_queries_asked_for():
    assert plots.query_grid([1, 100], points=5) == (1, 3, 10, 32, 100)
    grid = plots.query_grid([100, 7, 1])
    assert grid[0] == 1 and grid[-1] == 100 and 7 in grid and list(grid) == sorted(set(grid))
    assert plots.query_grid([10])[0] == 1 and plots.query_grid([10])[-1] == 1000  # one number is not a curve
    assert plots.query_grid([5000])[-1] == 5000
    with pytest.raises(ValueError, match="queries must be numbers >= 1"):
        plots.query_grid([0, 10])


def test_cli_privacy_plot_draws_the_accountants_epsilon_at_every_point(tmp_path, capsys, monkeypatch):
    drawn = []
    original = plots.epsilon_plot

    def recording(series, path, **kwargs):
        drawn.append((series, original(series, path, **kwargs)))
        return drawn[-1][1]

    monkeypatch.setattr(plots, "epsilon_plot", recording)
    path = tmp_path / "epsilon.png"
    assert cli.main(["privacy", *DP, "--delta", "1e-5", "1e-8", "--queries", "1", "300", "--plot", str(path)]) == 0
    assert "plot        " + str(path) + ": epsilon against 1 to 300 queries" in capsys.readouterr().out
    assert matplotlib.image.imread(path).shape[2] == 4  # a PNG that reads back
    (series, figure), = drawn
    assert series.queries == plots.query_grid([1, 300]) and series.deltas == (1e-5, 1e-8)
    cfg = UserConfig.from_dict(OmegaConf.to_container(load_case(None, DP).user, resolve=True))
    for i, delta in enumerate(series.deltas):
        expected = [accounting.guarantee(cfg, delta, q) for q in series.queries]
        assert series.pld[i] == tuple(g.epsilon for g in expected)
        assert series.rdp[i] == tuple(g.epsilon_rdp for g in expected)
        # More queries never give a smaller epsilon, and RDP is the looser bound.
        assert all(a <= b for a, b in zip(series.pld[i], series.pld[i][1:]))
        assert all(a <= b for a, b in zip(series.rdp[i], series.rdp[i][1:]))
        assert all(p <= r for p, r in zip(series.pld[i], series.rdp[i]))
    # What is on the picture is the series: two lines (PLD, RDP) per delta, on log axes.
    ax = figure.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 4 and ax.get_xscale() == "log"
    np.testing.assert_array_equal(lines[0].get_xdata(), series.queries)
    np.testing.assert_array_equal(lines[0].get_ydata(), series.pld[0])
    np.testing.assert_array_equal(lines[3].get_ydata(), series.rdp[1])
    assert "default_digits" in ax.get_title() and "gaussian gradient noise" in ax.get_title()


def test_cli_privacy_plot_mistakes_are_one_line(tmp_path, capsys):
    # A file matplotlib cannot write is refused before the report.
    assert cli.main(["privacy", *DP, "--plot", str(tmp_path / "epsilon.msgpack")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "ending in one of" in captured.err
    # No guarantee, nothing to draw: the report says why, the plot is not written.
    assert cli.main(["privacy", "model=lenet_zhu", "--plot", str(tmp_path / "epsilon.png")]) == 2
    captured = capsys.readouterr()
    assert "no DP guarantee" in captured.out and "nothing to plot" in captured.err
    assert not (tmp_path / "epsilon.png").exists()


def test_epsilon_plot_leaves_out_points_without_a_guarantee(tmp_path):
    series = plots.EpsilonSeries(queries=(1, 10), deltas=(1e-5,), pld=((1.0, math.inf),), rdp=((2.0, math.inf),))
    figure = plots.epsilon_plot(series, tmp_path / "epsilon.png", title="t")
    assert np.isnan(figure.axes[0].get_lines()[0].get_ydata()[1])
