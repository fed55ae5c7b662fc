"""Layers the networks of both methods share (the UNet of AnoFPDM and AnoDODE's score networks,
AnoDODE's feature decoder)."""

from __future__ import annotations

import math
from typing import TypeVar

from torch import nn

_Conv = TypeVar("_Conv", nn.Conv1d, nn.Conv2d)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the channels allow (ADM/LDM convention), else the largest
    common divisor, so that any width works."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_init(layer: _Conv) -> _Conv:
    """``layer`` with weight and bias zeroed: a residual branch or output head that starts at zero."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
