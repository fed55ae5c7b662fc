"""``anomaly-diffusion``: the headless command line.

Subcommands:

* ``demo``    synthesise a phantom case and run the volume pipeline on it (see :func:`run_demo`)
* ``phantom`` write synthetic subjects as BraTS-style folders
* ``info``    versions, device, and whether the anatomy templates are available

Errors print one line (``error: ...``) and exit with status 2; outputs are written to a hidden
temporary folder first and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .cli_support import JsonlProgress, TqdmProgress
from .errors import AnomalyDiffusionError

log = logging.getLogger("AnomalyDiffusionLib")


# --------------------------------------------------------------------------------------- demo
def run_demo(
    out: Path, seed: int = 7, size: int = 128, spacing: float = 1.0, oblique: bool = True, progress=None
) -> dict:
    """Volume pipeline on a synthetic case, end to end, with its ground truth.

    1. Draw a phantom subject with one lesion and store FLAIR, T2 and the lesion labelmap on an
       anisotropic (1 × 1 × 2 mm), oblique, axis-flipped grid, as a scanner might (``inputs/``).
    2. Read them back as a user's files: validate, bring to the canonical LPS frame, resample T2
       onto the FLAIR grid, brain mask, normalise (AnoFPDM appendix B), cut axial slices and
       resize them to the model's ``size`` × ``size``.
    3. Reassemble per-slice outputs onto the original FLAIR grid: the model-space FLAIR (what a
       model sees) as a volume, and the lesion mask after the round trip through model space.
    4. Write ``summary.json`` (geometry checks, lesion slice range, DICE of the round-tripped mask
       against the truth) and ``overview.png``.
    """
    import SimpleITK as sitk

    from .metrics import dice
    from .phantom import PhantomOptions, make_grid, make_subject, oblique_direction, resample_case, write_case
    from .progress import report
    from .volumes import PlaneFit, case_slices, load_case, read_labelmap_like, reassemble, write_volume

    t0 = time.perf_counter()
    report(progress, "phantom", 0.0, "synthesising a subject")
    ph = make_subject(seed, PhantomOptions(spacing=spacing, n_lesions=1, modalities=("flair", "t2")))
    direction = oblique_direction((10.0, -6.0, 15.0), flip=(0, 2)) if oblique else np.eye(3)
    ph = resample_case(ph, make_grid(ph.labels, (1.0, 1.0, 2.0), direction))
    paths = write_case(ph, out, "inputs")
    report(progress, "phantom", 1.0, "inputs written")

    report(progress, "pipeline", 0.0, "reading volumes")
    case = load_case({"flair": paths["flair"], "t2": paths["t2"]})
    truth = read_labelmap_like(paths["seg"], case, "lesion mask") > 0
    report(progress, "pipeline", 0.3, "slicing")
    images, idx, fit = case_slices(case, ("flair", "t2"), size=size)
    masks = PlaneFit.for_case(case, size).to_model(truth[idx].astype(np.float32), "mask")
    report(progress, "pipeline", 0.6, "reassembling")
    model_flair = reassemble(case, images[:, 0], idx, fit, kind="image", fill=-1.0)
    mask_back = reassemble(case, masks, idx, fit, kind="label")
    write_volume(model_flair, out / "model_space_flair.nii.gz")
    write_volume(mask_back, out / "lesion_roundtrip.nii.gz")
    report(progress, "pipeline", 1.0, "done")

    back = case.reorientation.to_canonical(sitk.GetArrayFromImage(mask_back)) > 0
    lesion_slices = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(1))
    found = np.flatnonzero(back.reshape(back.shape[0], -1).any(1))
    ref = case.reference
    geometry_equal = all(
        getattr(img, f)() == getattr(ref, f)()
        for img in (model_flair, mask_back)
        for f in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection")
    )
    summary = {
        "what": "volume pipeline demo on a synthetic case (detection methods are not part of this build yet)",
        "version": __version__,
        "seed": seed,
        "input_grid": {"size": ref.GetSize(), "spacing": ref.GetSpacing(), "direction": ref.GetDirection()},
        "canonical_shape_zyx": list(case.shape),
        "model_slice_size": size,
        "slices": len(idx),
        "lesion_slices_truth": [int(lesion_slices.min()), int(lesion_slices.max())] if len(lesion_slices) else None,
        "lesion_slices_roundtrip": [int(found.min()), int(found.max())] if len(found) else None,
        "dice_roundtrip_vs_truth": round(dice(back, truth), 4),
        "lesion_volume_ml": round(float(truth.sum()) * float(np.prod(case.spacing)) / 1000.0, 2),
        "output_geometry_equals_input": geometry_equal,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _overview(case, truth, back, out / "overview.png")
    return summary


def _overview(case, truth: np.ndarray, back: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flair = case.arrays["flair"]
    area = truth.reshape(truth.shape[0], -1).sum(1)
    ks = [int(k) for k in np.argsort(area)[::-1][:3]] if area.any() else [case.shape[0] // 2]
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(4 * (len(ks) + 1), 4), facecolor="black")
    aspect = case.spacing[1] / case.spacing[0]
    for ax, k in zip(axes[:-1], ks, strict=False):
        ax.imshow(flair[k], cmap="gray", aspect=aspect, vmax=np.percentile(flair[case.mask], 99.5))
        ax.contour(truth[k], levels=[0.5], colors="lime", linewidths=1)
        ax.contour(back[k], levels=[0.5], colors="red", linewidths=1, linestyles="--")
        ax.set_title(f"axial slice {k}", color="white")
        ax.axis("off")
    ax = axes[-1]
    ax.set_facecolor("black")
    ax.plot(area * case.spacing[0] * case.spacing[1] / 100.0, color="orange")
    ax.set_title("lesion area per slice (cm²)", color="white")
    ax.tick_params(colors="white")
    fig.suptitle("FLAIR, truth (green) vs mask after the model-space round trip (red)", color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)


# --------------------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace, progress) -> int:
    out = Path(args.out)
    summary = _atomic_folder(out, lambda tmp: run_demo(tmp, seed=args.seed, size=args.size, progress=progress))
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "lesion_slices_truth",
                    "lesion_slices_roundtrip",
                    "dice_roundtrip_vs_truth",
                    "output_geometry_equals_input",
                    "seconds",
                )
            }
        )
    )
    files = "overview.png, summary.json, model_space_flair.nii.gz, lesion_roundtrip.nii.gz, inputs/"
    print(f"outputs in {out}: {files}")
    return 0


def _cmd_phantom(args: argparse.Namespace, progress) -> int:
    from .phantom import PhantomOptions, write_brats_folder

    opt = PhantomOptions(
        spacing=args.spacing,
        brats_grid=args.brats_grid,
        clinical_grid=args.clinical_grid,
        n_lesions=args.lesions,
    )
    paths = _atomic_folder(
        Path(args.out),
        lambda tmp: write_brats_folder(
            tmp,
            args.cases,
            seed=args.seed,
            options=opt,
            prefix=args.prefix,
            healthy_fraction=args.healthy_fraction,
            progress=progress,
        ),
    )
    print(f"wrote {len(paths)} subject(s) to {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace, progress) -> int:
    import SimpleITK as sitk
    import timm
    import torch

    from .phantom import template_dir

    try:
        templates = str(template_dir())
    except AnomalyDiffusionError as exc:
        templates = f"missing ({exc})"
    info = {
        "AnomalyDiffusionLib": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "phantom_templates": templates,
    }
    print(json.dumps(info, indent=1))
    return 0


def _atomic_folder(out: Path, work):
    """Run ``work(tmp_folder)``; on success move its files into ``out`` (created if needed), on
    failure remove them, so that ``out`` never holds a half-finished result."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".partial-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        result = work(tmp)
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            item.rename(dest)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-diffusion", description="Diffusion-model anomaly detection for brain MRI."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--progress",
        choices=("bar", "jsonl", "none"),
        default="bar",
        help="progress display: bar (terminal), jsonl (one JSON line per step on stdout), none",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="synthesise a phantom case and run the volume pipeline on it")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    d.add_argument("--size", type=int, default=128, help="model slice size (default 128)")
    d.set_defaults(func=_cmd_demo)

    ph = sub.add_parser("phantom", help="write synthetic subjects as BraTS-style folders")
    ph.add_argument("--out", required=True, help="output folder (one sub-folder per subject)")
    ph.add_argument("--cases", type=int, default=1, help="number of subjects (default 1)")
    ph.add_argument("--seed", type=int, default=0, help="seed of the first subject (default 0)")
    ph.add_argument("--spacing", type=float, default=1.0, help="isotropic voxel size in mm (default 1)")
    ph.add_argument("--brats-grid", action="store_true", help="resample onto a 240×240×155, 1 mm BraTS-like grid")
    ph.add_argument(
        "--clinical-grid",
        action="store_true",
        help="resample onto an oblique, axis-flipped 0.9×0.9×3 mm grid (geometry stress test)",
    )
    ph.add_argument("--lesions", type=int, default=None, help="lesions per subject (default: random 1-3)")
    ph.add_argument("--healthy-fraction", type=float, default=0.0, help="fraction of subjects without lesion")
    ph.add_argument("--prefix", default="Case", help="subject name prefix (default Case → Case_0, Case_1, ...)")
    ph.set_defaults(func=_cmd_phantom)

    i = sub.add_parser("info", help="print versions, device and data availability")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sink = {"bar": TqdmProgress, "jsonl": JsonlProgress}.get(args.progress)
    try:
        if sink is None:
            return args.func(args, None)
        with sink() as progress:
            return args.func(args, progress)
    except AnomalyDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
