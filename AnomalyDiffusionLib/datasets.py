"""2D slice datasets for training and evaluation: building, splitting, storing.

A slice dataset folder holds ``.npy`` arrays that can be memory-mapped (BraTS2021 makes ~10⁵ slices,
too many to hold in RAM at four channels):

* ``images.npy``  ``[N, C, S, S]`` float16 (default) in [-1, 1], channels in ``meta.json["modalities"]``
* ``masks.npy``   ``[N, S, S]`` uint8, 1 = lesion (any label > 0), resized with bilinear + 0.5
* ``labels.npy``  ``[N]`` uint8, 1 = the native slice holds at least one lesion voxel
* ``index.csv``   subject, canonical axial slice index, label per row
* ``meta.json``   modalities, size, preprocessing, counts

Sources: BraTS2021-layout folders (``<id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz``), ATLAS v2.0
(``*_T1w.nii.gz`` + ``*_mask.nii.gz``), or the synthetic phantom. The split is by patient.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import InputError
from .progress import CancelToken, ProgressCallback, tracked
from .volumes import Case, PlaneFit, case_from_images, load_case, read_labelmap_like, slice_indices

if TYPE_CHECKING:
    from .phantom import PhantomOptions

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")


@dataclass
class SliceDataset:
    """Arrays of one split (see the module docstring for shapes and meanings)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    subjects: list[str]
    slices: np.ndarray
    modalities: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def select(self, index: np.ndarray | Sequence[int]) -> SliceDataset:
        idx = np.asarray(index)
        return SliceDataset(
            images=self.images[idx],
            masks=self.masks[idx],
            labels=self.labels[idx],
            subjects=[self.subjects[i] for i in idx],
            slices=self.slices[idx],
            modalities=self.modalities,
            meta=dict(self.meta),
        )

    def channel_index(self, modalities: Sequence[str]) -> list[int]:
        """Positions of ``modalities`` among the stored channels (clear error if one is missing)."""
        missing = [m for m in modalities if m not in self.modalities]
        if missing:
            raise InputError(f"dataset lacks modalities {missing}; it has {list(self.modalities)}")
        return [self.modalities.index(m) for m in modalities]

    def channels(self, modalities: Sequence[str]) -> np.ndarray:
        """Images restricted to (and ordered as) ``modalities``, e.g. ("flair", "t2") for inference.
        Reads the whole array; training indexes rows first (``images[idx][:, channel_index(...)]``)."""
        return self.images[:, self.channel_index(modalities)]

    @staticmethod
    def concatenate(parts: Sequence[SliceDataset]) -> SliceDataset:
        if not parts:
            raise ValueError("nothing to concatenate")
        return SliceDataset(
            images=np.concatenate([p.images for p in parts]),
            masks=np.concatenate([p.masks for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            subjects=[s for p in parts for s in p.subjects],
            slices=np.concatenate([p.slices for p in parts]),
            modalities=parts[0].modalities,
            meta=dict(parts[0].meta),
        )

    def save(self, folder: str | os.PathLike, dtype: str = "float16") -> Path:
        """Write the dataset folder atomically (written beside it, then renamed)."""
        writer = SliceDatasetWriter(folder, self.modalities, self.size, dtype=dtype, meta=self.meta)
        writer.add(self)
        return writer.close()

    @staticmethod
    def load(folder: str | os.PathLike, mmap: bool = True) -> SliceDataset:
        """Open a dataset folder; with ``mmap`` the arrays are memory-mapped read-only."""
        f = Path(folder)
        if not (f / "meta.json").is_file():
            raise InputError(f"'{f}' is not a slice dataset folder (no meta.json)")
        meta = json.loads((f / "meta.json").read_text())
        mode: Literal["r"] | None = "r" if mmap else None
        subjects, slices = [], []
        with open(f / "index.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                subjects.append(row["subject"])
                slices.append(int(row["slice"]))
        return SliceDataset(
            images=np.load(f / "images.npy", mmap_mode=mode),
            masks=np.load(f / "masks.npy", mmap_mode=mode),
            labels=np.load(f / "labels.npy", mmap_mode=mode),
            subjects=subjects,
            slices=np.asarray(slices, dtype=np.int32),
            modalities=tuple(meta["modalities"]),
            meta=meta,
        )


class SliceDatasetWriter:
    """Streams slices of many subjects to a dataset folder without holding them in memory.

    Arrays are appended to raw files and turned into ``.npy`` files at :meth:`close`; the folder
    appears under its final name only when complete.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        modalities: Sequence[str],
        size: int,
        dtype: str = "float16",
        meta: dict | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(f".{self.folder.name}.partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.modalities = tuple(modalities)
        self.size = int(size)
        self.dtype = np.dtype(dtype)
        self.meta = dict(meta or {})
        self.count = 0
        self._raw = {k: open(self.tmp / f"{k}.raw", "wb") for k in ("images", "masks", "labels")}
        self._index = open(self.tmp / "index.csv", "w", newline="")
        self._csv = csv.writer(self._index)
        self._csv.writerow(["subject", "slice", "label"])

    def add(self, part: SliceDataset) -> None:
        if part.modalities != self.modalities or (len(part) and part.size != self.size):
            raise ValueError("slice part does not match the dataset's modalities/size")
        self._raw["images"].write(np.ascontiguousarray(part.images, dtype=self.dtype).tobytes())
        self._raw["masks"].write(np.ascontiguousarray(part.masks, dtype=np.uint8).tobytes())
        self._raw["labels"].write(np.ascontiguousarray(part.labels, dtype=np.uint8).tobytes())
        for s, k, y in zip(part.subjects, part.slices, part.labels, strict=True):
            self._csv.writerow([s, int(k), int(y)])
        self.count += len(part)

    def abort(self) -> None:
        for fh in (*self._raw.values(), self._index):
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> Path:
        for fh in (*self._raw.values(), self._index):
            fh.close()
        n, c, s = self.count, len(self.modalities), self.size
        shapes = {
            "images": ((n, c, s, s), self.dtype),
            "masks": ((n, s, s), np.dtype(np.uint8)),
            "labels": ((n,), np.dtype(np.uint8)),
        }
        for key, (shape, dt) in shapes.items():
            raw = self.tmp / f"{key}.raw"
            with open(self.tmp / f"{key}.npy", "wb") as out, open(raw, "rb") as src:
                np.lib.format.write_array_header_1_0(
                    out, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": shape}
                )
                shutil.copyfileobj(src, out, length=16 << 20)
            raw.unlink()
        meta = {
            **self.meta,
            "modalities": list(self.modalities),
            "size": s,
            "count": n,
            "unhealthy": int(np.load(self.tmp / "labels.npy").sum()) if n else 0,
            "dtype": str(self.dtype),
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)
        return self.folder


# ------------------------------------------------------------------------------ case → slices
def slices_from_case(
    case: Case,
    seg: np.ndarray | None,
    subject: str,
    modalities: Sequence[str] | None = None,
    size: int = 128,
    start: int | None = None,
    stop: int | None = None,
    min_brain_fraction: float = 0.01,
    percentile: float = 99.0,
    fov_mm: float | None = None,
) -> SliceDataset:
    """Model-size axial slices of one subject with masks and image-level labels.

    ``seg`` is a canonical label array (``None``: no lesion). Slices in ``[start, stop)`` whose brain
    covers less than ``min_brain_fraction`` of the slice are dropped. Label = any lesion voxel in the
    native slice. ``fov_mm``: frame the brain at that physical side (:meth:`PlaneFit.for_brain`, as a
    bundle with ``slice_fov_mm`` does at inference) instead of the scanner's whole field of view.
    """
    mods = tuple(modalities) if modalities is not None else tuple(case.modalities)
    idx = slice_indices(case.shape[0], start, stop)
    brain_frac = case.mask[idx].reshape(len(idx), -1).mean(1)
    idx = idx[brain_frac >= min_brain_fraction]
    fit = PlaneFit.for_case(case, size, fov_mm)
    vol = case.normalised(mods, percentile)
    images = fit.to_model(np.moveaxis(vol[:, idx], 1, 0), "image", fill=-1.0)
    lesion = (seg[idx] > 0) if seg is not None else np.zeros((len(idx), *case.shape[1:]), bool)
    masks = fit.to_model(lesion.astype(np.float32), "mask").astype(np.uint8)
    labels = np.asarray(lesion.reshape(len(idx), -1).any(1), dtype=np.uint8)
    return SliceDataset(
        images=images.astype(np.float32),
        masks=masks,
        labels=labels,
        subjects=[subject] * len(idx),
        slices=idx.astype(np.int32),
        modalities=mods,
    )


# --------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class CaseFiles:
    subject: str
    images: dict[str, Path]
    seg: Path | None


def find_brats_cases(root: str | os.PathLike, modalities: Sequence[str] = BRATS_MODALITIES) -> list[CaseFiles]:
    """Subjects of a BraTS2021-layout folder: ``<id>/<id>_<modality>.nii[.gz]`` plus ``<id>_seg``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: '{root}'")
    cases = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {}
        for m in (*modalities, "seg"):
            hits = [p for ext in (".nii.gz", ".nii") for p in [sub / f"{sub.name}_{m}{ext}"] if p.is_file()]
            if hits:
                files[m] = hits[0]
        missing = [m for m in modalities if m not in files]
        if missing:
            if any(files.values()):
                raise InputError(f"subject '{sub.name}' lacks {', '.join(missing)} ({sub})")
            continue
        cases.append(CaseFiles(sub.name, {m: files[m] for m in modalities}, files.get("seg")))
    if not cases:
        raise InputError(f"no BraTS-style subjects (<id>/<id>_flair.nii.gz ...) found in '{root}'")
    return cases


_ATLAS_T1 = re.compile(r"(sub-[^_/]+)(_ses-[^_/]+)?.*_T1w\.nii(\.gz)?$")


def find_atlas_cases(root: str | os.PathLike) -> list[CaseFiles]:
    """Subjects of an ATLAS v2.0 (BIDS) tree: ``*_T1w.nii.gz`` with ``*_label-L_desc-T1lesion_mask``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: '{root}'")
    cases = []
    for t1 in sorted(root.rglob("*_T1w.nii*")):
        m = _ATLAS_T1.search(t1.name)
        if not m:
            continue
        stem = t1.name[: t1.name.index("_T1w")]
        masks = sorted(t1.parent.glob(f"{stem}*_mask.nii*"))
        subject = m.group(1) + (m.group(2) or "")
        cases.append(CaseFiles(subject, {"t1": t1}, masks[0] if masks else None))
    if not cases:
        raise InputError(f"no ATLAS-style subjects (*_T1w.nii.gz) found in '{root}'")
    return cases


def split_subjects(
    subjects: Sequence[str], fractions: Sequence[float] = (0.75, 0.05, 0.20), seed: int = 10
) -> dict[str, list[str]]:
    """Shuffle subjects (seeded) and cut into train/val/test by ``fractions`` (the reference code's
    75/5/20 with seed 10). Each split with a positive fraction gets at least one subject when there
    are enough subjects."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    subs = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(subs))
    n = len(subs)
    counts = [int(np.floor(f * n)) for f in fractions]
    for i in np.argsort([-(f * n - np.floor(f * n)) for f in fractions]):  # largest remainders
        if sum(counts) < n:
            counts[i] += 1
    for i, f in enumerate(fractions):  # never leave a requested split empty if others can give
        if f > 0 and counts[i] == 0 and n >= sum(1 for g in fractions if g > 0):
            j = int(np.argmax(counts))
            counts[j] -= 1
            counts[i] += 1
    names = ("train", "val", "test")
    out, k = {}, 0
    for name, c in zip(names, counts, strict=True):
        out[name] = [subs[i] for i in order[k : k + c]]
        k += c
    return out


def prepare_dataset(
    cases: Sequence[CaseFiles],
    out: str | os.PathLike,
    modalities: Sequence[str],
    size: int = 128,
    start: int | None = None,
    stop: int | None = None,
    fractions: Sequence[float] = (0.75, 0.05, 0.20),
    seed: int = 10,
    min_brain_fraction: float = 0.01,
    dtype: str = "float16",
    source: str = "",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    fov_mm: float | None = None,
) -> dict:
    """Turn subjects into ``out/{train,val,test}`` slice datasets plus ``out/split.json``
    (``fov_mm``: brain-framed slices, :func:`slices_from_case`).

    Returns the summary written to ``split.json`` (subjects and slice counts per split).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = split_subjects([c.subject for c in cases], fractions, seed)
    which = {s: name for name, subs in split.items() for s in subs}
    meta = {
        "source": source,
        "normalisation": "per-subject: divide by the 99th percentile of brain voxels, clip, scale to [-1, 1]",
        "slice_range": [start, stop],
        "min_brain_fraction": min_brain_fraction,
        "fov_mm": fov_mm,
    }
    writers = {
        name: SliceDatasetWriter(out / name, modalities, size, dtype, meta={**meta, "split": name}) for name in split
    }
    try:
        for c in tracked(cases, len(cases), "prepare", progress, cancel, "slicing subjects"):
            case = load_case(c.images)
            seg = read_labelmap_like(c.seg, case, name=f"{c.subject} mask") if c.seg is not None else None
            writers[which[c.subject]].add(
                slices_from_case(case, seg, c.subject, modalities, size, start, stop, min_brain_fraction, fov_mm=fov_mm)
            )
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    summary: dict[str, Any] = {
        "seed": seed,
        "fractions": list(fractions),
        "modalities": list(modalities),
        "size": size,
        "splits": {},
    }
    for name, w in writers.items():
        w.close()
        labels = np.load(out / name / "labels.npy")
        summary["splits"][name] = {
            "subjects": split[name],
            "slices": len(labels),
            "unhealthy": int(labels.sum()),
        }
    (out / "split.json").write_text(json.dumps(summary, indent=1))
    return summary


def phantom_dataset(
    n_subjects: int,
    seed: int = 0,
    modalities: Sequence[str] = ("flair", "t2"),
    size: int = 128,
    start: int | None = None,
    stop: int | None = None,
    healthy_fraction: float = 0.0,
    options: PhantomOptions | None = None,
    min_brain_fraction: float = 0.01,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    fov_mm: float | None = None,
) -> SliceDataset:
    """Slices of ``n_subjects`` synthetic subjects (seeds ``seed .. seed+n-1``) built in memory.

    ``options`` is a :class:`~AnomalyDiffusionLib.phantom.PhantomOptions`; a ``healthy_fraction`` of
    the subjects carry no lesion. ``fov_mm``: brain-framed slices (:func:`slices_from_case`).
    """
    from dataclasses import replace

    from .phantom import PhantomOptions, make_subject

    opt = options if options is not None else PhantomOptions(spacing=2.0)
    opt = replace(opt, modalities=tuple(modalities))
    n_healthy = round(healthy_fraction * n_subjects)
    parts = []
    for i in tracked(range(n_subjects), n_subjects, "phantom", progress, cancel, "synthesising subjects"):
        o = replace(opt, n_lesions=0) if i >= n_subjects - n_healthy else opt
        ph = make_subject(seed + i, o)
        case = case_from_images({m: ph.images[m] for m in modalities})
        seg = case.reorientation.to_canonical(np.asarray(ph.mask, dtype=np.uint8))
        parts.append(
            slices_from_case(
                case, seg, f"phantom_{seed + i}", modalities, size, start, stop, min_brain_fraction, fov_mm=fov_mm
            )
        )
    ds = SliceDataset.concatenate(parts)
    ds.meta.update({"source": "phantom", "seeds": [seed, seed + n_subjects - 1], "fov_mm": fov_mm})
    return ds


def open_slices(
    data: str | os.PathLike | None,
    split: str,
    phantom: int | None,
    modalities: Sequence[str],
    size: int,
    phantom_seed: int = 5000,
    healthy_fraction: float = 0.25,
    spacing: float = 2.0,
    start: int | None = None,
    stop: int | None = None,
    progress: ProgressCallback | None = None,
    randomise: bool = False,
    fov_mm: float | None = None,
) -> SliceDataset:
    """The slices a script works on: ``data/split`` of a prepared dataset (or ``data`` itself),
    memory-mapped, or ``phantom`` synthetic subjects built in memory (``randomise``: domain-randomised
    appearance, :attr:`PhantomOptions.randomise`; ``fov_mm``: brain-framed, :func:`slices_from_case`);
    either restricted to the axial slices ``start:stop`` (canonical slice indices, e.g. BMAD's 60:100
    of the 155 BraTS slices). A prepared dataset must have been framed as ``fov_mm`` says."""
    if (data is None) == (phantom is None):
        raise InputError("give exactly one of --data or --phantom")
    if data is not None:
        root = Path(data)
        folder = root / split if (root / split / "meta.json").is_file() else root
        ds = SliceDataset.load(folder)
        framed = ds.meta.get("fov_mm")
        same = framed is None if fov_mm is None else framed is not None and abs(float(framed) - fov_mm) < 1e-6
        if not same:
            raise InputError(
                f"dataset slices are framed with fov_mm {framed}, not {fov_mm}: prepare the data with the same "
                "--fov-mm as the model"
            )
        if ds.size != size:
            raise InputError(
                f"dataset slices are {ds.size}×{ds.size} but the model is {size}×{size}; "
                f"train with --image-size {ds.size} or prepare the data with --size {size}"
            )
        if start is not None or stop is not None:
            keep = np.flatnonzero((ds.slices >= (start or 0)) & (ds.slices < (np.inf if stop is None else stop)))
            if not len(keep):
                raise InputError(f"no slices of {folder} lie in the axial range {start}:{stop}")
            ds = ds.select(keep)
        return ds
    from .phantom import PhantomOptions

    assert phantom is not None  # exactly one of data / phantom, checked above
    return phantom_dataset(
        phantom,
        seed=phantom_seed,
        modalities=modalities,
        size=size,
        start=start,
        stop=stop,
        healthy_fraction=healthy_fraction,
        options=PhantomOptions(spacing=spacing, randomise=randomise),
        progress=progress,
        fov_mm=fov_mm,
    )


def load_or_make(
    data: str | os.PathLike | None,
    split: str,
    phantom: int | None,
    modalities: Sequence[str],
    size: int,
    phantom_seed: int = 5000,
    healthy_fraction: float = 0.25,
    spacing: float = 2.0,
    max_slices: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    start: int | None = None,
    stop: int | None = None,
    randomise: bool = False,
    fov_mm: float | None = None,
) -> tuple[np.ndarray, SliceDataset]:
    """:func:`open_slices` (axial range ``start:stop``; ``randomise``: domain-randomised phantoms;
    ``fov_mm``: brain-framed slices)
    for calibration/evaluation: a seeded random subset of at most ``max_slices``, and its images
    restricted to ``modalities`` as float32 [N, C, S, S] in memory."""
    ds = open_slices(
        data,
        split,
        phantom,
        modalities,
        size,
        phantom_seed,
        healthy_fraction,
        spacing,
        start,
        stop,
        progress=progress,
        randomise=randomise,
        fov_mm=fov_mm,
    )
    if max_slices is not None and len(ds) > max_slices:
        ds = ds.select(np.sort(np.random.default_rng(seed).choice(len(ds), max_slices, replace=False)))
    return np.asarray(ds.channels(modalities), dtype=np.float32), ds


# ---------------------------------------------------------------------------------------- BMAD
def colormap_to_grey(rgb: np.ndarray, cmap: str = "bone") -> np.ndarray:
    """Invert a matplotlib colormap: [H, W, 3] uint8 RGB → [H, W] float in [0, 1] (nearest of its
    256 colours). BMAD's BraTS PNGs are FLAIR slices rendered with "bone"."""
    from matplotlib import colormaps
    from scipy.spatial import cKDTree

    lut = (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float64)
    _, idx = cKDTree(lut).query(rgb.reshape(-1, 3).astype(np.float64))
    return (idx / 255.0).reshape(rgb.shape[:2])


def read_bmad(root: str | os.PathLike, split: str = "test", size: int = 128, cmap: str = "bone") -> SliceDataset:
    """A BMAD-benchmark BraTS2021 folder as a one-channel ("flair") slice dataset in [-1, 1].

    Layout: ``train/good/*.png``; ``test/good/*.png`` and ``test/Ungood/img/*.png`` with masks in
    ``test/Ungood/label/`` (same names); ``valid/`` like ``test/`` when present. Colour PNGs are
    mapped back to intensity by inverting ``cmap``; slices are resized to ``size``.
    """
    from PIL import Image

    base = Path(root) / split
    if not base.is_dir():
        raise InputError(f"BMAD folder has no '{split}/' split: '{base}'")
    entries: list[tuple[Path, Path | None, int]] = [(p, None, 0) for p in sorted((base / "good").glob("*.png"))]
    for p in sorted((base / "Ungood" / "img").glob("*.png")):
        lab = base / "Ungood" / "label" / p.name
        entries.append((p, lab if lab.is_file() else None, 1))
    if not entries:
        raise InputError(f"no PNG slices in '{base}/good' or '{base}/Ungood/img'")
    images, masks = [], []
    for img_path, lab_path, _ in entries:
        arr = np.asarray(Image.open(img_path).convert("RGB"))
        grey = colormap_to_grey(arr, cmap) * 2 - 1
        mask = np.asarray(Image.open(lab_path).convert("L")) > 0 if lab_path is not None else np.zeros(grey.shape, bool)
        fit = PlaneFit.for_slice(grey.shape, (1.0, 1.0), size)
        images.append(fit.to_model(grey[None].astype(np.float32), "image", fill=-1.0)[0])
        masks.append(fit.to_model(mask[None].astype(np.float32), "mask")[0].astype(np.uint8))
    return SliceDataset(
        images=np.stack(images)[:, None],
        masks=np.stack(masks),
        labels=np.array([e[2] for e in entries], np.uint8),
        subjects=[e[0].stem for e in entries],
        slices=np.full(len(entries), -1, np.int32),
        modalities=("flair",),
        meta={"source": f"BMAD {split} '{root}'", "colormap": cmap},
    )
