"""The held-out synthetic family of the shift benchmark (``benchmarks/shift.py``).

**Held out.** These cases are never used to train, calibrate or choose any setting of the bundle or
the pipeline: they only measure. Their seeds (910001 …) lie far from every seed the training,
calibration and evaluation scripts use (0 … 40000), and they are drawn by code of their own that
shares only the MNI anatomy with :mod:`AnomalyDiffusionLib.phantom`:

- **another lesion model**: lesions are unions of Gaussian "metaballs" with a fuzzy edge instead of
  noise-perturbed ellipsoids with a core, rim and oedema; they are multi-focal, cortical (centred in
  grey matter, reaching the surface), deep, small (4–10 mm) or large (up to 35 mm), never enhancing,
  with a radial intensity profile (brightest at the centre) and dark on T1;
- **other contrasts and bias**: a tissue table of its own (grey/white-matter FLAIR contrast varies
  from weak to strong, lesions are 1.15–1.8 × grey matter on FLAIR), a polynomial bias field of up to
  ±25 % instead of a smooth random one, Gaussian noise, scanner units from 200 to 3000;
- **other grids**: 1 mm BraTS-like 240 × 240 × 155 grids, and clinical grids of 0.9 × 0.9 × 3–5 mm,
  oblique by up to 15°, with the through-plane partial volume of thick slices.

The family has 12 cases, 2 of them healthy. ``QUICK`` names a 3-case subset (one BraTS-grid lesion
case, one clinical-grid lesion case, one healthy case).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from AnomalyDiffusionLib.phantom import (
    PhantomCase,
    PhantomOptions,
    _warp,
    brats_grid,
    load_anatomy,
    make_grid,
    oblique_direction,
    resample_case,
    smooth_noise,
    write_case,
)

SEED_BASE = 910000  #: family seeds are SEED_BASE + case number; nothing else uses this range


@dataclass(frozen=True)
class FamilyCase:
    """One held-out case: its name, seed, grid and lesion model."""

    name: str
    number: int
    grid: str  #: "brats" (240×240×155, 1 mm) or "clinical"
    lesions: str  #: healthy | multifocal | cortical | large | small | mixed | faint
    slice_mm: float = 1.0  #: slice thickness of a clinical grid

    @property
    def seed(self) -> int:
        return SEED_BASE + self.number

    @property
    def healthy(self) -> bool:
        return self.lesions == "healthy"


FAMILY: tuple[FamilyCase, ...] = (
    FamilyCase("shift-01", 1, "brats", "multifocal"),
    FamilyCase("shift-02", 2, "brats", "cortical"),
    FamilyCase("shift-03", 3, "brats", "large"),
    FamilyCase("shift-04", 4, "brats", "small"),
    FamilyCase("shift-05", 5, "brats", "healthy"),
    FamilyCase("shift-06", 6, "clinical", "multifocal", 3.0),
    FamilyCase("shift-07", 7, "clinical", "large", 4.0),
    FamilyCase("shift-08", 8, "clinical", "cortical", 5.0),
    FamilyCase("shift-09", 9, "clinical", "mixed", 3.0),
    FamilyCase("shift-10", 10, "clinical", "faint", 5.0),
    FamilyCase("shift-11", 11, "clinical", "large", 3.0),
    FamilyCase("shift-12", 12, "clinical", "healthy", 4.0),
)
QUICK = ("shift-01", "shift-07", "shift-12")

# tissue means (FLAIR, T2, T1, T1ce): drawn per case from these ranges
TISSUES = {
    "flair": {"csf": (0.05, 0.15), "gm": (0.50, 0.72), "wm": (0.36, 0.52)},
    "t2": {"csf": (0.80, 1.00), "gm": (0.48, 0.60), "wm": (0.32, 0.44)},
    "t1": {"csf": (0.12, 0.25), "gm": (0.45, 0.55), "wm": (0.65, 0.80)},
    "t1ce": {"csf": (0.12, 0.25), "gm": (0.45, 0.55), "wm": (0.65, 0.80)},
}
#: (foci, radius range mm, where): the lesion models
LESION_MODELS = {
    "multifocal": ((3, 5), (5.0, 14.0), "any"),
    "cortical": ((1, 2), (8.0, 18.0), "cortex"),
    "large": ((1, 1), (22.0, 35.0), "deep"),
    "small": ((2, 4), (4.0, 10.0), "any"),
    "mixed": ((2, 3), (5.0, 25.0), "any"),
    "faint": ((1, 2), (12.0, 24.0), "deep"),
}


def _lesions(tissues: dict[str, np.ndarray], rng: np.random.Generator, model: str, spacing: float) -> np.ndarray:
    """Fuzzy lesion membership in [0, 1] (0 everywhere for a healthy case): metaball foci."""
    shape = tissues["brain"].shape
    member = np.zeros(shape, np.float32)
    if model == "healthy":
        return member
    (n_lo, n_hi), (r_lo, r_hi), where = LESION_MODELS[model]
    brain = tissues["brain"] > 0.5
    depth = ndimage.distance_transform_edt(brain) * spacing
    region = {
        "any": brain & (depth > 5.0),
        "cortex": (tissues["gm"] > 0.5) & (depth > 2.0) & (depth < 8.0),
        "deep": (tissues["wm"] > 0.5) & (depth > 15.0),
    }[where]
    zs = np.flatnonzero(brain.any((1, 2)))
    region[: int(zs.min() + 0.25 * (zs.max() - zs.min()))] = False  # keep to the cerebrum
    candidates = np.argwhere(region)
    grid = np.indices(shape, dtype=np.float32)
    for _ in range(int(rng.integers(n_lo, n_hi + 1))):
        centre = candidates[rng.integers(len(candidates))].astype(np.float32)
        radius = float(np.exp(rng.uniform(np.log(r_lo), np.log(r_hi)))) / spacing
        field = np.zeros(shape, np.float32)
        # a main ball and 2-5 satellites around it: irregular, lobulated outlines
        balls = [(centre, radius)]
        for _ in range(int(rng.integers(2, 6))):
            offset = rng.normal(0.0, 0.6 * radius, 3).astype(np.float32)
            balls.append((centre + offset, radius * float(rng.uniform(0.3, 0.7))))
        for c, r in balls:
            d2 = sum((grid[k] - c[k]) ** 2 for k in range(3))
            field += np.exp(-d2 / (2.0 * (r / 1.6) ** 2))
        field += 0.15 * smooth_noise(rng, shape, max(1.0, radius / 3.0))
        # fuzzy edge over ~1.5 mm: membership rises from 0 to 1 across field 0.45 .. 0.6
        member = np.maximum(member, np.clip((field - 0.45) / 0.15, 0.0, 1.0))
    return member * brain


def _bias(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A quadratic polynomial bias field, multiplicative, within about ±25 %."""
    g = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z, y, x = np.meshgrid(*g, indexing="ij")
    terms = [x, y, z, x * y, y * z, x * z, x * x, y * y, z * z]
    coef = rng.uniform(-1.0, 1.0, len(terms)).astype(np.float32)
    f = sum(c * t for c, t in zip(coef, terms, strict=True))
    f = f / max(float(np.abs(f).max()), 1e-6)
    return (1.0 + float(rng.uniform(0.1, 0.25)) * f).astype(np.float32)


def make_family_case(spec: FamilyCase, spacing: float = 1.0) -> PhantomCase:
    """Draw one held-out case (deterministic in ``spec``). Labels: 2 where the lesion membership is
    ≥ 0.5 (one compartment: no core, no enhancement), 0 elsewhere."""
    rng = np.random.default_rng(spec.seed)
    anat = load_anatomy(spacing)
    warp_opt = PhantomOptions(
        spacing=spacing, max_rotation_deg=10.0, scale_range=(0.82, 1.0), elastic_mm=4.0, tissue_sharpening=1.6
    )
    tissues = _warp(anat, rng, warp_opt)
    member = _lesions(tissues, rng, spec.lesions, spacing)
    bias = _bias(member.shape, rng)
    centre_weight = ndimage.gaussian_filter(member, 2.0 / spacing)  # brightest in the middle of a lesion
    faint = spec.lesions == "faint"
    images = {}
    for m, table in TISSUES.items():
        means = {k: float(rng.uniform(*v)) for k, v in table.items()}
        img = sum(tissues[k] * means[k] for k in ("csf", "gm", "wm"))
        if m == "flair":
            level = means["gm"] * float(rng.uniform(1.15, 1.3) if faint else rng.uniform(1.3, 1.8))
        elif m == "t2":
            level = float(rng.uniform(0.7, 0.95))
        else:  # dark on T1-like images, never enhancing
            level = float(rng.uniform(0.25, 0.38))
        lesion = level * (0.9 + 0.2 * centre_weight)
        img = img * (1.0 - member) + lesion * member
        img = img * bias
        scale = float(np.percentile(img[tissues["brain"] > 0.5], 99))
        img = img + rng.normal(0.0, float(rng.uniform(0.01, 0.03)) * scale, img.shape)
        img = np.clip(img, 0.0, None) * float(rng.uniform(200.0, 3000.0)) / scale
        img[tissues["brain"] < 0.5] = 0.0
        images[m] = img.astype(np.float32)
    labels = np.where(member >= 0.5, 2, 0).astype(np.uint8)

    def to_image(a: np.ndarray) -> sitk.Image:
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((spacing,) * 3)
        im.SetOrigin(tuple(float(o) for o in anat.origin))
        return im

    case = PhantomCase(
        images={m: to_image(a) for m, a in images.items()},
        labels=to_image(labels),
        seed=spec.seed,
        lesions=[asdict(spec)],
    )
    if spec.grid == "brats":
        return resample_case(case, brats_grid(case.labels))
    # clinical: thick-slice partial volume along the acquisition's slice axis, then an oblique grid
    grid_rng = np.random.default_rng([spec.seed, 1])
    angles = grid_rng.uniform(-15.0, 15.0, 3)
    flips = tuple(int(k) for k in np.flatnonzero(grid_rng.random(3) < 0.5))
    direction = oblique_direction(angles, flip=flips)
    grid = make_grid(case.labels, (0.9, 0.9, spec.slice_mm), direction)
    sigma_z = spec.slice_mm / 2.355  # FWHM = slice thickness
    blurred = {}
    for m, im in case.images.items():
        # approximate the slab profile with an isotropic-in-plane, thick-through-plane Gaussian along
        # the template's z axis (the tilt is at most 15°)
        blurred[m] = sitk.SmoothingRecursiveGaussian(im, (0.4, 0.4, sigma_z))
    return resample_case(PhantomCase(blurred, case.labels, case.seed, case.lesions), grid)


def write_family(folder: str | Path, names: tuple[str, ...] | None = None) -> dict[str, dict[str, Path]]:
    """Write the family's cases (all, or ``names``) as BraTS-named NIfTI under ``folder``; cases
    already written are reused. Returns {name: {modality/"seg": path}}."""
    out: dict[str, dict[str, Path]] = {}
    folder = Path(folder)
    for spec in FAMILY:
        if names is not None and spec.name not in names:
            continue
        base = folder / spec.name
        paths = {m: base / f"{spec.name}_{m}.nii.gz" for m in ("flair", "t2", "t1", "t1ce", "seg")}
        if not all(p.is_file() for p in paths.values()):
            write_case(make_family_case(spec), folder, spec.name)
            (base / "family.json").write_text(json.dumps(asdict(spec), indent=1))
        out[spec.name] = paths
    return out
