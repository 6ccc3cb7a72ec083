"""Is a noise row's KS miss a difference or chance? Its KS p-values over fresh seeds, three ways.

``python -m parity.noise_null CASE [--draws N]`` runs one gradient-noise case of the parity grid
(``python -m parity --list``-style names, e.g. ``linear/local_update/no-buffers/gradient_noise``)
with ``N + 1`` fresh noise seeds on each side and prints the two-sample KS p-values of the noise
residuals (noisy update minus noise-free update, subsampled as the parity check does):

* ours against ours (our first draw against each other draw),
* theirs against theirs (the same for breaching 0.1.2's own user),
* ours against theirs (draw ``i`` against draw ``i``),

and the residuals' mean spread, excess kurtosis and mean on each side.

The parity check compares one fixed draw on each side first, and judges a miss (p below
``parity_check.NOISE_P_VALUE``) on fresh draws pooled (``parity_check.compare_noise``). Its KS test takes
the residual's entries as independent, which they are not for a multi-step user: the noise of one
step moves the gradients of the next, so each draw's residual carries a shared component on top of
the summed noise. If ours-against-theirs p-values over fresh seeds look like the two same-side
rows, a fixed draw's low p is that dependence and chance, not a different distribution.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch
from scipy import stats

from fedjax_users.interop import parity_check
from parity import harness
from parity.cases import cases_by_name


def _subsample(values: np.ndarray) -> np.ndarray:
    """The parity check's subsample of one side's residual (its first draw picks the same way)."""
    return parity_check.ks_sample(values, np.random.default_rng(0))


def residuals(name: str, draws: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``draws + 1`` subsampled noise residuals of case ``name``: ours, then breaching's.

    Args:
      name: a gradient-noise case of a single user (not an aggregate).
      draws: the number of draws compared against the first.

    Returns:
      ``(ours, theirs)``, each a list of ``draws + 1`` arrays.
    """
    case = cases_by_name()[name]
    setting, model, users_data = harness.case_setting(case)
    if setting.aggregate or setting.cfg.local_diff_privacy.gradient_noise <= 0:
        raise SystemExit(f"{name}: not a single user's gradient-noise case")
    cfg, clean_cfg = setting.cfg, setting.clean_cfg
    ours_clean = parity_check.run_drop_in(setting, model, users_data, clean_cfg, jax.random.key(0))[0]["gradients"]
    torch.manual_seed(0)
    theirs_clean = parity_check.run_reference(setting, model, users_data, clean_cfg)[0][0]["gradients"]

    def ours(seed: int) -> np.ndarray:
        noisy = parity_check.run_drop_in(setting, model, users_data, cfg, jax.random.key(seed))[0]["gradients"]
        return _subsample(parity_check.noise_residual(noisy, ours_clean))

    def theirs(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        noisy = parity_check.run_reference(setting, model, users_data, cfg)[0][0]["gradients"]
        return _subsample(parity_check.noise_residual(noisy, theirs_clean))

    return [ours(1000 + s) for s in range(draws + 1)], [theirs(5000 + s) for s in range(draws + 1)]


def _row(label: str, pairs) -> None:
    p_values = sorted(stats.ks_2samp(a, b).pvalue for a, b in pairs)
    print(f"{label:18s} KS p: " + " ".join(f"{p:.2g}" for p in p_values))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", default="linear/local_update/no-buffers/gradient_noise")
    parser.add_argument("--draws", type=int, default=10, help="draws compared on each side")
    args = parser.parse_args(argv)
    ours, theirs = residuals(args.case, args.draws)
    print(f"{args.case}: {args.draws} fresh draws a side, {ours[0].size} entries each")
    _row("ours vs ours", [(ours[0], o) for o in ours[1:]])
    _row("theirs vs theirs", [(theirs[0], t) for t in theirs[1:]])
    _row("ours vs theirs", list(zip(ours[1:], theirs[1:])))
    for label, draws in (("ours", ours), ("theirs", theirs)):
        print(f"{label:7s} std {np.mean([d.std() for d in draws]):.4g}, excess kurtosis "
              f"{np.mean([stats.kurtosis(d) for d in draws]):.3f}, mean {np.mean([d.mean() for d in draws]):.2g}")


if __name__ == "__main__":
    main()
