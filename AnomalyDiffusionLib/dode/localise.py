"""Reconstruction-based localisation (AnoDODE section 4.3) with the feature decoder
(:class:`AnomalyDiffusionLib.nets.Decoder`), and the decoder's training loss (L1 + L2 on healthy
images).

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

from ..nets import Decoder
from .features import Encoder, Standardiser, extract
from .sampler import pc_denoise
from .score import ScoreNet


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
