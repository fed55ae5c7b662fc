"""DDPM noise schedule and the forward-process helpers both methods' diffusion code uses.

Time indexing: the library uses 0-based step indices ``t ∈ {0, …, T−1}``; index ``t`` is the paper's
step ``t + 1`` (ᾱ at index 0 is ᾱ_1 = 1 − β_1). This matches the reference code (guided-diffusion).

Class labels for classifier-free guidance: ``0 = healthy``, ``1 = unhealthy``, ``2 = null`` (∅);
the UNet that takes them is :class:`AnomalyDiffusionLib.nets.UNet`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

HEALTHY, UNHEALTHY, NULL = 0, 1, 2


# -------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """Linear β schedule: β_t from ``beta_start`` to ``beta_end`` over ``steps`` (paper: 1e-4, 0.02, 1000)."""

    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def betas(self) -> np.ndarray:
        return np.linspace(self.beta_start, self.beta_end, self.steps, dtype=np.float64)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t = ∏_{i≤t} (1 − β_i), float64, index 0 = paper step 1."""
        return np.cumprod(1.0 - self.betas)

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """ᾱ as a float64 tensor (cast per use; float32 loses digits near ᾱ ≈ 1)."""
        return torch.as_tensor(self.alphas_cumprod, dtype=torch.float64, device=device)

    def as_dict(self) -> dict:
        return {"kind": "linear", **asdict(self)}


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gather ``values[t]`` and shape it ``[N, 1, 1, …]`` to broadcast over an ``ndim`` tensor."""
    return values[t].to(dtype).reshape(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Eq. 2: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    a = extract(abar, t, x0.ndim, x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Eq. 2 inverted (eqs. 7 and 10 with a given ε): x̃_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    a = extract(abar, t, x_t.ndim, x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()
