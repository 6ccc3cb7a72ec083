"""Pictures a person looks at rather than reads: a grid of images, and epsilon against queries.

``image_grid`` lays out any number of rows and columns of images (e.g. originals next to their
reconstructions, one row per user or per defence), each panel with its own title, and
``epsilon_series`` / ``epsilon_plot`` draw a config's DP guarantee against the number of queries,
one line per delta. Both draw on a ``matplotlib.figure.Figure`` of their own rendered by the Agg
canvas: no pyplot, so no global state, no window and no display is needed; the file's format
follows its extension (``.png``, ``.pdf``, ``.svg``, ...).

Example::

    >>> import os, tempfile
    >>> import numpy as np
    >>> from fedjax_users import plots
    >>> ramp = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "grid.png")
    ...     figure = plots.image_grid([[ramp, 1.0 - ramp]], path, titles=[["ramp", "inverted"]],
    ...                               row_labels=["user 0"], column_labels=["original", "reconstruction"])
    ...     written = os.path.exists(path)
    >>> written, len(figure.axes)
    (True, 2)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedjax_users import accounting
from fedjax_users.config import UserConfig

__all__ = ["EpsilonSeries", "check_picture_path", "epsilon_plot", "epsilon_series", "image_grid", "query_grid"]

# Text sizes in points: a panel is 1.5 inches, so a title must fit about 25 characters a line.
PANEL_FONT_SIZE = 8
LABEL_FONT_SIZE = 9


def check_picture_path(path: str | os.PathLike, force: bool = False) -> str:
    """Raise ``ValueError`` unless a picture can be written at ``path``; return it as a string.

    Checked before anything is computed, so that a long computation does not end in a file it
    cannot write.

    Args:
      path: the picture's file; its extension names the format (one matplotlib writes).
      force: write over a file that is already there.

    Returns:
      ``path`` as a string.

    Raises:
      ValueError: an extension matplotlib cannot write, a folder at ``path``, a missing or
        read-only folder, or (without ``force``) an existing file.

    Example::

        >>> check_picture_path("epsilon.txt")
        Traceback (most recent call last):
        ...
        ValueError: cannot write a picture to epsilon.txt: name a file ending in one of ... (e.g. .png)
    """
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension not in formats:
        raise ValueError(f"cannot write a picture to {path}: name a file ending in one of "
                         f"{', '.join('.' + f for f in sorted(formats))} (e.g. .png)")
    if os.path.isdir(path):
        raise ValueError(f"cannot write a picture to {path}: it is a folder")
    if os.path.exists(path) and not force:
        raise ValueError(f"{path} exists: name another file, or add --force to write over it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write a picture to {path}: {folder} is not a writable folder")
    return path


def _panel(image: Any, value_range: tuple[float, float]) -> tuple[np.ndarray, Optional[str]]:
    """An image scaled to [0, 1] for ``imshow``, and the colour map a single channel needs."""
    array = np.asarray(image, np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    lo, hi = value_range
    # imshow clips RGB floats to [0, 1] itself but warns; scale and clip here so that a
    # reconstruction slightly outside the data range draws without noise in the output.
    scaled = np.clip((array - lo) / (hi - lo), 0.0, 1.0)
    return scaled, ("gray" if scaled.ndim == 2 else None)


def _table(name: str, values: Optional[Sequence[Sequence[Any]]], rows: int, columns: int) -> None:
    if values is not None and (len(values) != rows or any(len(row) != columns for row in values)):
        raise ValueError(f"{name} must be {rows} rows of {columns}, like the images")


def image_grid(
    images: Sequence[Sequence[Any]],
    path: str | os.PathLike,
    *,
    titles: Optional[Sequence[Sequence[str]]] = None,
    row_labels: Optional[Sequence[str]] = None,
    column_labels: Optional[Sequence[str]] = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    panel_inches: float = 1.5,
    dpi: int = 100,
) -> Figure:
    """Write a grid of images, one panel per image, to ``path``.

    The picture is ``rows * panel_inches * dpi`` pixels high and ``columns * panel_inches * dpi``
    wide, whatever the titles: a grid of more users or more defences is a larger picture, not
    smaller panels.

    Args:
      images: rows of images, every row as long (an array ``[rows, columns, H, W(, C)]`` works
        too). An image is ``[H, W]``, ``[H, W, 1]`` (drawn in grey), ``[H, W, 3]`` (RGB) or
        ``[H, W, 4]``; ``None`` leaves its panel empty.
      path: the file; its extension names the format (``.png``, ``.pdf``, ``.svg``, ...).
        Written over if it exists: check first with ``check_picture_path``.
      titles: one title per panel (rows of strings, like ``images``), e.g. each reconstruction's
        PSNR.
      row_labels: one label per row, at the left of the row.
      column_labels: one label per column, above the top row's titles.
      value_range: the images' ``(lo, hi)``: drawn black to white, values outside clipped.
      panel_inches: the side of one panel; with ``dpi``, its size in pixels.
      dpi: pixels per inch of the file.

    Returns:
      The drawn figure (its axes, one per panel row by row, hold where each panel landed).

    Raises:
      ValueError: an empty grid, rows of different lengths, titles or labels that do not match
        the grid, or an image of a shape that is not a picture.

    Example::

        >>> import os, tempfile, numpy as np
        >>> original = np.random.default_rng(0).random((8, 8, 3))   # [H, W, 3] in [0, 1]
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     figure = image_grid([[original, original * 0.5], [original, None]], os.path.join(folder, "grid.png"),
        ...                         titles=[["", "25.9 dB"], ["", ""]], row_labels=["true", "wrong"],
        ...                         column_labels=["original", "reconstruction"], panel_inches=0.5)
        >>> figure.get_size_inches().tolist()  # 2 columns, 2 rows of 0.5 inches
        [1.0, 1.0]
    """
    grid = [list(row) for row in images]
    rows, columns = len(grid), len(grid[0]) if grid else 0
    if rows == 0 or columns == 0:
        raise ValueError("image_grid needs at least one row of at least one image")
    if any(len(row) != columns for row in grid):
        raise ValueError(f"every row of images must have {columns} images, got rows of {[len(r) for r in grid]}")
    _table("titles", titles, rows, columns)
    for name, labels, size in (("row_labels", row_labels, rows), ("column_labels", column_labels, columns)):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} must have {size} entries, got {len(labels)}")
    if not value_range[1] > value_range[0]:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")

    figure = Figure(figsize=(columns * panel_inches, rows * panel_inches), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for r in range(rows):
        for c in range(columns):
            ax = axes[r][c]
            # Ticks off, the frame kept: a dark reconstruction still shows where its panel ends.
            ax.set_xticks([])
            ax.set_yticks([])
            if grid[r][c] is not None:
                panel, cmap = _panel(grid[r][c], value_range)
                ax.imshow(panel, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.set_frame_on(False)
            lines = []
            if r == 0 and column_labels is not None:
                lines.append(column_labels[c])
            if titles is not None and titles[r][c]:
                lines.append(titles[r][c])
            if lines:
                ax.set_title("\n".join(lines), fontsize=PANEL_FONT_SIZE)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=LABEL_FONT_SIZE)
    figure.savefig(os.fspath(path), dpi=dpi, facecolor="white")
    return figure


# ----------------------------------------------------------------------------------------------
# Epsilon against the number of queries


@dataclasses.dataclass(frozen=True)
class EpsilonSeries:
    """A config's epsilon at each delta and number of queries: what ``epsilon_plot`` draws.

    Attributes:
      queries: the numbers of queries, increasing.
      deltas: the deltas, one line each.
      pld: ``pld[i][j]`` is ``accounting.guarantee(cfg, deltas[i], queries[j], ...).epsilon``
        (``inf`` without a guarantee).
      rdp: the same guarantees' ``epsilon_rdp``.
    """

    queries: tuple[int, ...]
    deltas: tuple[float, ...]
    pld: tuple[tuple[float, ...], ...]
    rdp: tuple[tuple[float, ...], ...]


def query_grid(queries: Sequence[int], points: int = 25, span: int = 1000) -> tuple[int, ...]:
    """Numbers of queries spread evenly on a log scale over the range of ``queries``.

    Args:
      queries: the numbers of queries asked for (e.g. ``fedjax-users privacy --queries``); all of
        them are in the result, with up to ``points`` more between the smallest and the largest.
      points: how many log-spaced numbers to add (rounded to integers, duplicates dropped).
      span: where ``queries`` is a single number, the range is 1 to the larger of it and ``span``
        (one point is not a curve).

    Returns:
      The sorted, distinct numbers of queries.

    Example::

        >>> query_grid([1, 100], points=5)
        (1, 3, 10, 32, 100)
    """
    if not queries or any(int(q) < 1 for q in queries):
        raise ValueError(f"queries must be numbers >= 1, got {list(queries)!r}")
    lo, hi = min(int(q) for q in queries), max(int(q) for q in queries)
    if lo == hi:
        lo, hi = 1, max(hi, span)
    spread = np.rint(np.geomspace(lo, hi, points)).astype(int)
    return tuple(sorted({int(q) for q in spread} | {int(q) for q in queries}))


def epsilon_series(cfg: UserConfig, deltas: Sequence[float], queries: Sequence[int], **options: Any) -> EpsilonSeries:
    """``accounting.guarantee`` of ``cfg`` at every delta and number of queries.

    Args:
      cfg: the user config.
      deltas: the deltas, one line each in ``epsilon_plot``.
      queries: the numbers of queries (e.g. ``query_grid(...)``).
      **options: passed on to ``accounting.guarantee`` (``unit``, ``relation``, ``num_params``,
        ``input_bounds``, ...).

    Returns:
      The :class:`EpsilonSeries`.

    Example::

        >>> from fedjax_users.config import LocalDiffPrivacy, UserConfig
        >>> dp = LocalDiffPrivacy(gradient_noise=1.0, per_example_clipping=1.0, distribution="gaussian")
        >>> series = epsilon_series(UserConfig(user_type="local_gradient", num_data_points=4, local_diff_privacy=dp),
        ...                         [1e-5], [1, 10])
        >>> [round(e, 2) for e in series.pld[0]]  # epsilon grows with the queries
        [1.99, 7.51]
    """
    pld, rdp = [], []
    for delta in deltas:
        found = [accounting.guarantee(cfg, delta, int(q), **options) for q in queries]
        pld.append(tuple(g.epsilon for g in found))
        rdp.append(tuple(g.epsilon_rdp for g in found))
    return EpsilonSeries(tuple(int(q) for q in queries), tuple(float(d) for d in deltas), tuple(pld), tuple(rdp))


def epsilon_plot(series: EpsilonSeries, path: str | os.PathLike, *, title: str,
                 size_inches: tuple[float, float] = (6.4, 4.4), dpi: int = 100) -> Figure:
    """Write epsilon against the number of queries (both on log scales), one colour per delta, to ``path``.

    PLD's epsilon (the tight one) is a solid line, RDP's (looser) a dashed one of the same
    colour; a point without a guarantee is left out.

    Args:
      series: what to draw (``epsilon_series``).
      path: the file; its extension names the format. Written over if it exists.
      title: the picture's title (e.g. the case and the mechanism).
      size_inches: the picture's (width, height).
      dpi: pixels per inch of the file.

    Returns:
      The drawn figure.

    Raises:
      ValueError: no point of ``series`` has a finite epsilon (no DP guarantee to draw).

    Example::

        >>> import os, tempfile
        >>> series = EpsilonSeries(queries=(1, 10), deltas=(1e-5,), pld=((2.0, 7.5),), rdp=((2.2, 8.1),))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     figure = epsilon_plot(series, os.path.join(folder, "epsilon.png"), title="gaussian gradient noise",
        ...                           size_inches=(3.0, 2.0), dpi=50)
        >>> [line.get_label() for line in figure.axes[0].get_lines()]
        ['delta 1e-05 (PLD)', 'delta 1e-05 (RDP)']
    """
    finite = [[e if math.isfinite(e) else math.nan for e in row] for row in series.pld + series.rdp]
    if all(math.isnan(e) for row in finite for e in row):
        raise ValueError("nothing to plot: epsilon is infinite at every point (no DP guarantee)")
    figure = Figure(figsize=size_inches, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    count = len(series.deltas)
    for i, delta in enumerate(series.deltas):
        colour = f"C{i}"
        ax.plot(series.queries, finite[i], color=colour, marker=".", label=f"delta {delta:g} (PLD)")
        ax.plot(series.queries, finite[count + i], color=colour, linestyle="--", label=f"delta {delta:g} (RDP)")
    # Both axes logarithmic: epsilon spans orders of magnitude over 1..1000 queries, and its growth
    # (about sqrt(queries) for Gaussian noise, until it turns linear) reads as a slope.
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of queries (log scale)")
    ax.set_ylabel("epsilon (log scale)")
    ax.set_title(title, fontsize=LABEL_FONT_SIZE + 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=PANEL_FONT_SIZE)
    figure.savefig(os.fspath(path), dpi=dpi, facecolor="white")
    return figure
