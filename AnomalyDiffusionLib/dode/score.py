"""Score networks for feature maps (AnoDODE section 5: ADM UNet on 2×2 … 8×8 maps with 304 channels).

The network predicts the noise ε of z_t = m(t) z_0 + σ(t) ε; the score is s = −ε̂/σ(t), the
parameterisation score_sde uses for the VP SDE. Continuous t ∈ [0, 1] is embedded as 999·t, so the
timestep embedding sees the same range as a 1000-step DDPM. Training is denoising score matching
(eq. 3) with λ(t) = σ(t)²: E‖σ(t) s_θ(z_t, t) + ε‖².

Gaussian skip (``config.extra["gaussian_skip"]``, on for new networks): ε̂ = σ(t)·z_t + UNet(z_t, t).
The features are standardised per channel, so N(0, I) is the natural reference density, and for it
E[ε | z_t] = σ(t)·z_t exactly (the VP marginal of unit-variance data has unit variance). Without the
skip, a UNet whose only input and output are 3×3 convolutions 192 → 64 → 192 channels can express ε̂
only in a fixed subspace of a third of the feature dimensions; in the other directions the learned
density is flat and a lesion there cannot raise the bpd (measured on the first bundle: Jacobian rank
≈ 992 of 3,072, ε-MSE 0.77-0.80 for t ∈ [0.4, 1] where σ(t)·z_t alone gets 0.002-0.06). With the skip
every direction has at least the standard-normal density and the UNet learns the departures from it;
its zero-initialised output makes the untrained network exactly N(0, I).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nets import UNet, UNetConfig
from .sde import VPSDE


def score_config(name: str, channels: int, size: int, gaussian_skip: bool = True) -> UNetConfig:
    """UNet for ``channels`` × ``size`` × ``size`` feature maps (``gaussian_skip``: see the module doc).

    * ``paper``: ADM-style, 128 base channels, multipliers (1, 2) and attention at every level.
    * ``small``: 64 base channels, multipliers (1, 2).
    * ``tiny``: 16 base channels, for tests.

    Maps of odd size (e.g. 3×3) or 2×2 use one level: a 1×1 level would leave GroupNorm one value
    per group, which normalises the signal away.
    """
    presets: dict[str, tuple[int, tuple[int, ...], int, float]] = {
        "paper": (128, (1, 2), 2, 0.1),
        "small": (64, (1, 2), 1, 0.0),
        "tiny": (16, (1, 2), 1, 0.0),
    }
    if name not in presets:
        raise ValueError(f"unknown score network config {name!r}; choose from {', '.join(presets)}")
    ch, mult, blocks, dropout = presets[name]
    if size % 2 or size < 4:
        mult = mult[:1]
    attn = tuple(size // 2**i for i in range(len(mult)))
    heads = 4 if ch >= 64 else 2
    return UNetConfig(
        size, channels, ch, mult, blocks, attn, heads, dropout, num_classes=1, extra={"gaussian_skip": gaussian_skip}
    )


class ScoreNet(nn.Module):
    """s_θ(z, t) = −ε̂(z, t) / σ(t) for one feature scale, ε̂ = ε_θ(z, 999 t) (+ σ(t)·z with the
    Gaussian skip)."""

    def __init__(self, config: UNetConfig, sde: VPSDE | None = None) -> None:
        super().__init__()
        self.config = config
        self.sde = sde or VPSDE()
        self.net = UNet(config)
        self.gaussian_skip = bool(config.extra.get("gaussian_skip", False))  # bundles before it: off

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(z, t * 999.0, None)
        if self.gaussian_skip:
            _, std = self.sde.marginal(t.to(z.dtype))
            out = out + std.reshape(-1, *([1] * (z.ndim - 1))) * z
        return out

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, std = self.sde.marginal(t.to(z.dtype))
        return -self.eps(z, t) / std.reshape(-1, *([1] * (z.ndim - 1)))


def dsm_loss(
    model: ScoreNet, z0: torch.Tensor, generator: torch.Generator | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Eq. 3 with λ(t) = σ(t)²: mean ‖σ(t) s_θ(z_t, t) + ε‖² = mean ‖ε − ε_θ‖² (t ~ U(ε, 1))."""
    b = z0.shape[0]
    t = torch.rand(b, generator=generator).to(z0.device) * (1 - eps) + eps
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    z_t = model.sde.perturb(z0, t, noise)
    return ((model.eps(z_t, t) - noise) ** 2).mean()
