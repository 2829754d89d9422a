"""The power-law fits recover known parameters from synthetic data (spec §4 Phase III, §5)."""

import numpy as np
import pytest
import torch

from fastoptim.grid.fits import FitError, fit_hparam_law, fit_loss_law

PAPER_N = [134_217_728, 301_989_888, 536_870_912]  # spec §2: 512·d² for d = 512, 768, 1024
RATIOS = [1, 2, 4, 8]


def numpy_random(rng):
    """A numpy Generator drawn from conftest's per-test torch generator (fresh each run, reproducible by its seed)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))


@pytest.mark.parametrize("draw", range(4))
def test_loss_law_recovers_parameters(draw, rng):
    rng = numpy_random(rng)
    alpha, B, beta = rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.7), rng.uniform(2.5, 3.5)
    D = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    law = fit_loss_law(D, alpha * D ** -B + beta)
    assert law.alpha == pytest.approx(alpha, rel=1e-5)
    assert law.B == pytest.approx(B, rel=1e-5)
    assert law.beta == pytest.approx(beta, rel=1e-6)


def test_loss_law_with_noise_stays_close_and_reproduces_spec_table(rng):
    # Spec §5 table, 130M: α=0.417, B=0.495, β=3.112 (α+β = 3.529, AdamW's best 130M 1× loss in §1.1).
    D = np.array(RATIOS, dtype=float)
    clean = 0.417 * D ** -0.495 + 3.112
    noisy = clean + numpy_random(rng).normal(0, 2e-4, size=D.shape)
    law = fit_loss_law(D, noisy)
    np.testing.assert_allclose(law(D), clean, atol=1e-3)
    assert law(1.0) == pytest.approx(3.529, abs=1e-3)


def test_loss_law_needs_three_finite_ratios():
    with pytest.raises(FitError, match="≥ 3 distinct ratios"):
        fit_loss_law([1, 2, 2], [3.5, 3.4, 3.41])
    with pytest.raises(FitError, match="finite"):
        fit_loss_law([1, 2, 4], [3.5, np.inf, 3.3])
    with pytest.raises(FitError, match="one length"):
        fit_loss_law([1, 2, 4], [3.5, 3.4])


@pytest.mark.parametrize("draw", range(4))
def test_hparam_law_recovers_parameters_and_predicts_next_size(draw, rng):
    rng = numpy_random(rng)
    alpha, A, B, beta = rng.uniform(5, 50), rng.uniform(0.1, 0.4), rng.uniform(0.05, 0.3), rng.uniform(0, 2e-3)
    N, D = np.array([(n, d) for n in PAPER_N for d in RATIOS], dtype=float).T
    h = alpha * N ** -A * D ** -B + beta  # an optimal lr around 1e-2, falling with N and D

    law = fit_hparam_law(N, D, h)
    np.testing.assert_allclose([law.alpha, law.A, law.B, law.beta], [alpha, A, B, beta], rtol=1e-4, atol=1e-8)
    # Held out: the largest (N, D) point, as the study's code does; exact data → ~0 error.
    assert law.heldout[:2] == (PAPER_N[-1], 8.0)
    assert law.heldout_error < 1e-6
    n_next = 1_207_959_552
    assert law(n_next, 1.0) == pytest.approx(alpha * n_next ** -A + beta, rel=1e-5)


def test_hparam_law_drops_first_point_as_the_study_does():
    N, D = np.array([(n, d) for n in PAPER_N for d in RATIOS], dtype=float).T
    h = 30.0 * N ** -0.3 * D ** -0.1
    h_outlier = h.copy()
    h_outlier[0] = 1.0  # (130M, 1×): dropped from the fit, so it cannot disturb it
    law = fit_hparam_law(N[::-1], D[::-1], h_outlier[::-1])  # input order does not matter
    np.testing.assert_allclose([law.alpha, law.A, law.B], [30.0, 0.3, 0.1], rtol=1e-4)
    with pytest.raises(FitError):
        fit_hparam_law(N[:6], D[:6], h[:6])  # 6 points − dropped − held out = 4 < 5
