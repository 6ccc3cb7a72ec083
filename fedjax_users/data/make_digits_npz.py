"""Regenerate ``digits.npz`` from scikit-learn's copy of the UCI handwritten digits.

Run once, where scikit-learn is importable (it is not a dependency of this package)::

    python -m fedjax_users.data.make_digits_npz

The file holds ``images`` (uint8 [1797, 8, 8], grey levels 0..16) and ``labels`` (uint8 [1797]),
in scikit-learn's order. The package reads it with numpy alone (``sources.embedded_digits``).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["OUTPUT", "main"]

OUTPUT = os.path.join(os.path.dirname(__file__), "digits.npz")


def main() -> None:
    """Export the 8x8 digits to ``OUTPUT`` as a compressed .npz."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images
    # The grey levels are exact small integers stored as floats; check before narrowing.
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
        raise SystemExit("unexpected digits values: expected integers in 0..16")
    np.savez_compressed(OUTPUT, images=images.astype(np.uint8), labels=digits.target.astype(np.uint8))


if __name__ == "__main__":
    main()
