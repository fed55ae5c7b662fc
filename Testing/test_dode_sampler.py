"""Predictor-corrector sampler against the exact Gaussian score."""

from __future__ import annotations

import pytest
import torch

from AnomalyDiffusionLib.dode.sampler import pc_denoise
from AnomalyDiffusionLib.dode.sde import VPSDE

SDE = VPSDE(N=500)


def gaussian_score(mu: torch.Tensor, var: torch.Tensor):
    def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m, s = SDE.marginal(t)
        m, s = m.reshape(-1, 1), s.reshape(-1, 1)
        return -(z - m * mu) / (m**2 * var + s**2)

    return fn


@pytest.mark.parametrize("t0", [0.3, 1.0])
def test_pc_denoising_with_the_exact_score_returns_data_distributed_samples(t0):
    """With the true score the sampler is a sampler of the data: started from data perturbed to t0,
    the outputs have the data's mean and variance (4,000 samples; tolerances ≫ sampling error)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    var = torch.tensor([0.25, 1.0, 0.04, 2.0], dtype=torch.float64)
    z0 = mu + var.sqrt() * torch.randn(4000, 4, generator=g, dtype=torch.float64)
    out = pc_denoise(gaussian_score(mu, var), z0, t0=t0, sde=SDE, generator=g)
    assert torch.allclose(out.mean(0), mu, atol=0.08)
    assert torch.allclose(out.var(0), var, rtol=0.12)


def test_small_t0_keeps_the_input_and_the_predictor_follows_eq_14():
    g = torch.Generator().manual_seed(1)
    mu, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    z0 = torch.randn(200, 3, generator=g, dtype=torch.float64) * 2
    out = pc_denoise(gaussian_score(mu, var), z0, t0=0.004, sde=SDE, generator=g)
    assert (out - z0).abs().mean() < 0.2  # t0 ≈ 0: almost no perturbation, output ≈ input
    with pytest.raises(ValueError, match="t0"):
        pc_denoise(gaussian_score(mu, var), z0, t0=0.0, sde=SDE)
