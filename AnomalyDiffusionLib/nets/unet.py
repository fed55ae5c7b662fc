"""The ADM-style class-conditional ε-prediction UNet (Dhariwal & Nichol 2021): AnoFPDM's network
and, time-conditioned only, the core of AnoDODE's score networks (:mod:`~AnomalyDiffusionLib.dode.score`).

Class conditioning for classifier-free guidance (labels of :mod:`~AnomalyDiffusionLib.diffusion`):
the label embedding is added to the timestep embedding; the null label has a zero embedding, as in
the reference code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import NULL
from .layers import group_norm, zero_init


# ------------------------------------------------------------------------------------ UNet config
@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the ε-prediction UNet. ``attention_resolutions`` are feature-map sizes."""

    image_size: int = 128
    in_channels: int = 2
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 2
    dropout: float = 0.1
    num_classes: int = 2
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @staticmethod
    def from_dict(d: dict) -> UNetConfig:
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attention_resolutions"] = tuple(d["attention_resolutions"])
        return UNetConfig(**d)


def unet_config(name: str, in_channels: int = 2, image_size: int | None = None) -> UNetConfig:
    """Named configurations.

    * ``paper``: AnoFPDM appendix table 2 — 128 channels, multipliers 1,1,2,3,4, two residual blocks
      per level, attention at 32/16/8, 2 heads, dropout 0.1, 128×128 input (~100 M parameters).
    * ``small``: the CPU default bundle's model (1.6 M parameters; ~20 ms per 64×64 slice-call on
      2 CPU cores), 64×64 input by default.
    * ``tiny``: for tests (0.2 M parameters), 32×32 input by default.
    """
    presets = {
        "paper": UNetConfig(128, in_channels, 128, (1, 1, 2, 3, 4), 2, (32, 16, 8), 2, 0.1),
        "small": UNetConfig(64, in_channels, 32, (1, 2, 2, 2), 1, (8,), 2, 0.1),
        "tiny": UNetConfig(32, in_channels, 16, (1, 2), 1, (16,), 2, 0.0),
    }
    if name not in presets:
        raise ValueError(f"unknown UNet config {name!r}; choose from {', '.join(presets)}")
    cfg = presets[name]
    if image_size is not None:
        cfg = UNetConfig(**{**cfg.__dict__, "image_size": int(image_size)})
    return cfg


# ---------------------------------------------------------------------------------------- layers
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) step indices, ``[N] → [N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning on the (time + label) embedding."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = group_norm(out_ch)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over spatial positions."""

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        out = out.permute(0, 1, 3, 2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class _Level(nn.Module):
    def __init__(self, res: ResBlock, attn: Attention | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """ε-prediction UNet: ``forward(x [N, C, S, S], t [N], y [N] in {0, 1, 2}) → ε [N, C, S, S]``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.model_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        self.inp = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        res = cfg.image_size
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = ch * mult
                attn = Attention(out, cfg.num_heads) if res in cfg.attention_resolutions else None
                self.down.append(_Level(ResBlock(cur, emb_dim, out, cfg.dropout), attn))
                cur = out
                skips.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
                res //= 2
        self.mid1 = ResBlock(cur, emb_dim, cur, cfg.dropout)
        self.mid_attn = Attention(cur, cfg.num_heads)
        self.mid2 = ResBlock(cur, emb_dim, cur, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out = ch * mult
                attn = Attention(out, cfg.num_heads) if res in cfg.attention_resolutions else None
                self.up.append(_Level(ResBlock(cur + skips.pop(), emb_dim, out, cfg.dropout), attn))
                cur = out
                if level > 0 and i == cfg.num_res_blocks:
                    self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    self.up.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), zero_init(nn.Conv2d(cur, cfg.in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"UNet expects [N, {cfg.in_channels}, S, S] input, got {tuple(x.shape)}")
        if x.shape[-1] % 2 ** (len(cfg.channel_mult) - 1):
            raise ValueError(f"input size {x.shape[-1]} is not divisible by {2 ** (len(cfg.channel_mult) - 1)}")
        emb = self.time_mlp(timestep_embedding(t, cfg.model_channels))
        if y is not None:
            keep = (y != NULL).to(emb.dtype)[:, None]
            emb = emb + self.label_emb(y.clamp(max=cfg.num_classes - 1)) * keep  # null: zero embedding
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, _Level) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, _Level):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
