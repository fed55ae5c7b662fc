"""The variance-preserving SDE of AnoDODE eqs. 6-9 (score_sde's ``VPSDE``), on t ∈ [0, 1].

β(t) = β_min + t (β_max − β_min), with β_min = 0.1 and β_max = 20.

- Forward SDE (eq. 6): dz = −½β(t) z dt + √β(t) dw.
- Perturbation kernel (eq. 8): z(t) | z(0) ~ N(m(t) z(0), σ(t)² I), with
  log m(t) = −¼t²(β_max − β_min) − ½tβ_min and σ(t)² = 1 − m(t)².
- Reverse SDE (eq. 7): drift −½βz − β·s.
- Probability-flow ODE (eq. 9): f̃ = −½βz − ½β·s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSDE:
    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000  #: discretisation used by the predictor-corrector sampler

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(t), σ(t)) of the perturbation kernel, eq. 8."""
        lmc = self.log_mean_coeff(t)
        return torch.exp(lmc), torch.sqrt(-torch.expm1(2 * lmc))

    def perturb(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample z(t) | z(0) (eq. 8); ``t`` is [B]."""
        m, s = self.marginal(t)
        shape = (-1, *([1] * (z0.ndim - 1)))
        return m.reshape(shape) * z0 + s.reshape(shape) * noise

    def drift(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward drift f(z, t) = −½β(t) z (eq. 6)."""
        return -0.5 * self.beta(t).reshape(-1, *([1] * (z.ndim - 1))) * z

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t) = √β(t)."""
        return torch.sqrt(self.beta(t))

    def reverse_drift(self, z: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Drift of the reverse-time SDE, f − g² s (eq. 7)."""
        return self.drift(z, t) - self.beta(t).reshape(-1, *([1] * (z.ndim - 1))) * score

    def ode_drift(self, z: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Probability-flow ODE drift f̃ = f − ½ g² s (eq. 9)."""
        return self.drift(z, t) - 0.5 * self.beta(t).reshape(-1, *([1] * (z.ndim - 1))) * score

    @staticmethod
    def prior_logp(z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) per sample: −D/2 log 2π − ‖z‖²/2."""
        d = z[0].numel()
        return -0.5 * d * math.log(2 * math.pi) - 0.5 * z.reshape(z.shape[0], -1).pow(2).sum(1)

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(β_i, α_i) of the N-step discretisation used by the sampler (β_i = β(t_i)/N)."""
        betas = torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N, dtype=torch.float64)
        return betas, 1.0 - betas
