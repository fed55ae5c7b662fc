"""Predictor-corrector denoising of features for AnoDODE localisation (section 4.3, eqs. 14-15).

Features are perturbed to diffusion time t0 with the VP marginal (eq. 8), then denoised back to ε
with N·t0 steps of the N-step discretisation. Each step runs:

1. a Langevin corrector (eq. 15): z ← z + h s + √(2h) ε, with h = 2 α_i (r ‖ε‖ / ‖s‖)², the norms
   averaged over the batch as in score_sde (per-sample norms give samples near the mode, where
   ‖s‖ → 0, huge steps and inflate the variance), and snr r = 0.16;
2. the reverse-diffusion predictor (eq. 14): z ← (1 + ½β_i) z + β_i s + √β_i ε, with β_i the
   discrete β of step i.

The last predictor step returns its mean (no noise), as in score_sde's ``denoise=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .sde import VPSDE

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mean_norm(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).norm(dim=1).mean()


@torch.no_grad()
def pc_denoise(
    score_fn: ScoreFn,
    z0: torch.Tensor,
    t0: float = 0.5,
    sde: VPSDE | None = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Perturb ``z0`` [B, ...] to time ``t0`` and denoise it with the PC sampler.

    ``sde.N`` sets the discretisation (paper: N = 500 for the whole [ε, 1] range).
    """
    sde = sde or VPSDE()
    if not 0 < t0 <= 1:
        raise ValueError(f"t0 must be in (0, 1], got {t0}")
    betas, alphas = sde.discrete()
    b = z0.shape[0]

    def randn() -> torch.Tensor:
        return torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)

    t_start = torch.full((b,), t0, dtype=z0.dtype, device=z0.device)
    z = sde.perturb(z0, t_start, randn())
    n = max(1, round(t0 * sde.N))
    times = torch.linspace(t0, eps, n, dtype=torch.float64)
    shape = (-1, *([1] * (z0.ndim - 1)))
    z_mean = z
    for t in times:
        i = round(float(t) * (sde.N - 1))
        tt = torch.full((b,), float(t), dtype=z0.dtype, device=z0.device)
        for _ in range(corrector_steps):  # eq. 15
            s = score_fn(z, tt)
            noise = randn()
            h = 2 * float(alphas[i]) * (snr * _mean_norm(noise) / _mean_norm(s).clamp_min(1e-12)) ** 2
            z = z + h * s + torch.sqrt(2 * h) * noise
        beta = float(betas[i])
        s = score_fn(z, tt)
        z_mean = (1 + 0.5 * beta) * z + beta * s  # eq. 14
        z = z_mean + (beta**0.5) * randn()
    return z_mean.reshape(shape[0], *z0.shape[1:])
