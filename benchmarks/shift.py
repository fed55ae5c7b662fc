"""Shift benchmark: the default pipeline on scans the bundle was not built on (issue 15).

Runs :func:`AnomalyDiffusionLib.pipeline.detect` (the code path of the CLI and the Slicer module) on

- the held-out synthetic family of ``benchmarks/shift_family.py`` (12 cases, 2 healthy; never used
  to train, calibrate or choose anything),
- the labelled real case ``../shared/data/TCGA-DU-7294`` (DICE against its fused-algorithm label),
- the unlabelled real case ``../shared/data/BraTS-GLI-00001-000`` (volume, slice range, figure),

and scores, per case: volume DICE, lesion-slice sensitivity, false-positive slices and volume,
AnoDODE slice AUROC (raw bpd and the case-normalised ``dode_z``) beside the brain-area and FLAIR-p99.9
references, and time. AnoFPDM's masks are scored for both calibrations (``bundle``: the papers'
dataset-level thresholds; ``volume``: the case's own slices, :mod:`AnomalyDiffusionLib.selfcal`),
which come from the same forward process; with a bundle that refines its segmentation
(:mod:`AnomalyDiffusionLib.refine`) also ``refined``, what ``detect`` writes: the default decision's
mask redrawn from the FLAIR near what AnoFPDM found, which is then the default output scored in the
aggregates, the figure and the card. Beside them, two **FLAIR-threshold references**
(:mod:`AnomalyDiffusionLib.flair_reference`): a rule fixed in advance (robust z > 2 in the brain) and
the threshold that maximises the family's mean DICE (optimistic: tuned on the very cases it is scored
on, as in Meissen et al.'s "simple baseline").

Writes ``results.json``, ``results.md`` and ``figure.png`` to ``--out``, and for a full run
``eval_metrics.json`` (the bundle card's figures: ``make_bundle.py --eval-metrics``). The real cases
are skipped with a message when ``--data`` is absent. ``--quick`` runs 3 family cases and the real ones.

    python benchmarks/shift.py --out runs/shift            # everything (~1 h on 2 CPU cores)
    python benchmarks/shift.py --quick --out runs/shift_quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shift_family import FAMILY, QUICK, write_family

from AnomalyDiffusionLib.bundle import open_bundle
from AnomalyDiffusionLib.flair_reference import FIXED_Z, flair_zscore, threshold_mask
from AnomalyDiffusionLib.metrics import image_level, slice_references, volume_level
from AnomalyDiffusionLib.options import DetectOptions
from AnomalyDiffusionLib.pipeline import detect, labelmap_from_model

log = logging.getLogger("shift")
ROOT = Path(__file__).resolve().parents[1]
REAL = {
    "TCGA-DU-7294": {
        "flair": "TCGA-DU-7294_fla.nii.gz",
        "t2": "TCGA-DU-7294_t2.nii.gz",
        "seg": "TCGA-DU-7294_seg.nii.gz",
    },
    "BraTS-GLI-00001-000": {"flair": "BraTS-GLI-00001-000-t2f.nii.gz", "t2": "BraTS-GLI-00001-000-t2w.nii.gz"},
}
TUNE_GRID = np.round(np.arange(1.0, 4.01, 0.1), 2)  # z thresholds tried for the tuned FLAIR reference


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        return None
    return round(image_level(y, scores).auroc, 4)


def _slices(mask: np.ndarray) -> list[int] | None:
    k = np.flatnonzero(mask.reshape(len(mask), -1).any(1))
    return [int(k.min()), int(k.max())] if len(k) else None


def run_case(name: str, paths: dict[str, Path], bundle, options: DetectOptions) -> dict:
    """detect on one case and every score of it (arrays kept under ``_arrays`` for the figure)."""
    t = time.perf_counter()
    res = detect({"flair": paths["flair"], "t2": paths["t2"]}, bundle, options)
    seconds = time.perf_counter() - t
    case = res.case
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    truth = None
    if "seg" in paths:
        t_img = sitk.ReadImage(str(paths["seg"]))
        truth = case.reorientation.to_canonical(sitk.GetArrayFromImage(t_img)) > 0
    rec: dict = {
        "case": name,
        "seconds": round(seconds, 1),
        "slices_analysed": len(res.indices),
        "truth_ml": None if truth is None else round(float(truth.sum()) * voxel_ml, 2),
        "truth_slices": None if truth is None else _slices(truth),
        "reliability": res.summary.get("reliability", {}).get("messages", []),
        "default_calibration": res.summary["method_details"].get("fpdm", {}).get("calibration_mode"),
    }
    arrays: dict = {"truth": truth, "flair": None, "masks": {}}
    # AnoFPDM, both calibrations from one forward process (the model's masks), and with a refining
    # bundle what detect wrote: the default decision redrawn from the FLAIR (AnomalyDiffusionLib.refine)
    decided = {
        mode: labelmap_from_model(case, mm, res.indices, res.fit)[1] > 0
        for mode, mm in res.extras.get("fpdm_model_masks", {}).items()
    }
    refinement = res.summary.get("refinement", {})
    rec["default_mode"] = rec["default_calibration"]
    if refinement.get("method", "none") != "none" and res.labelmap is not None:
        decided["refined"] = case.reorientation.to_canonical(sitk.GetArrayFromImage(res.labelmap)) > 0
        rec["default_mode"] = "refined"
        rec["refinement"] = refinement
    for mode, pred in decided.items():
        arrays["masks"][mode] = pred
        r = {"volume_ml": round(float(pred.sum()) * voxel_ml, 2), "slices": _slices(pred)}
        if truth is not None:
            r.update({k: round(v, 4) for k, v in volume_level(pred, truth, voxel_ml).items()})
            r["false_positive_slices"] = int(
                (pred.reshape(len(pred), -1).any(1) & ~truth.reshape(len(truth), -1).any(1)).sum()
            )
        rec[f"fpdm_{mode}"] = r
    # FLAIR-threshold reference: z map once, thresholds later (the tuned one needs all cases)
    flair = case.reorientation.to_canonical(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["flair"])))).astype(
        np.float32
    )
    arrays["flair"] = flair
    arrays["z"] = flair_zscore(flair, case.mask)
    arrays["brain"] = case.mask
    fixed = threshold_mask(arrays["z"], case.mask, FIXED_Z)
    arrays["masks"]["flair_fixed"] = fixed
    r = {"volume_ml": round(float(fixed.sum()) * voxel_ml, 2), "slices": _slices(fixed)}
    if truth is not None:
        r.update({k: round(v, 4) for k, v in volume_level(fixed, truth, voxel_ml).items()})
    rec["flair_fixed"] = r
    # AnoDODE slice scores against the references
    rows = res.rows
    if truth is not None and "dode_score" in rows[0]:
        labels = truth[res.indices].reshape(len(res.indices), -1).any(1)
        refs = slice_references(res.model_images[:, 0])
        rec["auroc"] = {
            "dode_bpd": _auroc(labels, np.array([r["dode_score"] for r in rows])),
            "dode_z": _auroc(labels, np.array([r["dode_z"] for r in rows])),
            "brain_area": _auroc(labels, refs["brain area"]),
            "flair_p99.9": _auroc(labels, refs["FLAIR p99.9"]),
        }
        rec["_slice_scores"] = {
            "labels": labels.tolist(),
            "dode_z": [r["dode_z"] for r in rows],
            "brain_area": refs["brain area"].tolist(),
            "flair_p99.9": refs["FLAIR p99.9"].tolist(),
        }
        rec["dode_fraction_flagged"] = round(float(np.mean([r["dode_anomalous"] for r in rows])), 3)
    rec["_arrays"] = arrays
    rec["_voxel_ml"] = voxel_ml
    return rec


def tune_flair(records: list[dict]) -> float:
    """The z threshold maximising the mean DICE over the labelled lesion cases given (optimistic)."""
    lesion = [r for r in records if r["_arrays"]["truth"] is not None and r["_arrays"]["truth"].any()]
    best, best_z = -1.0, FIXED_Z
    for z in TUNE_GRID:
        d = np.mean(
            [
                volume_level(
                    threshold_mask(r["_arrays"]["z"], r["_arrays"]["brain"], z), r["_arrays"]["truth"], r["_voxel_ml"]
                )["dice"]
                for r in lesion
            ]
        )
        if d > best:
            best, best_z = float(d), float(z)
    return best_z


def add_tuned(rec: dict, z: float) -> None:
    a = rec["_arrays"]
    m = threshold_mask(a["z"], a["brain"], z)
    a["masks"]["flair_tuned"] = m
    r = {"z": z, "volume_ml": round(float(m.sum()) * rec["_voxel_ml"], 2), "slices": _slices(m)}
    if a["truth"] is not None:
        r.update({k: round(v, 4) for k, v in volume_level(m, a["truth"], rec["_voxel_ml"]).items()})
    rec["flair_tuned"] = r


def aggregate(records: list[dict], modes: list[str]) -> dict:
    """Family means: DICE over lesion cases, the worst lesion case, healthy false-positive volume."""
    out: dict = {}
    lesion = [r for r in records if r["truth_ml"]]
    healthy = [r for r in records if r["truth_ml"] == 0]
    for key in [f"fpdm_{m}" for m in modes] + ["flair_fixed", "flair_tuned"]:
        d = [r[key]["dice"] for r in lesion if key in r]
        out[key] = {
            "mean_dice": round(float(np.mean(d)), 4) if d else None,
            "min_dice": round(float(np.min(d)), 4) if d else None,
            "mean_lesion_slice_sensitivity": round(
                float(np.nanmean([r[key]["lesion_slice_sensitivity"] for r in lesion if key in r])), 4
            )
            if d
            else None,
            "healthy_ml": [r[key]["volume_ml"] for r in healthy if key in r],
        }
    scored = [r for r in lesion if "_slice_scores" in r]
    if scored:
        pooled = {
            k: np.concatenate([np.asarray(r["_slice_scores"][k], float) for r in scored])
            for k in ("labels", "dode_z", "brain_area", "flair_p99.9")
        }
        out["auroc_pooled"] = {k: _auroc(pooled["labels"], pooled[k]) for k in ("dode_z", "brain_area", "flair_p99.9")}
        out["auroc_mean_per_case"] = {
            k: round(float(np.mean([r["auroc"][k] for r in scored if r["auroc"][k] is not None])), 4)
            for k in ("dode_bpd", "dode_z", "brain_area", "flair_p99.9")
        }
    out["mean_seconds"] = round(float(np.mean([r["seconds"] for r in records])), 1)
    return out


def describe_mode(results: dict) -> str:
    """The default output in words: the decision, and the refinement when the bundle refines."""
    if results["default_mode"] == "refined":
        return f"{results['default_calibration']} decision refined to the FLAIR (detect's output)"
    return f"{results['default_calibration']} decision"


def eval_metrics(results: dict) -> dict:
    """The card's ``eval_metrics`` entries (``{value, data, command}``) of a full run: the held-out
    family's AnoFPDM figures under the default decision, each beside its FLAIR-threshold reference,
    and the real cases (``make_bundle.py --eval-metrics``)."""
    mode = results["default_mode"]
    fam = results["family"]
    key = f"fpdm_{mode}"
    if key not in fam or fam[key]["mean_dice"] is None:
        return {}
    cmd = results["command"]
    ref, tuned = fam["flair_fixed"], fam["flair_tuned"]
    n = sum(1 for c in results["cases"] if c["case"].startswith("shift-") and c["truth_ml"])
    what = describe_mode(results)
    held_out = f"held-out shift family, {n} lesion cases (never used to choose anything), {what}"
    out = {
        "shift_family_mean_dice": {
            "value": fam[key]["mean_dice"],
            "data": f"{held_out}; FLAIR-threshold reference {ref['mean_dice']} fixed / {tuned['mean_dice']} tuned",
            "command": cmd,
        },
        "shift_family_worst_dice": {
            "value": fam[key]["min_dice"],
            "data": f"{held_out}; FLAIR-threshold reference {ref['min_dice']} fixed / {tuned['min_dice']} tuned",
            "command": cmd,
        },
        "shift_family_healthy_ml": {
            "value": fam[key]["healthy_ml"],
            "data": "held-out shift family, healthy cases: segmented volume (mL)",
            "command": cmd,
        },
    }
    for c in results["cases"]:
        if c["case"] == "TCGA-DU-7294" and key in c and "dice" in c[key]:
            out["tcga_du_7294_dice"] = {
                "value": c[key]["dice"],
                "data": f"TCGA-DU-7294 (real glioma, fused-algorithm label), {what}; FLAIR-threshold "
                f"reference {c['flair_fixed']['dice']} fixed / {c['flair_tuned']['dice']} tuned",
                "command": cmd,
            }
    return out


def figure(records: list[dict], path: Path) -> None:
    """One row per case: FLAIR at the slice of largest truth (else largest default-mode) area, with the
    truth (yellow), the default AnoFPDM mask (cyan) and the fixed FLAIR reference (magenta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(records)
    cols = 4
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, rec in zip(axes.ravel(), records, strict=False):
        a = rec["_arrays"]
        mode = rec.get("default_mode") or rec["default_calibration"] or "bundle"
        pred = a["masks"].get(mode)
        ref = a["truth"] if a["truth"] is not None and a["truth"].any() else pred
        if ref is None or not ref.any():
            k = len(a["flair"]) // 2
        else:
            k = int(np.argmax(ref.reshape(len(ref), -1).sum(1)))
        ax.imshow(a["flair"][k], cmap="gray", origin="upper")
        for m, colour in ((a["truth"], "yellow"), (pred, "cyan"), (a["masks"].get("flair_fixed"), "magenta")):
            if m is not None and m[k].any():
                ax.contour(m[k], [0.5], colors=colour, linewidths=0.7)
        d = rec.get(f"fpdm_{mode}", {}).get("dice")
        title = f"{rec['case']} (slice {k})"
        if d is not None:
            title += f"\nDICE {d:.2f}, FLAIR ref {rec['flair_fixed'].get('dice', float('nan')):.2f}"
        else:
            title += f"\n{rec.get(f'fpdm_{mode}', {}).get('volume_ml', 0):.1f} mL segmented"
        ax.set_title(title, fontsize=8)
    fig.suptitle("yellow: truth, cyan: AnoFPDM (detect's default output), magenta: FLAIR z > 2", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(results: dict) -> str:
    """results.md: settings, the per-case table, family aggregates, warnings."""
    modes = results["modes"]
    default = results["default_mode"]
    b = results["bundle"]
    head = ["case", "grid", "lesion", "truth mL", *[f"AnoFPDM {m}" for m in modes], "FLAIR fixed", "FLAIR tuned"]
    head += ["lesion-slice sens.", "FP slices", "AnoDODE AUROC z / bpd", "brain area", "FLAIR p99.9", "s"]
    lines = [
        "# Shift benchmark",
        "",
        f"Bundle `{b['name']}` {b.get('version', '')} (sha256 {b['sha256'][:12]}), default output: "
        f"{describe_mode(results)}.",
        f"Command: `{results['command']}`",
        "",
        "Held-out synthetic family (never used for training, calibration or settings) and the real cases.",
        "Labelled cases: volume DICE; healthy and unlabelled cases: segmented volume (mL). FLAIR references:",
        f"robust z in the brain above {results['flair_fixed_z']} (fixed) or above {results['flair_tuned_z']} (tuned",
        "on the family's lesion cases: optimistic). Lesion-slice sensitivity and false-positive slices are",
        f"for AnoFPDM's default output (`{default}`). `refined`: what detect writes, the default decision's",
        "mask redrawn from the FLAIR at the input's resolution near what AnoFPDM found.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    spec = {c.name: c for c in FAMILY}

    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    def cell(r: dict, key: str) -> str:
        v = r.get(key)
        if v is None:
            return "–"
        return f"{v['dice']:.2f}" if r["truth_ml"] else f"{v['volume_ml']:.1f} mL"

    for r in results["cases"]:
        s = spec.get(r["case"])
        grid = "real" if s is None else (s.grid if s.grid == "brats" else f"clinical {s.slice_mm:g} mm")
        d = r.get(f"fpdm_{default}", {})
        au = r.get("auroc", {})
        truth = "no label" if r["truth_ml"] is None else f"{r['truth_ml']:.1f}"
        cells = [r["case"], grid, "" if s is None else s.lesions, truth]
        cells += [cell(r, k) for k in [*[f"fpdm_{m}" for m in modes], "flair_fixed", "flair_tuned"]]
        cells += [num(d.get("lesion_slice_sensitivity")), str(d.get("false_positive_slices", "–"))]
        cells += [f"{num(au.get('dode_z'))} / {num(au.get('dode_bpd'))}", num(au.get("brain_area"))]
        cells += [num(au.get("flair_p99.9")), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    agg = results["family"]
    lines += ["", "Family aggregates (lesion cases; healthy cases' segmented volume):", ""]
    lines.append("| | mean DICE | worst DICE | mean lesion-slice sensitivity | healthy mL |")
    lines.append("|---|---|---|---|---|")
    for key, v in agg.items():
        if isinstance(v, dict) and "mean_dice" in v:
            healthy = ", ".join(str(x) for x in v["healthy_ml"])
            lines.append(
                f"| {key} | {v['mean_dice']} | {v['min_dice']} | {v['mean_lesion_slice_sensitivity']} | {healthy} |"
            )
    if "auroc_pooled" in agg:
        pooled = agg["auroc_pooled"]
        per_case = ", ".join(f"{k} {v}" for k, v in agg["auroc_mean_per_case"].items())
        lines += [
            "",
            f"AnoDODE slice AUROC on the family's lesion cases: pooled dode_z {pooled['dode_z']} vs brain area "
            f"{pooled['brain_area']} and FLAIR p99.9 {pooled['flair_p99.9']}; mean per case: {per_case}.",
        ]
    lines += ["", f"Mean time per case: {agg['mean_seconds']} s.", ""]
    for r in results["cases"]:
        if r["reliability"]:
            lines.append(f"- {r['case']} reliability: " + "; ".join(r["reliability"]))
    for s in results.get("skipped", []):
        lines.append(f"- skipped: {s}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/shift"), help="output folder (default runs/shift)")
    p.add_argument("--bundle", default=None, help="bundle folder or zip (default: the embedded bundle)")
    p.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="real cases (default ../shared/data)"
    )
    p.add_argument(
        "--family-dir", type=Path, default=None, help="where the family's NIfTI files are cached (default OUT/family)"
    )
    p.add_argument("--quick", action="store_true", help=f"family subset {', '.join(QUICK)} and the real cases")
    p.add_argument("--cases", default=None, help="comma-separated case names to run (default: all)")
    p.add_argument(
        "--methods", default=None, help="methods to run (default: all of the bundle's, to score AnoDODE too)"
    )
    p.add_argument("--dode-probes", type=int, default=None, help="AnoDODE probes per slice (default: the bundle's)")
    p.add_argument(
        "--calibration", choices=("bundle", "volume"), default=None, help="default decision (default: the bundle's)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = open_bundle(args.bundle)
    methods = tuple(args.methods.split(",")) if args.methods else tuple(bundle.methods)
    options = DetectOptions(methods=methods, calibration=args.calibration, dode_probes=args.dode_probes)
    names = QUICK if args.quick else tuple(c.name for c in FAMILY)
    chosen = set(args.cases.split(",")) if args.cases else None
    if chosen:
        names = tuple(n for n in names if n in chosen)
    family_dir = args.family_dir or args.out / "family"
    print(f"synthesising {len(names)} held-out cases in {family_dir} (cached)", flush=True)
    family = write_family(family_dir, names)
    jobs = list(family.items())
    skipped = []
    for case, files in REAL.items():
        if chosen and case not in chosen:
            continue
        folder = args.data / case
        if not all((folder / f).is_file() for f in files.values()):
            msg = f"{case}: {folder} not found (the real cases live in ../shared/data)"
            print(f"skipped {msg}", flush=True)
            skipped.append(msg)
            continue
        jobs.append((case, {k: folder / f for k, f in files.items()}))
    records = []
    for i, (name, paths) in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}] {name}", flush=True)
        rec = run_case(name, paths, bundle, options)
        records.append(rec)
        d = {k: rec[k].get("dice", rec[k]["volume_ml"]) for k in rec if k.startswith(("fpdm_", "flair_"))}
        print(f"    {d} auroc {rec.get('auroc')} {rec['seconds']:.0f} s", flush=True)
    fam = [r for r in records if r["case"] in family]
    z = tune_flair(fam) if fam else FIXED_Z
    for r in records:
        add_tuned(r, z)
    modes = sorted({k[5:] for r in records for k in r if k.startswith("fpdm_")})
    default = records[0]["default_calibration"] if records else None
    default_mode = records[0]["default_mode"] if records else None
    results = {
        "command": "python " + " ".join(["benchmarks/shift.py", *(argv if argv is not None else sys.argv[1:])]),
        "bundle": {"name": bundle.name, "sha256": bundle.sha256, "version": bundle.manifest.get("version", "")},
        "default_calibration": default,
        "default_mode": default_mode,
        "modes": modes,
        "flair_fixed_z": FIXED_Z,
        "flair_tuned_z": z,
        "family": aggregate(fam, modes),
        "cases": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records],
        "skipped": skipped,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.quick and not chosen:  # the card's figures come from the whole benchmark only
        (args.out / "eval_metrics.json").write_text(json.dumps(eval_metrics(results), indent=1))
    (args.out / "results.md").write_text(markdown(results))
    figure(records, args.out / "figure.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
