"""AnoDODE's feature decoder (section 4.3): stride-32 features [C, s, s] back to a grey image
[1, 32s, 32s]. Its layout follows the latent-diffusion decoder: input conv, a middle of residual +
attention blocks, then five ×2 upsampling stages of residual blocks, and a norm/SiLU/conv output.
Localisation with it is :mod:`~AnomalyDiffusionLib.dode.localise`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(cin),
            nn.SiLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            group_norm(cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class _Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Decoder(nn.Module):
    """Features [B, C, s, s] → image [B, 1, 32s, 32s] in [-1, 1] (tanh output)."""

    def __init__(self, in_channels: int, base: int = 32, mults: tuple[int, ...] = (8, 4, 2, 2, 1)) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "base": base, "mults": list(mults)}
        ch = base * mults[0]
        self.inp = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(_Res(ch, ch), _Attn(ch), _Res(ch, ch))
        ups = []
        for m in mults:
            out = base * m
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1), _Res(out, out)]
            ch = out
        self.up = nn.Sequential(*ups)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self.up(self.mid(self.inp(z)))))
