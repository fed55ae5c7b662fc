"""Device choice shared by training, calibration, evaluation and (later) the CLI's ``--device``."""

from __future__ import annotations

import torch

from .errors import AnomalyDiffusionError


def resolve_device(name: str = "auto", index: int = 0) -> torch.device:
    """``auto`` → the GPU when present, else the CPU; ``cuda`` without a GPU is a clear error."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise AnomalyDiffusionError(f"unknown device {name!r}; use auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if name == "auto" else name.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise AnomalyDiffusionError(f"--device {name} was requested but no CUDA GPU is available")
    if not use_cuda:
        return torch.device("cpu")
    return torch.device(name if name.startswith("cuda:") else f"cuda:{index}")
