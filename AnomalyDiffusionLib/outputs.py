"""Writing a :class:`~AnomalyDiffusionLib.pipeline.DetectResult` to a folder: the files ``detect``
promises (``segmentation``, ``heatmap``, ``slices.csv``, ``summary.json``, ``overview.png``).

The caller writes into a temporary folder and moves it into place (see the CLI), so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .volumes import VOLUME_EXTENSIONS, volume_suffix, write_volume

OUTPUT_FILES = ("segmentation", "heatmap", "slices.csv", "summary.json", "overview.png")


def outputs_complete(folder: Path) -> dict | None:
    """The ``summary.json`` of a finished output folder when every file it lists is there, else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        names = summary["outputs"].values()
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return summary if all((folder / n).is_file() for n in names) else None


def replace_folder(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest`` (a sibling), replacing an older ``dest``. Each
    step is one rename, so an interruption leaves either the old folder, no folder, or the new one,
    never a mixture (a leftover ``.old-*`` sibling is removed by the next call for ``dest``)."""
    old = dest.with_name(f".old-{dest.name}")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)


def check_format(fmt: str) -> str:
    """``nii.gz`` / ``.nrrd`` … → the volume suffix, or :class:`InputError` for an unknown format."""
    suffix = fmt if fmt.startswith(".") else f".{fmt}"
    if suffix not in VOLUME_EXTENSIONS:
        from .errors import InputError

        raise InputError(f"unknown output format '{fmt}'; use one of {', '.join(VOLUME_EXTENSIONS)}")
    return suffix


def output_suffix(result, fmt: str | None = None) -> str:
    """``fmt`` (e.g. ``nii.gz``, ``.nrrd``) or the FLAIR input's format, defaulting to ``.nii.gz``."""
    if fmt:
        return check_format(fmt)
    src = result.case.sources.get("flair")
    return (volume_suffix(src) if src else "") or ".nii.gz"


def write_result(result, out: Path, fmt: str | None = None, overview: bool = True, options=None) -> dict[str, Path]:
    """Write every output of ``result`` into folder ``out``; returns name → path. ``options`` (the
    :class:`~AnomalyDiffusionLib.options.DetectOptions` of the run) go into ``summary.json`` as
    ``options``: ``batch`` compares them to decide whether a case's outputs are up to date."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = output_suffix(result, fmt)
    paths: dict[str, Path] = {}
    if result.labelmap is not None:
        paths["segmentation"] = write_volume(result.labelmap, out / f"segmentation{suffix}")
    if result.heatmap is not None:
        paths["heatmap"] = write_volume(result.heatmap, out / f"heatmap{suffix}")
    paths["slices.csv"] = write_table(result.rows, out / "slices.csv")
    summary = dict(result.summary)
    if options is not None:
        summary["options"] = options.as_summary()
    summary["outputs"] = {k: p.name for k, p in paths.items()}
    if overview:
        paths["overview.png"] = write_overview(result, out / "overview.png")
        summary["outputs"]["overview.png"] = "overview.png"
    summary["outputs"]["summary.json"] = "summary.json"
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    paths["summary.json"] = out / "summary.json"
    result.summary = summary
    return paths


def write_table(rows: list[dict], path: Path) -> Path:
    """Per-slice rows as CSV; columns in first-seen order, empty where a method did not run."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (int(v) if isinstance(v, bool) else v) for k, v in r.items()})
    return path


def write_overview(result, path: Path, n_slices: int = 3) -> Path:
    """A few most anomalous slices (FLAIR, heatmap overlay, mask contour) and the per-slice curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case = result.case
    flair = case.arrays["flair"]
    rows = result.rows
    area = np.array([r.get("lesion_area_mm2", 0.0) for r in rows])
    score = np.array([r.get("dode_score", np.nan) for r in rows], float)
    order = np.argsort(-area, kind="stable") if area.any() else np.argsort(-np.nan_to_num(score, nan=-np.inf))
    picks = [int(rows[i]["slice"]) for i in order[:n_slices]]
    heat = seg = None
    if result.heatmap is not None:
        heat = case.reorientation.to_canonical(sitk.GetArrayFromImage(result.heatmap))
    if result.labelmap is not None:
        seg = case.reorientation.to_canonical(sitk.GetArrayFromImage(result.labelmap)) > 0
    fig = plt.figure(figsize=(4 * (len(picks) + 1.6), 4.4), facecolor="black")
    grid = fig.add_gridspec(1, len(picks) + 2)
    aspect = case.spacing[1] / case.spacing[0]
    vmax = np.percentile(flair[case.mask], 99.5) if case.mask.any() else flair.max()
    hmax = np.percentile(heat[heat > 0], 99.5) if heat is not None and (heat > 0).any() else 1.0
    # crop every panel to the brain's bounding box (with a margin) so small heads stay readable
    ys, xs = np.nonzero(case.mask.any(0)) if case.mask.any() else (np.arange(flair.shape[1]), np.arange(flair.shape[2]))
    m = 4
    crop = (
        slice(max(0, ys.min() - m), min(flair.shape[1], ys.max() + m + 1)),
        slice(max(0, xs.min() - m), min(flair.shape[2], xs.max() + m + 1)),
    )
    for j, k in enumerate(picks):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(flair[k][crop], cmap="gray", aspect=aspect, vmin=0, vmax=vmax)
        if heat is not None:
            h = np.ma.masked_less_equal(heat[k][crop], 0.15 * hmax)
            ax.imshow(h, cmap="inferno", aspect=aspect, alpha=0.55, vmin=0, vmax=hmax)
        if seg is not None and seg[k].any():
            ax.contour(seg[k][crop], levels=[0.5], colors="cyan", linewidths=1.2)
        r = next(r for r in rows if r["slice"] == k)
        ax.set_title(f"slice {k} (S {r['superior_mm']:.0f} mm)", color="white", fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, len(picks) :])
    ax.set_facecolor("black")
    ks = np.array([r["slice"] for r in rows])
    if np.isfinite(score).any():
        ax.plot(ks, score, color="orange", label="AnoDODE score (bpd)")
        thr = (result.summary.get("method_details", {}).get("dode") or {}).get("decision_threshold_bpd")
        if thr is not None:
            ax.axhline(thr, color="orange", linestyle=":", linewidth=1)
        ax.set_ylabel("bpd", color="orange")
        ax.tick_params(axis="y", colors="orange")
    if result.labelmap is not None:
        ax2 = ax.twinx() if np.isfinite(score).any() else ax
        ax2.fill_between(ks, area / 100.0, color="cyan", alpha=0.4, step="mid", label="AnoFPDM lesion area (cm²)")
        ax2.set_ylabel("lesion area (cm²)", color="cyan")
        ax2.tick_params(axis="y", colors="cyan")
    ax.set_xlabel("axial slice (inferior → superior)", color="white")
    ax.tick_params(axis="x", colors="white")
    ax.set_title("per-slice scores", color="white", fontsize=10)
    s = result.summary
    vol = s.get("lesion_volume_ml")
    title = f"{s['verdict']}" + (f", lesion {vol:.1f} mL" if vol else "") + f" — bundle {s['bundle']['name']}"
    fig.suptitle(title + " (FLAIR, heatmap, segmentation in cyan)", color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)
    return path
