"""3D volume I/O, canonical orientation, alignment, normalisation, slicing and reassembly.

Conventions used everywhere in the library:

* Volumes are read and written with SimpleITK; physical space is ITK's LPS.
* The *canonical* frame is LPS: image axis x runs to the patient's Left, y to Posterior, z to
  Superior. In numpy (``sitk.GetArrayFromImage``) that is ``array[z, y, x]``, so ``array[k]`` is the
  axial slice ``k`` counted from the inferior end (as BraTS numbers its slices), shown with row 0 =
  anterior and column 0 = patient right (radiological display).
* Reorientation to the canonical frame is a pure permutation and flip of voxel axes (no resampling),
  so it is exactly invertible: per-slice outputs are put back on the *original* grid with the
  original spacing, origin and direction copied bit for bit.
* Model slices are square (e.g. 128×128). A canonical slice is padded to a physically square field
  of view (respecting anisotropic in-plane spacing) and then resized; :class:`PlaneFit` undoes both.
  A bundle may instead frame the brain at a fixed physical size (``slice_fov_mm``): a square box
  centred on the brain's in-plane extent, cropping or padding the scanner's field of view.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .errors import GeometryError, InputError
from .intensity import LANDMARK_PERCENTILES, IntensityReference, percentile_scale, standardise

log = logging.getLogger(__name__)

#: File extensions SimpleITK reads and writes for us (NIfTI, NRRD, MetaImage).
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Refuse volumes larger than this many voxels (a 1024³ volume is ~4 GB as float32).
MAX_VOXELS = 512 * 512 * 1024
#: Canonical orientation code (ITK/DICOM convention: axes point to Left, Posterior, Superior).
CANONICAL = "LPS"


# --------------------------------------------------------------------------------------------- I/O
def volume_suffix(path: str | os.PathLike) -> str:
    """The volume extension of ``path`` (``.nii.gz`` counts as one), or ``""`` if not a known one."""
    name = str(path).lower()
    for ext in VOLUME_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return ""


def read_volume(path: str | os.PathLike, name: str = "volume", max_voxels: int = MAX_VOXELS) -> sitk.Image:
    """Read a scalar 3D volume as float32 and check that it is usable.

    ``name`` (e.g. "FLAIR") is used in error messages. Raises :class:`InputError` naming the problem
    for: a missing or unreadable file, a 2D or 4D (with more than one frame) image, a multi-component
    (vector/RGB) image, NaN/Inf voxels, an empty or constant volume, or one above ``max_voxels``.
    A 4D image with a single frame is accepted as 3D.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{name} file not found: '{p}'")
    if not p.is_file():
        raise InputError(f"{name} path is not a file: '{p}'")
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "Description" in line or "Exception" in line), "")
        raise InputError(
            f"cannot read {name} file '{p}': not a readable NIfTI/NRRD/MHA image"
            + (f" ({detail.strip()})" if detail else "")
        ) from None
    return check_volume(image, name=f"{name} file '{p}'", max_voxels=max_voxels)


def check_volume(image: sitk.Image, name: str = "volume", max_voxels: int = MAX_VOXELS) -> sitk.Image:
    """Validate an in-memory image the same way :func:`read_volume` does; returns it as float32 3D."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(vector/RGB image); a scalar grey-level volume is required"
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(f"{name} is {dim}-D with size {image.GetSize()}; a single 3-D volume is required")
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(f"{name} has size {size}; every axis needs at least 2 voxels for a 3-D volume")
    if int(np.prod(size)) > max_voxels:
        raise InputError(f"{name} has {int(np.prod(size)):,} voxels, more than the {max_voxels:,} allowed")
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise InputError(f"{name} contains {bad} NaN/Inf voxels")
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise InputError(f"{name} is constant (every voxel is {lo:g}); it holds no image")
    return image


def write_volume(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` atomically (temporary name in the same folder, then rename).

    The format follows the extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); nothing is left at
    ``path`` if writing fails.
    """
    p = Path(path)
    ext = volume_suffix(p)
    if not ext:
        raise InputError(f"unsupported output extension for '{p}'; use one of {', '.join(VOLUME_EXTENSIONS)}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name[: -len(ext)]}.", suffix=ext, dir=p.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
    try:
        sitk.WriteImage(image, tmp, compress)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# ------------------------------------------------------------------------------------ orientation
def direction_matrix(image: sitk.Image) -> np.ndarray:
    """The 3×3 direction matrix; column ``i`` is the physical (LPS) direction of image axis ``i``."""
    return np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)


@dataclass(frozen=True)
class Reorientation:
    """Exact voxel-axis permutation + flips between an image's array and the canonical LPS array.

    ``axes``: numpy ``transpose`` order taking the original ``[z, y, x]`` array to canonical order;
    ``flips``: canonical numpy axes that are reversed after the transpose.
    """

    axes: tuple[int, int, int]
    flips: tuple[int, ...]

    @staticmethod
    def from_direction(direction: np.ndarray) -> Reorientation:
        """Assign each image axis to the physical axis it is closest to (optimal assignment, so even
        45° oblique directions give a permutation) and flip the axes that point the wrong way."""
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        rows, cols = linear_sum_assignment(-np.abs(d))  # rows: physical axis, cols: image axis
        image_axis_of = {int(r): int(c) for r, c in zip(rows, cols, strict=True)}
        # numpy axis a <-> ITK axis 2 - a, for both the original and the canonical array
        axes = tuple(2 - image_axis_of[2 - a] for a in range(3))
        flips = tuple(a for a in range(3) if d[2 - a, image_axis_of[2 - a]] < 0)
        return Reorientation(axes=axes, flips=flips)  # type: ignore[arg-type]

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not self.flips

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Original ``[z, y, x]`` array (optionally with leading batch axes) → canonical array.

        Always returns a new array that owns its memory, never a view of ``array`` (which may be a
        view into a SimpleITK image that is about to be freed).
        """
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.axes))
        if self.flips:
            out = np.flip(out, axis=tuple(lead + a for a in self.flips))
        return np.array(out, order="C", copy=True)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Canonical array → array in the original image's voxel order (inverse of ``to_canonical``)."""
        lead = array.ndim - 3
        out = np.flip(array, axis=tuple(lead + a for a in self.flips)) if self.flips else array
        inverse = tuple(int(i) for i in np.argsort(self.axes))
        out = np.transpose(out, tuple(range(lead)) + tuple(lead + a for a in inverse))
        return np.array(out, order="C", copy=True)

    def canonical_spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        """Voxel spacing (x, y, z in mm) of the canonical image, from the original (x, y, z) spacing."""
        sx = [float(s) for s in spacing]
        return tuple(sx[2 - self.axes[2 - j]] for j in range(3))  # type: ignore[return-value]


def to_canonical(image: sitk.Image) -> tuple[sitk.Image, Reorientation]:
    """Return ``image`` with its voxels permuted/flipped into the canonical LPS frame, and the map.

    The canonical image describes the same physical voxels: its origin is the physical position of
    the voxel that lands at canonical index (0, 0, 0), its direction the permuted, sign-corrected
    columns of the original (identity for non-oblique scans).
    """
    reo = Reorientation.from_direction(direction_matrix(image))
    array = sitk.GetArrayViewFromImage(image)
    canonical = sitk.GetImageFromArray(reo.to_canonical(array))
    d = direction_matrix(image)
    size = image.GetSize()
    new_dir = np.zeros((3, 3))
    corner = [0, 0, 0]
    for j in range(3):  # canonical ITK axis j comes from original ITK axis i
        i = 2 - reo.axes[2 - j]
        flipped = (2 - j) in reo.flips
        new_dir[:, j] = d[:, i] * (-1.0 if flipped else 1.0)
        corner[i] = size[i] - 1 if flipped else 0
    canonical.SetSpacing(reo.canonical_spacing(image.GetSpacing()))
    canonical.SetDirection(tuple(new_dir.ravel()))
    canonical.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    return canonical, reo


# --------------------------------------------------------------------------------------- alignment
def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True if two images share size and (within ``tol`` mm / cosine) spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def field_of_view_overlap(moving: sitk.Image, reference: sitk.Image, within: np.ndarray | None = None) -> float:
    """Fraction of the reference's voxels (or of those where ``within`` is true) that fall inside the
    moving image's field of view, found by resampling a constant image with nearest neighbour."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8)
    ones.CopyInformation(moving)
    ones = ones + 1
    covered = sitk.GetArrayFromImage(
        sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ).astype(bool)
    if within is not None and within.any():
        return float(covered[within].mean())
    return float(covered.mean())


def align_to_reference(
    moving: sitk.Image,
    reference: sitk.Image,
    name: str = "T2",
    reference_name: str = "FLAIR",
    min_overlap: float = 0.5,
) -> sitk.Image:
    """Resample ``moving`` onto the reference grid (linear) if their geometries differ.

    The images are assumed registered in physical space (as scanner or BraTS data are); only the
    voxel grids differ. Raises :class:`GeometryError` when less than ``min_overlap`` of the
    reference's non-background voxels lie inside ``moving``'s field of view (0 = no overlap at all).
    """
    if same_geometry(moving, reference):
        out = sitk.Image(moving)
        out.CopyInformation(reference)  # differences below tolerance are rounding, not geometry
        return out
    ref_array = sitk.GetArrayViewFromImage(reference)
    overlap = field_of_view_overlap(moving, reference, within=ref_array > ref_array.min())
    if overlap <= 0.0:
        raise GeometryError(
            f"{name} and {reference_name} do not overlap in physical space "
            f"({name} origin {_fmt(moving.GetOrigin())} mm, {reference_name} origin "
            f"{_fmt(reference.GetOrigin())} mm); are they from the same scan session?"
        )
    if overlap < min_overlap:
        raise GeometryError(
            f"{name} covers only {100 * overlap:.0f}% of the {reference_name} field of view "
            f"(at least {100 * min_overlap:.0f}% needed); check that both belong to the same patient/session"
        )
    log.info("resampling %s onto the %s grid (field-of-view overlap %.1f%%)", name, reference_name, 100 * overlap)
    background = float(sitk.GetArrayViewFromImage(moving).min())
    return sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"


# ------------------------------------------------------------------------- masks and normalisation
def brain_mask(array: np.ndarray, zero_background_fraction: float = 0.05) -> np.ndarray:
    """Foreground (brain) mask of a volume.

    Skull-stripped data (BraTS, ATLAS, our phantom) have an exact background value: if at least
    ``zero_background_fraction`` of voxels equal the minimum, the mask is every voxel above it (the
    reference code's "non-zero voxels"). Otherwise an Otsu threshold is cleaned up: largest
    connected component, holes filled.
    """
    from skimage.filters import threshold_otsu

    lo = float(array.min())
    at_min = float(np.mean(array == lo))
    if at_min >= zero_background_fraction:
        mask = array > lo
    else:
        mask = array > threshold_otsu(array)
        mask = ndimage.binary_opening(mask, iterations=1)
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
            mask = labels == (int(np.argmax(sizes)) + 1)
        mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        raise InputError("the volume has no foreground (brain) voxels")
    return mask


def normalise(
    array: np.ndarray,
    mask: np.ndarray,
    percentile: float = 99.0,
    zero_background: bool = True,
    reference: Sequence[float] | None = None,
    landmark_percentiles: Sequence[float] = LANDMARK_PERCENTILES,
) -> np.ndarray:
    """Per-subject intensity normalisation of AnoFPDM appendix B, mapped to [-1, 1].

    ``v = clip((x − m) / (q − m), 0, 1)`` with ``q`` the ``percentile`` of the foreground voxels and
    ``m = min(0, min foreground)``; the output is ``2v − 1``. For ordinary non-negative MR data
    ``m = 0``, i.e. the paper's "divide by the 99th percentile of foreground voxels", and values above
    that percentile saturate at +1. With ``reference`` (the training data's landmarks at
    ``landmark_percentiles``, :mod:`~AnomalyDiffusionLib.intensity`) the scaled intensities are first
    mapped piecewise linearly so that the case's landmarks land on the reference's. With
    ``zero_background`` voxels outside ``mask`` are set to −1 (the value of background in BraTS after
    this scaling). Returns float32.
    """
    v = percentile_scale(array, mask, percentile)
    if reference is not None:
        marks = np.percentile(v[mask].astype(np.float64), list(landmark_percentiles))
        v = standardise(v, marks, reference)
    v = np.clip(v, 0.0, 1.0)
    out = (2.0 * v - 1.0).astype(np.float32)
    if zero_background:
        out[~mask] = -1.0
    return out


# --------------------------------------------------------------------------------- a whole case
@dataclass
class Case:
    """A subject's co-registered volumes in the canonical frame, plus what is needed to go back.

    ``arrays[modality]`` are canonical float32 ``[z, y, x]`` arrays on the reference (first modality)
    grid; ``reference`` is the reference image exactly as read (its geometry is the output geometry);
    ``spacing`` is the canonical voxel spacing (x, y, z) in mm.
    """

    reference: sitk.Image
    reorientation: Reorientation
    arrays: dict[str, np.ndarray]
    mask: np.ndarray
    spacing: tuple[float, float, float]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.arrays)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical array shape (z, y, x)."""
        z, y, x = self.mask.shape
        return z, y, x

    def normalised(
        self,
        modalities: Sequence[str] | None = None,
        percentile: float = 99.0,
        reference: IntensityReference | None = None,
    ) -> np.ndarray:
        """``[C, z, y, x]`` float32 in [-1, 1], each modality normalised on the shared brain mask, and
        with a ``reference`` standardised to its landmarks (:func:`normalise`)."""
        names = list(modalities) if modalities is not None else self.modalities
        missing = [m for m in names if m not in self.arrays]
        if missing:
            raise InputError(f"missing modality: {', '.join(missing)} (have {', '.join(self.modalities)})")
        if reference is not None:
            lacking = [m for m in names if m not in reference.values]
            if lacking:
                raise InputError(f"the intensity reference has no landmarks for {', '.join(lacking)}")
            if reference.scale_percentile != percentile:
                raise InputError(
                    f"the intensity reference is on the {reference.scale_percentile:g}th percentile's scale, "
                    f"not the {percentile:g}th"
                )
        return np.stack(
            [
                normalise(
                    self.arrays[m],
                    self.mask,
                    percentile,
                    reference=None if reference is None else reference.values[m],
                    landmark_percentiles=LANDMARK_PERCENTILES if reference is None else reference.percentiles,
                )
                for m in names
            ]
        )

    def to_original(self, canonical: np.ndarray, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """Put a canonical ``[z, y, x]`` array back on the reference grid (exact geometry copy)."""
        if canonical.shape != self.shape:
            raise ValueError(f"array shape {canonical.shape} does not match the case's canonical shape {self.shape}")
        image = sitk.GetImageFromArray(self.reorientation.from_canonical(canonical))
        image = sitk.Cast(image, pixel_type)
        image.CopyInformation(self.reference)
        return image


def case_from_images(images: Mapping[str, sitk.Image], min_overlap: float = 0.5, mask_from: str | None = None) -> Case:
    """Build a :class:`Case` from already-read images; the first entry is the reference grid.

    Other modalities are resampled onto the reference grid when their geometry differs (see
    :func:`align_to_reference`). The brain mask comes from ``mask_from`` (default: the reference).
    """
    if not images:
        raise InputError("no input volumes given")
    names = list(images)
    ref_name = names[0]
    reference = check_volume(images[ref_name], name=ref_name)
    canonical_ref, reo = to_canonical(reference)
    arrays: dict[str, np.ndarray] = {ref_name: sitk.GetArrayFromImage(canonical_ref)}
    for name in names[1:]:
        moving = check_volume(images[name], name=name)
        aligned = align_to_reference(moving, reference, name=name, reference_name=ref_name, min_overlap=min_overlap)
        arrays[name] = reo.to_canonical(sitk.GetArrayFromImage(aligned))
    mask = brain_mask(arrays[mask_from or ref_name])
    return Case(
        reference=reference,
        reorientation=reo,
        arrays=arrays,
        mask=mask,
        spacing=reo.canonical_spacing(reference.GetSpacing()),
    )


def load_case(paths: Mapping[str, str | os.PathLike], min_overlap: float = 0.5, max_voxels: int = MAX_VOXELS) -> Case:
    """Read modality volumes (``{"flair": path, "t2": path, ...}``; the first is the reference)."""
    images = {name: read_volume(path, name=name.upper(), max_voxels=max_voxels) for name, path in paths.items()}
    case = case_from_images(images, min_overlap=min_overlap)
    case.sources = {name: str(path) for name, path in paths.items()}
    return case


def read_labelmap_like(path: str | os.PathLike, case: Case, name: str = "mask") -> np.ndarray:
    """Read a label volume on the case's reference grid and return it as a canonical int array.

    Refuses a label volume whose grid differs from the reference (labels are never interpolated).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{name} file not found: '{p}'")
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError:
        raise InputError(f"cannot read {name} file '{p}'") from None
    if image.GetDimension() != 3 or not same_geometry(image, case.reference):
        raise GeometryError(f"{name} '{p}' is not on the same voxel grid as the reference volume")
    return case.reorientation.to_canonical(sitk.GetArrayFromImage(image).astype(np.int16))


# ------------------------------------------------------------------------------------------ slices
def slice_indices(n_slices: int, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """Axial slice indices ``start ≤ k < stop`` (canonical, counted from inferior), validated."""
    s = 0 if start is None else int(start)
    e = n_slices if stop is None else int(stop)
    if s < 0 or e > n_slices or s >= e:
        raise InputError(f"slice range [{s}, {e}) is outside the volume's 0..{n_slices} axial slices")
    return np.arange(s, e)


#: brain-framed slices (:meth:`PlaneFit.for_brain`) keep at least this much (mm) around the brain
FRAME_MARGIN_MM = 6.0


@dataclass(frozen=True)
class PlaneFit:
    """Maps an axial slice ``(H, W)`` with in-plane spacing ``(sy, sx)`` to a square ``size × size``
    model slice and back: pad (or crop) to a physically square box, then resize.

    ``pad = ((top, bottom), (left, right))`` in native pixels; a negative entry crops that many.
    """

    in_shape: tuple[int, int]
    pad: tuple[tuple[int, int], tuple[int, int]]
    size: int

    @staticmethod
    def for_slice(shape: Sequence[int], spacing_yx: Sequence[float], size: int) -> PlaneFit:
        h, w = int(shape[0]), int(shape[1])
        sy, sx = float(spacing_yx[0]), float(spacing_yx[1])
        side = max(h * sy, w * sx)
        ph, pw = max(h, round(side / sy)), max(w, round(side / sx))
        pad = (((ph - h) // 2, ph - h - (ph - h) // 2), ((pw - w) // 2, pw - w - (pw - w) // 2))
        return PlaneFit(in_shape=(h, w), pad=pad, size=int(size))

    @staticmethod
    def for_brain(
        brain: np.ndarray, spacing_yx: Sequence[float], size: int, fov_mm: float, margin_mm: float = FRAME_MARGIN_MM
    ) -> PlaneFit:
        """A square box of side ``fov_mm`` (mm) centred on the in-plane extent of ``brain`` [H, W] (bool,
        e.g. the brain mask of every slice projected onto one plane), widened to the brain's extent plus
        ``margin_mm`` on each side when the brain is larger, so no brain pixel is ever cut. The model
        then sees anatomy at the same scale (``fov_mm / size`` mm per pixel) whatever the scanner's
        field of view; the scanner's whole field of view (:meth:`for_slice`) when ``brain`` is empty."""
        b = np.asarray(brain, bool)
        h, w = b.shape
        sy, sx = float(spacing_yx[0]), float(spacing_yx[1])
        if not b.any():
            return PlaneFit.for_slice((h, w), (sy, sx), size)
        ys, xs = np.nonzero(b)
        extent = max((ys.max() - ys.min() + 1) * sy, (xs.max() - xs.min() + 1) * sx) + 2.0 * float(margin_mm)
        side = max(float(fov_mm), extent)
        bh, bw = round(side / sy), round(side / sx)
        top = round((ys.min() + ys.max() + 1 - bh) / 2.0)
        left = round((xs.min() + xs.max() + 1 - bw) / 2.0)
        return PlaneFit(in_shape=(h, w), pad=((-top, top + bh - h), (-left, left + bw - w)), size=int(size))

    @staticmethod
    def for_case(case: Case, size: int, fov_mm: float | None = None) -> PlaneFit:
        """Plane fit for the canonical axial slices of ``case`` (spacing y, x): the scanner's whole
        field of view, or with ``fov_mm`` a box of that side framing the case's brain (:meth:`for_brain`,
        one box for all slices)."""
        spacing_yx = (case.spacing[1], case.spacing[0])
        if fov_mm is None:
            return PlaneFit.for_slice(case.shape[1:], spacing_yx, size)
        return PlaneFit.for_brain(np.asarray(np.asarray(case.mask, bool).any(0)), spacing_yx, size, fov_mm)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.in_shape[0] + sum(self.pad[0]), self.in_shape[1] + sum(self.pad[1]))

    def to_model(self, slices: np.ndarray, kind: str = "image", fill: float = -1.0) -> np.ndarray:
        """``[..., H, W]`` native slices → ``[..., size, size]``.

        ``kind``: ``"image"`` bilinear with antialiasing, padded with ``fill``; ``"mask"`` binary mask
        via bilinear interpolation then ≥ 0.5 (as the reference code prepares BraTS masks);
        ``"label"`` nearest neighbour (integer labels).
        """
        if tuple(slices.shape[-2:]) != self.in_shape:
            raise ValueError(f"slice shape {slices.shape[-2:]} does not match the fitted {self.in_shape}")
        pad_value = fill if kind == "image" else 0
        (t, b), (left, r) = self.pad
        h, w = self.in_shape
        cropped = slices[..., max(0, -t) : h - max(0, -b), max(0, -left) : w - max(0, -r)]
        widths = [(max(0, t), max(0, b)), (max(0, left), max(0, r))]
        padded = np.pad(cropped, [(0, 0)] * (slices.ndim - 2) + widths, constant_values=pad_value)
        return _resize(padded, (self.size, self.size), kind)

    def from_model(self, slices: np.ndarray, kind: str = "image") -> np.ndarray:
        """``[..., size, size]`` model slices → ``[..., H, W]`` on the native slice grid.

        ``kind``: ``"image"`` (heatmaps, bilinear), ``"label"`` (nearest neighbour) or ``"mask"``.
        Native pixels outside a cropping box get 0.
        """
        if tuple(slices.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"model slice shape {slices.shape[-2:]} is not {self.size}×{self.size}")
        up = _resize(slices, self.padded_shape, kind)
        (t, b), (left, r) = self.pad
        h, w = self.in_shape
        if min(t, b, left, r) >= 0:
            return np.ascontiguousarray(up[..., t : t + h, left : left + w])
        out = np.zeros((*up.shape[:-2], h, w), up.dtype)
        y0, y1, x0, x1 = max(0, -t), h - max(0, -b), max(0, -left), w - max(0, -r)
        out[..., y0:y1, x0:x1] = up[..., y0 + t : y1 + t, x0 + left : x1 + left]
        return out


def _resize(array: np.ndarray, shape: tuple[int, int], kind: str) -> np.ndarray:
    """Batched 2D resize of the last two axes with torch (one call for all slices)."""
    if tuple(array.shape[-2:]) == tuple(shape):
        return np.array(array, copy=True)
    lead = array.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(-1, 1, *array.shape[-2:])
    if kind == "image":
        down = shape[0] < array.shape[-2] or shape[1] < array.shape[-1]
        out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=down)
        return out.reshape(*lead, *shape).numpy().astype(array.dtype if array.dtype.kind == "f" else np.float32)
    if kind == "mask":
        out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False) >= 0.5
        return out.reshape(*lead, *shape).numpy().astype(array.dtype)
    if kind == "label":
        out = F.interpolate(t, size=shape, mode="nearest-exact")
        return out.reshape(*lead, *shape).numpy().astype(array.dtype)
    raise ValueError(f"unknown resize kind {kind!r}; use 'image', 'mask' or 'label'")


def case_slices(
    case: Case,
    modalities: Sequence[str] | None = None,
    size: int = 128,
    start: int | None = None,
    stop: int | None = None,
    percentile: float = 99.0,
) -> tuple[np.ndarray, np.ndarray, PlaneFit]:
    """Normalised model-size axial slices of a case.

    Returns ``(images [K, C, size, size] float32 in [-1, 1], indices [K], plane_fit)``.
    """
    idx = slice_indices(case.shape[0], start, stop)
    vol = case.normalised(modalities, percentile)  # [C, z, y, x]
    fit = PlaneFit.for_case(case, size)
    slices = np.moveaxis(vol[:, idx], 1, 0)  # [K, C, y, x]
    return fit.to_model(slices, "image", fill=-1.0), idx, fit


def reassemble(
    case: Case,
    model_slices: np.ndarray,
    indices: Sequence[int] | np.ndarray,
    fit: PlaneFit,
    kind: str = "image",
    fill: float = 0.0,
) -> sitk.Image:
    """Per-slice model outputs ``[K, size, size]`` → a volume on the case's original grid.

    Slices not in ``indices`` get ``fill``. ``kind="image"`` (heatmaps: bilinear, float32) or
    ``"label"`` (labelmaps: nearest neighbour, uint8). Spacing, origin and direction are copied
    exactly from the input reference volume.
    """
    native = fit.from_model(np.asarray(model_slices), kind)
    dtype = np.float32 if kind == "image" else np.uint8
    vol = np.full(case.shape, fill, dtype=dtype)
    vol[np.asarray(indices)] = native.astype(dtype)
    return case.to_original(vol, sitk.sitkFloat32 if kind == "image" else sitk.sitkUInt8)
