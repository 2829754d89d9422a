"""Power-law fits of the benchmark (spec §4 Phase III and §5), by nonlinear least squares (scipy curve_fit).

LossLaw:    L(D)    = α·D^(−B) + β          AdamW's final loss against the Chinchilla multiple, one per model size.
HparamLaw:  h(N, D) = α·N^(−A)·D^(−B) + β   an optimal hyperparameter against non-embedding params and the multiple.
"""

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


class FitError(ValueError):
    """The data cannot determine the law (too few points, or the optimiser did not converge)."""


@dataclass(frozen=True)
class LossLaw:
    alpha: float
    B: float
    beta: float

    def __call__(self, D):
        return self.alpha * np.power(D, -self.B) + self.beta

    def equivalent_budget(self, loss):
        """D_eff = ((L − β)/α)^(−1/B): the budget at which this law reaches `loss`; inf when loss ≤ β."""
        excess = (np.asarray(loss, dtype=float) - self.beta) / self.alpha
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.where(excess > 0, np.power(np.maximum(excess, 1e-300), -1.0 / self.B), np.inf)


def fit_loss_law(ratios, losses) -> LossLaw:
    """Fit L(D) = α·D^(−B) + β with the spec's p0 = [L(D_min) − L(D_max), 0.5, L(D_max)]."""
    D = np.asarray(ratios, dtype=float)
    L = np.asarray(losses, dtype=float)
    if D.shape != L.shape or D.ndim != 1:
        raise FitError(f"ratios and losses must be 1-D of one length, got {D.shape} and {L.shape}")
    if len(np.unique(D)) < 3:
        raise FitError(f"a loss law has 3 parameters: need losses at ≥ 3 distinct ratios, "
                       f"got {sorted(set(D.tolist()))}")
    if not np.all(np.isfinite(L)):
        raise FitError("losses must be finite (a diverged run cannot enter the fit)")
    order = np.argsort(D)
    p0 = [L[order[0]] - L[order[-1]], 0.5, L[order[-1]]]
    params = _curve_fit(lambda d, a, b, c: a * np.power(d, -b) + c, D, L, p0)
    return LossLaw(*params)


@dataclass(frozen=True)
class HparamLaw:
    alpha: float
    A: float
    B: float
    beta: float
    heldout: tuple | None = None  # (N, D, actual, predicted) of the point kept out of the fit

    def __call__(self, N, D):
        return self.alpha * np.power(N, -self.A) * np.power(D, -self.B) + self.beta

    @property
    def heldout_error(self) -> float | None:
        """Relative error |predicted − actual| / |actual| on the held-out point."""
        if self.heldout is None:
            return None
        _, _, actual, predicted = self.heldout
        return abs(predicted - actual) / abs(actual) if actual else abs(predicted - actual)


def fit_hparam_law(N, D, values, drop_first: bool = True, hold_out_last: bool = True) -> HparamLaw:
    """Fit h(N, D) = α·N^(−A)·D^(−B) + β to optimal hyperparameter values.

    As the spec's code: points ordered by (N, D); the first (smallest model, smallest budget) is dropped, the last
    (largest model, largest budget) is held out to report the error, the rest are fitted from p0 = (0, 0.5, 0.5, mean).
    N is scaled by its smallest value inside the fit so the optimiser sees O(1) numbers; α is reported in N's units.
    """
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    h = np.asarray(values, dtype=float)
    if not (N.shape == D.shape == h.shape) or N.ndim != 1:
        raise FitError(f"N, D and values must be 1-D of one length, got {N.shape}, {D.shape}, {h.shape}")
    fitted = len(N) - int(drop_first) - int(hold_out_last)
    if fitted < 5:
        raise FitError(f"a hyperparameter law has 4 parameters: need ≥ 5 fitted points, have {max(fitted, 0)} "
                       f"of {len(N)} (first dropped: {drop_first}, last held out: {hold_out_last})")
    order = np.lexsort((D, N))
    N, D, h = N[order], D[order], h[order]
    heldout_index = len(N) - 1 if hold_out_last else None
    keep = np.ones(len(N), dtype=bool)
    keep[0] = not drop_first
    if heldout_index is not None:
        keep[heldout_index] = False
    N0 = N.min()
    params = _curve_fit(lambda x, a, ea, eb, c: a * np.power(x[0], -ea) * np.power(x[1], -eb) + c,
                        np.vstack([N[keep] / N0, D[keep]]), h[keep], [0.0, 0.5, 0.5, float(h[keep].mean())])
    alpha, A, B, beta = params
    law = HparamLaw(alpha * N0 ** A, A, B, beta)
    if heldout_index is None:
        return law
    point = (N[heldout_index], D[heldout_index], h[heldout_index])
    return HparamLaw(law.alpha, A, B, beta, heldout=(*point, float(law(point[0], point[1]))))


def _curve_fit(function, x, y, p0):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # covariance is unused: an exact fit has none
            params, _ = curve_fit(function, x, y, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError) as error:
        raise FitError(f"curve_fit did not converge: {error}") from error
    if not np.all(np.isfinite(params)):
        raise FitError(f"curve_fit returned non-finite parameters {params}")
    return tuple(float(p) for p in params)
