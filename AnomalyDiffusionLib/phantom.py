"""Synthetic brain-MRI phantom on real anatomy, with glioma-like lesions and ground-truth masks.

Anatomy comes from the MNI ICBM152 2009a symmetric template (T1 and grey/white-matter probability
maps at 1 mm) that nilearn ships inside its wheel; the files are located on disk without importing
nilearn. Each seeded subject gets its own random affine + elastic warp, tissue intensities, bias field,
texture and Rician noise; lesions are a tumour core (necrosis and, sometimes, an enhancing rim) inside
oedema that spreads preferentially along white matter, with irregular shapes from noise-perturbed
ellipsoids. Contrasts are FLAIR-, T2-, T1- and T1ce-like; lesions are bright on FLAIR and T2 but their
contrast is drawn at random, so they are not always the brightest thing in a slice (CSF is brighter
on T2, grey matter can be brighter than weak oedema on FLAIR).

Labels follow BraTS: 1 = necrotic/non-enhancing core, 2 = oedema, 4 = enhancing tumour; 0 elsewhere.

Everything is a pure function of the seed and the options. Volumes are returned as SimpleITK images
in LPS physical space, and can be resampled onto BraTS-like (240×240×155, 1 mm) or anisotropic,
oblique grids to exercise geometry handling.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import AnomalyDiffusionError
from .progress import CancelToken, ProgressCallback, tracked
from .volumes import write_volume

log = logging.getLogger(__name__)

MODALITIES = ("flair", "t2", "t1", "t1ce")
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Mean tissue intensities per modality (arbitrary units, ~WM = 0.5 on FLAIR), before per-subject
# jitter. Ordering follows clinical appearance: FLAIR suppresses CSF and shows GM > WM; T2 has bright
# CSF; T1 has WM > GM > CSF.
TISSUE_MEANS = {
    "flair": {"csf": 0.10, "gm": 0.62, "wm": 0.48},
    "t2": {"csf": 1.00, "gm": 0.52, "wm": 0.36},
    "t1": {"csf": 0.18, "gm": 0.50, "wm": 0.74},
    "t1ce": {"csf": 0.20, "gm": 0.52, "wm": 0.74},
}
# Lesion compartments: (low, high) intensity ranges drawn per lesion.
LESION_RANGES = {
    "flair": {"edema": (0.55, 1.10), "necrosis": (0.35, 0.95), "enhancing": (0.70, 1.05)},
    "t2": {"edema": (0.62, 0.90), "necrosis": (0.75, 1.05), "enhancing": (0.55, 0.75)},
    "t1": {"edema": (0.50, 0.62), "necrosis": (0.22, 0.38), "enhancing": (0.52, 0.62)},
    "t1ce": {"edema": (0.50, 0.62), "necrosis": (0.22, 0.38), "enhancing": (0.95, 1.25)},
}


# ------------------------------------------------------------------------------------ template
def template_dir() -> Path:
    """Folder of the MNI ICBM152 2009a files inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise AnomalyDiffusionError(
            "the phantom needs the MNI templates shipped with the 'nilearn' package; pip install nilearn"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [f for f in TEMPLATE_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise AnomalyDiffusionError(f"nilearn is installed but lacks the MNI template files: {', '.join(missing)}")
    return folder


@dataclass(frozen=True)
class Anatomy:
    """Tissue probability maps in canonical LPS order ``[z, y, x]`` on an isotropic grid.

    ``origin`` is the LPS position (mm) of voxel (0, 0, 0); the direction is the identity.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    spacing: float
    origin: tuple[float, float, float]


@lru_cache(maxsize=4)
def load_anatomy(spacing: float = 1.0) -> Anatomy:
    """MNI ICBM152 tissue maps resampled to ``spacing`` mm (cached; arrays are read-only)."""
    folder = template_dir()
    images = {
        k: sitk.DICOMOrient(sitk.ReadImage(str(folder / f), sitk.sitkFloat32), "LPS") for k, f in TEMPLATE_FILES.items()
    }
    ref = images["t1"]
    if spacing != 1.0:
        size = [round(n * s / spacing) for n, s in zip(ref.GetSize(), ref.GetSpacing(), strict=True)]
        grid = sitk.Image(size, sitk.sitkFloat32)
        grid.SetSpacing((spacing,) * 3)
        grid.SetDirection(ref.GetDirection())
        # keep the physical centre of the field of view
        centre = np.array(ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ref.GetSize()]))
        grid.SetOrigin(
            tuple(centre - np.array(ref.GetDirection()).reshape(3, 3) @ ((np.array(size) - 1) / 2 * spacing))
        )
        sigma = 0.5 * (spacing - 1.0) if spacing > 1 else 0.0
        images = {
            k: sitk.Resample(
                sitk.SmoothingRecursiveGaussian(im, sigma) if sigma > 0 else im,
                grid,
                sitk.Transform(),
                sitk.sitkLinear,
                0.0,
            )
            for k, im in images.items()
        }
        ref = images["t1"]
    arr = {k: sitk.GetArrayFromImage(im) for k, im in images.items()}
    brain = np.clip(arr["t1"] / 12.0, 0.0, 1.0)  # the template is skull-stripped: T1 > 0 is brain
    gm = np.clip(arr["gm"] / 255.0, 0.0, 1.0) * brain
    wm = np.clip(arr["wm"] / 255.0, 0.0, 1.0) * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    out = Anatomy(gm=gm, wm=wm, csf=csf, brain=brain, spacing=float(spacing), origin=tuple(ref.GetOrigin()))
    for a in (out.gm, out.wm, out.csf, out.brain):
        a.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------- fields
def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: float, coarse: int = 4) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma_vox`` voxels.

    Drawn on a grid ``coarse`` times smaller (when the correlation length allows it) and upsampled,
    which is much faster than filtering a full-size white-noise volume.
    """
    f = max(1, min(coarse, int(sigma_vox // 2)))
    small = [max(2, int(np.ceil(n / f))) for n in shape]
    field_ = ndimage.gaussian_filter(rng.standard_normal(small), sigma_vox / f, mode="wrap")
    if f > 1:
        field_ = ndimage.zoom(field_, [n / s for n, s in zip(shape, small, strict=True)], order=1)
        field_ = field_[tuple(slice(0, n) for n in shape)]
    field_ = field_ - field_.mean()
    return (field_ / (field_.std() + 1e-12)).astype(np.float32)


def rotation_matrix(degrees: Sequence[float] | np.ndarray) -> np.ndarray:
    """R = Rz · Ry · Rx for rotations by ``degrees`` = (about x, about y, about z)."""
    ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation matrix from three independent angles uniform in ±``max_deg`` degrees."""
    return rotation_matrix(rng.uniform(-max_deg, max_deg, 3))


# ------------------------------------------------------------------------------------- options
@dataclass
class PhantomOptions:
    """How one synthetic subject is drawn. Lengths in mm, angles in degrees."""

    spacing: float = 1.0  #: isotropic working resolution (2.0 makes fast test subjects)
    modalities: tuple[str, ...] = MODALITIES
    n_lesions: int | None = None  #: None: 1 (75 %) or 2-3 (25 %); 0 makes a healthy subject
    lesion_radius_mm: tuple[float, float] = (12.0, 28.0)  #: oedema semi-axis range
    core_fraction: tuple[float, float] = (0.35, 0.7)  #: core size relative to the oedema
    max_rotation_deg: float = 8.0
    scale_range: tuple[float, float] = (0.84, 0.98)  #: the MNI brain is larger than most subjects'
    tissue_sharpening: float = 2.0  #: power applied to tissue memberships (1 = template as is)
    max_shift_mm: float = 6.0
    elastic_mm: float = 3.0  #: typical elastic displacement
    elastic_scale_mm: float = 14.0  #: correlation length of the displacement field
    bias_strength: float = 0.15  #: std of the log bias field
    noise_level: tuple[float, float] = (0.015, 0.035)  #: Rician sigma relative to the 99th percentile
    intensity_jitter: float = 0.07  #: relative per-subject jitter of tissue means
    brats_grid: bool = False  #: put the subject on a 240×240×155, 1 mm grid (BraTS/SRI24-like)
    #: put the subject on a clinical-like acquisition grid instead: ``clinical_spacing`` voxels, a
    #: random obliquity up to ``clinical_max_tilt_deg`` and random axis flips (geometry stress test)
    clinical_grid: bool = False
    clinical_spacing: tuple[float, float, float] = (0.9, 0.9, 3.0)
    clinical_max_tilt_deg: float = 15.0
    #: domain randomisation for training (each subject draws its own appearance, see
    #: :func:`randomised_appearance`): wider tissue contrasts, bias, noise, gamma, blur, through-plane
    #: resolution, lesion sizes/counts/levels. Off by default, so seeded subjects stay as they were.
    randomise: bool = False


@dataclass
class Appearance:
    """Per-subject imaging appearance. The defaults reproduce the non-randomised phantom exactly."""

    tissue_scale: dict[str, dict[str, float]] = field(default_factory=dict)  #: modality → tissue → factor
    lesion_scale: float = 1.0  #: factor on every lesion level (≤ 1: fainter lesions)
    gamma: float = 1.0  #: intensity power applied to the noise-free image (relative to its p99)
    blur_mm: float = 0.0  #: in-plane Gaussian sigma of the acquisition blur
    slab_mm: float = 0.0  #: through-plane (z) Gaussian sigma: thick-slice acquisitions


def randomised_appearance(rng: np.random.Generator, opt: PhantomOptions) -> tuple[PhantomOptions, Appearance]:
    """Draw one training subject's options and appearance for domain randomisation.

    Ranges are broad on purpose (a model trained on them should not depend on one contrast, bias or
    resolution): per-tissue means ×[0.75, 1.3] per modality, bias field std 0.05–0.35, Rician noise
    0.5–5 % of p99, gamma 0.7–1.4, in-plane blur 0–1.2 mm, through-plane blur 0–2.5 mm, lesion levels
    ×[0.8, 1.15], 1–4 lesions of 5–30 mm. They are for training only; the held-out shift family of
    ``benchmarks/shift_family.py`` is drawn by other code with its own lesion and contrast model.
    """
    from dataclasses import replace

    lo = float(rng.uniform(0.005, 0.03))
    small = float(rng.uniform(4.0, 12.0))
    new = replace(
        opt,
        bias_strength=float(rng.uniform(0.05, 0.35)),
        noise_level=(lo, lo + float(rng.uniform(0.0, 0.02))),
        intensity_jitter=0.03,
        lesion_radius_mm=(small, float(rng.uniform(max(small + 4.0, 15.0), 30.0))),
        n_lesions=opt.n_lesions if opt.n_lesions is not None else int(rng.choice([1, 1, 2, 3, 4])),
        elastic_mm=float(rng.uniform(2.0, 5.0)),
        max_rotation_deg=12.0,
    )
    app = Appearance(
        tissue_scale={
            m: {k: float(np.exp(rng.uniform(np.log(0.75), np.log(1.3)))) for k in TISSUE_MEANS[m]} for m in MODALITIES
        },
        lesion_scale=float(rng.uniform(0.8, 1.15)),
        gamma=float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))),
        blur_mm=float(rng.uniform(0.0, 1.2)),
        slab_mm=float(rng.uniform(0.0, 2.5)) if rng.random() < 0.5 else 0.0,
    )
    return new, app


@dataclass
class PhantomCase:
    """One synthetic subject: images per modality and the BraTS-style label volume, same grid."""

    images: dict[str, sitk.Image]
    labels: sitk.Image
    seed: int
    lesions: list[dict] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        """Binary whole-lesion mask (labels > 0) in the label image's array order."""
        return sitk.GetArrayFromImage(self.labels) > 0


# ------------------------------------------------------------------------------------ synthesis
def _warp(anat: Anatomy, rng: np.random.Generator, opt: PhantomOptions) -> dict[str, np.ndarray]:
    """Apply a random affine + elastic deformation to the tissue maps (linear interpolation)."""
    shape = anat.brain.shape
    sp = anat.spacing
    centre = (np.array(shape) - 1) / 2.0
    # pull-back map: output voxel p samples the template at  A (p - c) + c - t + d(p)
    rot = random_rotation(rng, opt.max_rotation_deg)
    scale = np.diag(1.0 / rng.uniform(*opt.scale_range, 3))
    a = rot @ scale
    shift = rng.uniform(-opt.max_shift_mm, opt.max_shift_mm, 3) / sp
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
    coords = (a.astype(np.float32) @ grid) + (centre - shift)[:, None].astype(np.float32)
    coords = coords.reshape(3, *shape)
    if opt.elastic_mm > 0:
        for k in range(3):
            coords[k] += smooth_noise(rng, shape, opt.elastic_scale_mm / sp) * (opt.elastic_mm / sp)
    out = {}
    for name in ("gm", "wm", "brain"):
        out[name] = ndimage.map_coordinates(getattr(anat, name), coords, order=1, mode="constant", cval=0.0)
    gm = np.minimum(out["gm"], out["brain"])
    wm = np.clip(np.minimum(out["wm"], out["brain"] - gm), 0.0, 1.0)
    csf = np.clip(out["brain"] - gm - wm, 0.0, 1.0)
    # The template's maps are population averages, blurrier than one subject's anatomy; sharpen the
    # memberships (power + renormalise within the brain) to restore single-subject GM/WM contrast.
    g = opt.tissue_sharpening
    stack = np.stack([csf, gm, wm]) ** g
    stack *= out["brain"] / np.maximum(stack.sum(0), 1e-6)
    return {"csf": stack[0], "gm": stack[1], "wm": stack[2], "brain": out["brain"]}


def _draw_lesions(
    tissues: dict[str, np.ndarray], rng: np.random.Generator, opt: PhantomOptions
) -> tuple[np.ndarray, list[dict]]:
    """BraTS-style label volume (uint8) of 0..n lesions placed in white matter, and their parameters."""
    shape = tissues["brain"].shape
    sp = opt.spacing
    n = opt.n_lesions
    if n is None:
        n = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
    labels = np.zeros(shape, dtype=np.uint8)
    if n == 0:
        return labels, []
    brain = tissues["brain"] > 0.5
    depth = ndimage.distance_transform_edt(brain) * sp  # mm to the brain surface
    # adult gliomas are mostly supratentorial: centres in the upper 70 % of the brain's extent
    zs = np.flatnonzero(brain.any((1, 2)))
    supratentorial = np.zeros(shape, bool)
    supratentorial[int(zs.min() + 0.3 * (zs.max() - zs.min())) :] = True
    deep_wm = (tissues["wm"] > 0.6) & (depth > 12.0) & supratentorial
    candidates = np.argwhere(deep_wm)
    if len(candidates) == 0:
        candidates = np.argwhere((depth > 8.0) & supratentorial)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    params = []
    for i in range(n):
        centre = candidates[rng.integers(len(candidates))].astype(np.float32)
        radius = rng.uniform(*opt.lesion_radius_mm) / (1.0 + 0.35 * i)  # later lesions smaller
        axes = radius * rng.uniform(0.7, 1.3, 3) / sp
        rot = random_rotation(rng, 90.0).astype(np.float32)
        d = np.stack([zz - centre[0], yy - centre[1], xx - centre[2]]).reshape(3, -1)
        u = (rot @ d).reshape(3, *shape) / axes[:, None, None, None].astype(np.float32)
        r = np.sqrt((u**2).sum(0))
        roughness = rng.uniform(0.2, 0.4)
        lobes = smooth_noise(rng, shape, rng.uniform(4.0, 8.0) / sp)
        # oedema follows white matter: lower the level set where WM is likely (finger-like spread)
        r_edema = r + roughness * lobes - 0.35 * (tissues["wm"] - 0.5)
        edema = (r_edema < 1.0) & brain
        if not edema.any():
            continue
        cf = rng.uniform(*opt.core_fraction)
        r_core = r + 0.5 * roughness * cf * smooth_noise(rng, shape, rng.uniform(3.0, 6.0) / sp)
        core = (r_core < cf) & edema
        enhancing_rim = rng.random() < 0.6 and core.sum() > 30
        if enhancing_rim:
            rim_mm = rng.uniform(2.0, 4.0)
            inner = ndimage.distance_transform_edt(core) * sp > rim_mm
            labels[core & ~inner] = 4
            labels[inner] = 1
        else:
            labels[core] = np.where(labels[core] == 0, 1, labels[core])
        labels[edema & (labels == 0)] = 2
        params.append(
            {
                "centre_voxel": [float(c) for c in centre],
                "radius_mm": float(radius),
                "core_fraction": float(cf),
                "enhancing_rim": bool(enhancing_rim),
                "voxels": int(edema.sum()),
            }
        )
    return labels, params


def _contrast(
    modality: str,
    tissues: dict[str, np.ndarray],
    labels: np.ndarray,
    lesion_levels: dict[str, float],
    rng: np.random.Generator,
    opt: PhantomOptions,
    bias: np.ndarray,
    texture: np.ndarray,
    lesion_texture: np.ndarray,
    heterogeneity: float,
    appearance: Appearance | None = None,
) -> np.ndarray:
    """One modality: tissue mixture + partial-volume lesion compartments, bias, texture, Rician noise."""
    app = appearance or Appearance()
    means = {k: v * (1 + rng.normal(0, opt.intensity_jitter)) for k, v in TISSUE_MEANS[modality].items()}
    if app.tissue_scale:
        means = {k: v * app.tissue_scale[modality][k] for k, v in means.items()}
    img = tissues["csf"] * means["csf"] + tissues["gm"] * means["gm"] + tissues["wm"] * means["wm"]
    sp = opt.spacing
    for comp, lab in (("edema", 2), ("necrosis", 1), ("enhancing", 4)):
        m = labels == lab
        if not m.any():
            continue
        # soft membership (≈ 0.7 mm partial volume) so edges look acquired, not painted
        soft = np.clip(ndimage.gaussian_filter(m.astype(np.float32), 0.7 / sp), 0.0, 1.0)
        level = lesion_levels[f"{modality}:{comp}"] * app.lesion_scale
        # lesion signal keeps a little of the underlying anatomy and is heterogeneous inside
        lesion = level * (0.85 + 0.15 * img / max(means["wm"], 1e-3)) * (1.0 + heterogeneity * lesion_texture)
        img = img * (1 - soft) + lesion * soft
    img = img * (1.0 + 0.04 * texture) * bias
    if app.gamma != 1.0:
        ref = float(np.percentile(img[tissues["brain"] > 0.5], 99))
        img = ref * np.clip(img / ref, 0.0, None) ** app.gamma
    if app.blur_mm > 0 or app.slab_mm > 0:
        img = ndimage.gaussian_filter(img, (app.slab_mm / sp, app.blur_mm / sp, app.blur_mm / sp))
    scale = float(np.percentile(img[tissues["brain"] > 0.5], 99))
    sigma = rng.uniform(*opt.noise_level) * scale
    noisy = np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)
    out = noisy * rng.uniform(350.0, 650.0) / scale  # int16-like scanner units
    out[tissues["brain"] < 0.5] = 0.0  # skull-stripped: exact zero background, as in BraTS
    return out.astype(np.float32)


def make_subject(seed: int, options: PhantomOptions | None = None) -> PhantomCase:
    """Draw one synthetic subject (deterministic in ``seed`` and ``options``)."""
    opt = options or PhantomOptions()
    unknown = [m for m in opt.modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown phantom modality {unknown}; choose from {MODALITIES}")
    appearance = None
    if opt.randomise:
        opt, appearance = randomised_appearance(np.random.default_rng([seed, 7]), opt)
    rng = np.random.default_rng(seed)
    anat = load_anatomy(opt.spacing)
    tissues = _warp(anat, rng, opt)
    labels, lesion_params = _draw_lesions(tissues, rng, opt)
    bias = np.exp(opt.bias_strength * smooth_noise(rng, labels.shape, 40.0 / opt.spacing))
    texture = smooth_noise(rng, labels.shape, 1.0)
    lesion_texture = smooth_noise(rng, labels.shape, 2.5 / opt.spacing)
    heterogeneity = float(rng.uniform(0.05, 0.15))
    levels = {f"{m}:{c}": float(rng.uniform(*LESION_RANGES[m][c])) for m in MODALITIES for c in LESION_RANGES[m]}
    images = {}
    for m in opt.modalities:
        arr = _contrast(
            m,
            tissues,
            labels,
            levels,
            np.random.default_rng([seed, MODALITIES.index(m)]),
            opt,
            bias,
            texture,
            lesion_texture,
            heterogeneity,
            appearance,
        )
        images[m] = _to_image(arr, opt.spacing, anat.origin)
    label_img = _to_image(labels, opt.spacing, anat.origin)
    case = PhantomCase(images=images, labels=label_img, seed=seed, lesions=lesion_params)
    if opt.brats_grid and opt.clinical_grid:
        raise ValueError("choose brats_grid or clinical_grid, not both")
    if opt.brats_grid:
        case = resample_case(case, brats_grid(case.labels))
    elif opt.clinical_grid:
        grid_rng = np.random.default_rng([seed, 99])
        angles = grid_rng.uniform(-opt.clinical_max_tilt_deg, opt.clinical_max_tilt_deg, 3)
        flips = tuple(int(k) for k in np.flatnonzero(grid_rng.random(3) < 0.5))
        grid = make_grid(case.labels, opt.clinical_spacing, oblique_direction(angles, flip=flips))
        case = resample_case(case, grid)
    return case


def _to_image(array: np.ndarray, spacing: float, origin: Sequence[float]) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin(tuple(float(o) for o in origin))
    return img


# ------------------------------------------------------------------------------------- geometry
def make_grid(
    like: sitk.Image,
    spacing: Sequence[float],
    direction: np.ndarray | None = None,
    size: Sequence[int] | None = None,
) -> sitk.Image:
    """An empty grid with the given spacing/direction whose field of view covers ``like``'s and is
    centred on it (``size`` forces the number of voxels, e.g. a BraTS 240×240×155 grid)."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    sp = np.asarray(spacing, dtype=float)
    corners = np.array(
        [
            like.TransformIndexToPhysicalPoint([i * (n - 1) for i, n in zip(c, like.GetSize(), strict=True)])
            for c in np.ndindex(2, 2, 2)
        ]
    )
    centre = corners.mean(0)
    if size is None:
        local = (corners - centre) @ d  # coordinates along the new axes
        extent = local.max(0) - local.min(0)
        size = [int(np.ceil(e / s)) + 1 for e, s in zip(extent, sp, strict=True)]
    n = np.asarray(size)
    grid = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    grid.SetSpacing(tuple(sp))
    grid.SetDirection(tuple(d.ravel()))
    grid.SetOrigin(tuple(centre - d @ ((n - 1) / 2.0 * sp)))
    return grid


def brats_grid(like: sitk.Image) -> sitk.Image:
    """A 240×240×155 grid at 1 mm, identity direction, centred on ``like`` (BraTS/SRI24-like)."""
    return make_grid(like, (1.0, 1.0, 1.0), np.eye(3), (240, 240, 155))


def oblique_direction(
    degrees: Sequence[float] | np.ndarray = (12.0, -7.0, 20.0), flip: Sequence[int] = (0,)
) -> np.ndarray:
    """A direction matrix rotated by the given angles (about x, y, z) with some axes flipped."""
    d = rotation_matrix(degrees)
    for k in flip:
        d[:, k] *= -1
    return d


def resample_case(case: PhantomCase, grid: sitk.Image) -> PhantomCase:
    """Resample all images (linear) and labels (nearest neighbour) onto ``grid``."""
    images = {
        m: sitk.Resample(im, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        for m, im in case.images.items()
    }
    labels = sitk.Resample(case.labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return PhantomCase(images=images, labels=labels, seed=case.seed, lesions=case.lesions)


# --------------------------------------------------------------------------------------- writers
def write_case(
    case: PhantomCase, folder: str | os.PathLike, name: str, extension: str = ".nii.gz", dtype: str = "int16"
) -> dict[str, Path]:
    """Write ``folder/name/name_{modality,seg}.ext`` (BraTS naming); returns the paths by key."""
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    pixel = {"int16": sitk.sitkInt16, "float32": sitk.sitkFloat32}[dtype]
    paths = {}
    for m, im in case.images.items():
        arr = sitk.GetArrayViewFromImage(im)
        img = sitk.Cast(sitk.Round(im), pixel) if dtype == "int16" and arr.max() < 32767 else sitk.Cast(im, pixel)
        paths[m] = write_volume(img, out / f"{name}_{m}{extension}")
    paths["seg"] = write_volume(sitk.Cast(case.labels, sitk.sitkUInt8), out / f"{name}_seg{extension}")
    meta = {
        "seed": case.seed,
        "lesions": case.lesions,
        "labels": {"1": "necrosis", "2": "edema", "4": "enhancing"},
    }
    (out / f"{name}_phantom.json").write_text(json.dumps(meta, indent=1))
    return paths


def write_brats_folder(
    folder: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    options: PhantomOptions | None = None,
    prefix: str = "Case",
    healthy_fraction: float = 0.0,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> list[Path]:
    """Write ``n_cases`` subjects as ``folder/{prefix}_i/{prefix}_i_{flair,t2,t1,t1ce,seg}.nii.gz``.

    Subject ``i`` uses seed ``seed + i``; a ``healthy_fraction`` of them (the last ones) have no lesion.
    """
    opt = options or PhantomOptions()
    n_healthy = round(healthy_fraction * n_cases)
    out = []
    for i in tracked(range(n_cases), n_cases, "phantom", progress, cancel, "writing synthetic subjects"):
        o = PhantomOptions(**{**asdict(opt), "n_lesions": 0 if i >= n_cases - n_healthy else opt.n_lesions})
        case = make_subject(seed + i, o)
        name = f"{prefix}_{i}"
        write_case(case, folder, name)
        out.append(Path(folder) / name)
    return out
