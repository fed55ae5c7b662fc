"""Feature decoder and reconstruction-based localisation (AnoDODE section 4.3).

The decoder maps stride-32 features [C, s, s] back to a grey image [1, 32s, 32s]. Its layout
follows the latent-diffusion decoder: input conv, a middle of residual + attention blocks, then five
×2 upsampling stages of residual blocks, and a norm/SiLU/conv output. It is trained on healthy images
with an L1 + L2 reconstruction loss.

Localisation of a slice x:
1. features z = E(x), standardised;
2. perturb to diffusion time t0 with the VP marginal and denoise with the predictor-corrector
   sampler (eqs. 14-15), so that anomalous feature content is pulled to the healthy distribution;
3. un-standardise and decode to x';
4. heatmap (x − x')², resized to the slice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nets import group_norm
from .features import Encoder, Standardiser, extract
from .sampler import pc_denoise
from .score import ScoreNet


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


def reconstruction_loss(decoder: Decoder, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 + L2 between the decoded image and the input slice resized to the decoder's output size."""
    rec = decoder(features)
    target = F.interpolate(images, size=rec.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    return (rec - target).abs().mean() + ((rec - target) ** 2).mean()


@torch.no_grad()
def localise(
    encoder: Encoder,
    scale: int,
    score_net: ScoreNet,
    standardiser: Standardiser,
    decoder: Decoder,
    slices: torch.Tensor | np.ndarray,
    t0: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (x − x')² [N, S, S] and reconstructions x' [N, S, S] of grey slices [N, 1, S, S]."""
    x = torch.as_tensor(np.asarray(slices) if isinstance(slices, np.ndarray) else slices).float()
    (feat,) = extract(encoder, x, (scale,))
    z = standardiser(feat).float()
    z_denoised = pc_denoise(lambda zz, t: score_net(zz, t), z, t0=t0, sde=score_net.sde, generator=generator)
    mean = torch.as_tensor(standardiser.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.as_tensor(standardiser.std, dtype=torch.float32).reshape(1, -1, 1, 1)
    rec = decoder(z_denoised * std + mean)
    rec = F.interpolate(rec, size=x.shape[-2:], mode="bilinear", align_corners=False)
    heat = (x - rec) ** 2
    return heat[:, 0].numpy(), rec[:, 0].numpy()
