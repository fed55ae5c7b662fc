"""Shared helpers for the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("MPLBACKEND", "Agg")

REAL_CASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "TCGA-DU-7294"


def image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """A SimpleITK image from a ``[z, y, x]`` array with the given geometry."""
    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return img


def head(shape=(20, 30, 40), seed=0) -> np.ndarray:
    """An asymmetric 'head': ellipsoid of texture on a zero background, so orientation errors show."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=float)
    c = (np.array(shape) - 1) / 2
    r = (
        ((z - c[0]) / (0.45 * shape[0])) ** 2
        + ((y - c[1]) / (0.42 * shape[1])) ** 2
        + ((x - c[2]) / (0.4 * shape[2])) ** 2
    )
    vol = (100 + 50 * rng.random(shape) + 3 * x + 2 * y + z) * (r < 1)
    return vol.astype(np.float32)


@pytest.fixture
def real_case() -> Path:
    if not (REAL_CASE / "TCGA-DU-7294_fla.nii.gz").is_file():
        pytest.skip("real case ../shared/data/TCGA-DU-7294 not available")
    return REAL_CASE


def make_tiny_bundle(out: Path, methods=("fpdm", "dode"), dtype="float32", as_zip=False, seed=0) -> Path:
    """An untrained bundle with tiny networks (32² slices, random-weight encoder at scale 64): for
    format, loading and plumbing tests, never for accuracy."""
    import torch

    from AnomalyDiffusionLib.bundle import write_bundle
    from AnomalyDiffusionLib.diffusion import Schedule
    from AnomalyDiffusionLib.dode.features import EncoderSpec, Standardiser, build_encoder
    from AnomalyDiffusionLib.dode.manifest import section as dode_section
    from AnomalyDiffusionLib.dode.model import DODEModel
    from AnomalyDiffusionLib.dode.score import ScoreNet, score_config
    from AnomalyDiffusionLib.fpdm import Calibration, FPDMSettings
    from AnomalyDiffusionLib.fpdm.manifest import section as fpdm_section
    from AnomalyDiffusionLib.methods import validate_manifest_sections
    from AnomalyDiffusionLib.nets import UNet, unet_config

    torch.manual_seed(seed)
    manifest = {
        "name": "tiny-test",
        "description": "untrained tiny networks for tests",
        "training_data": "none (random weights)",
        "intended_use": "tests only; not for clinical use",
        "methods": list(methods),
        "modalities": ["flair", "t2"],
        "slice_size": 32,
    }
    weights = {}
    if "fpdm" in methods:
        unet = UNet(unet_config("tiny", in_channels=2, image_size=32))
        settings = FPDMSettings(w=2.0, steps=40, stride=10, batch_size=8)
        cal = Calibration(
            w=2.0, cos_threshold=0.5, m_max=[0.1, 0.1], min_component=0, settings=settings.calibration_dict()
        )
        manifest["fpdm"], files = fpdm_section(unet, Schedule(), settings, cal)
        weights.update(files)
    if "dode" in methods:
        spec = EncoderSpec(pretrained=False, scales=(64,))
        enc = build_encoder(spec)
        net = ScoreNet(score_config("tiny", 192, 2))
        dm = DODEModel(enc, spec, [64], [net], [Standardiser(np.zeros(192), np.ones(192))])
        manifest["dode"], files = dode_section(
            dm,
            decision_threshold=5.0,
            likelihood={"method": "rk4", "steps": 2, "rtol": 1e-3, "atol": 1e-3, "probe": "rademacher"},
        )
        weights.update(files)
    return write_bundle(out, manifest, weights, dtype=dtype, as_zip=as_zip, validate=validate_manifest_sections)
