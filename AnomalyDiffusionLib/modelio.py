"""Networks from stored weights: single safetensors files (never pickle), run folders and bundles.

The file's header metadata holds ``{"kind": ..., "config": {...}, ...}`` as JSON, so a weights file
is self-describing: :func:`load_unet` rebuilds the architecture from it and loads strictly
(:func:`load_weights`), with a message naming the mismatch when weights and configuration disagree.
Methods build their models from bundles and run folders in their own packages
(:mod:`~AnomalyDiffusionLib.fpdm.model`, :mod:`~AnomalyDiffusionLib.dode.model`); this module knows
no method and no bundle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import AnomalyDiffusionError
from .nets import UNet, UNetConfig


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Strict load with a message that says which tensors do not fit (another config, another model)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensor(s) of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise AnomalyDiffusionError(f"{what} do not fit this model configuration: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def save_weights(model: nn.Module, path: str | os.PathLike, meta: dict) -> Path:
    """Write ``model``'s state dict and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"anomaly_diffusion": json.dumps(meta)})
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata stored in a weights file."""
    p = Path(path)
    if not p.is_file():
        raise AnomalyDiffusionError(f"weights file not found: '{p}'")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AnomalyDiffusionError(f"'{p}' is not a readable safetensors file ({exc})") from None
    if "anomaly_diffusion" not in meta:
        raise AnomalyDiffusionError(f"'{p}' has no AnomalyDiffusion metadata (not written by this library)")
    return json.loads(meta["anomaly_diffusion"])


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_unet(model: UNet, path: str | os.PathLike, **meta) -> Path:
    return save_weights(model, path, {"kind": "unet", "config": model.config.as_dict(), **meta})


def load_unet(
    path: str | os.PathLike, expect: UNetConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[UNet, dict]:
    """Rebuild a UNet from a weights file; with ``expect``, refuse a file trained with another config."""
    meta = read_meta(path)
    if meta.get("kind") != "unet":
        raise AnomalyDiffusionError(f"'{path}' holds a {meta.get('kind')!r} network, not a diffusion UNet")
    cfg = UNetConfig.from_dict(meta["config"])
    if expect is not None and cfg != expect:
        diff = {k: (v, getattr(expect, k)) for k, v in cfg.__dict__.items() if getattr(expect, k) != v}
        raise AnomalyDiffusionError(f"'{path}' was trained with another UNet configuration: {diff} (file, expected)")
    model = UNet(cfg)
    load_weights(model, load_state(path), what=f"weights in '{path}'")
    return model.to(device).eval(), meta
