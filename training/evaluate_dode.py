#!/usr/bin/env python
"""Evaluate AnoDODE slice scoring (Table 1 and 2 formats) and localisation (Fig. 5).

Scores S = mean bpd over scales (eq. 13) for every test slice, then:
- Table 1: AUROC, best F1 and the accuracy at that threshold;
- Table 2: the same for every non-empty subset of the trained scales;
- Fig. 4: ROC curve and score distributions of healthy vs anomalous slices;
- Fig. 5: localisation grid over t0 ∈ {0.1, 0.3, 0.5, 0.7, 0.9}, if a decoder was trained.

The decision threshold (best F1) is written to dode_threshold.json in the model folder when the
evaluated split is a validation split (--split val); on test it is only reported.

Examples:
  python training/evaluate_dode.py --model runs/dode --bmad /data/BMAD/BraTS2021 --out runs/dode/eval
  python training/evaluate_dode.py --model runs/dode_small --phantom 4 --split val --out runs/dode_small/val
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.bundle import is_bundle
from AnomalyDiffusionLib.cli_support import add_slice_range_argument, parse_slice_range
from AnomalyDiffusionLib.datasets import load_or_make, read_bmad
from AnomalyDiffusionLib.devices import tune_cpu_allocator
from AnomalyDiffusionLib.dode.evaluate import score_case
from AnomalyDiffusionLib.dode.model import load_decoder, load_dode, score_slices
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.metrics import image_level, slice_references


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        description=doc[0], epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="AnoDODE model folder")
    src = p.add_argument_group("data (one of)")
    src.add_argument("--data", type=Path, help="slice dataset folder")
    src.add_argument("--bmad", type=Path, help="BMAD BraTS2021 folder (train/good, test/good, test/Ungood)")
    src.add_argument("--phantom", type=int, metavar="N", help="N synthetic subjects")
    p.add_argument("--split", default="test", help="split to evaluate (default test; val stores the threshold)")
    p.add_argument("--phantom-seed", type=int, default=9000)
    p.add_argument(
        "--slice-size", type=int, default=None, help="grey slice size (default: the model's, else its largest scale)"
    )
    p.add_argument("--max-slices", type=int, default=None)
    add_slice_range_argument(p)
    p.add_argument("--solver", choices=("torch", "scipy"), default="torch")
    p.add_argument("--probe", choices=("rademacher", "gaussian", "exact"), default="rademacher")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes averaged per slice (default 1)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--t0", default="0.1,0.3,0.5,0.7,0.9", help="localisation grid noise levels")
    p.add_argument(
        "--real-case",
        type=Path,
        default=None,
        help="also score a real case folder (e.g. ../shared/data/TCGA-DU-7294: *_fla.nii.gz + *_seg.nii.gz)",
    )
    p.add_argument(
        "--decoder",
        type=Path,
        default=None,
        help="folder with dode_decoder_<scale>.safetensors (train_decoder.py --out; default: the model folder)",
    )
    p.add_argument("--loc-slices", type=int, default=8, help="lesion slices for the localisation figures (default 8)")
    p.add_argument("--pc-steps", type=int, default=500, help="PC sampler steps over [ε, 1] (paper N = 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    return p


def _score_options(args) -> dict:
    """The command line's solver settings, as keyword arguments of ``score_slices``."""
    return {
        "solver": args.solver,
        "probe": args.probe,
        "seed": args.seed,
        "rtol": args.rtol,
        "atol": args.rtol,
        "n_probes": args.probes,
    }


def _score(model, x, args) -> tuple[np.ndarray, np.ndarray]:
    """bpd per scale and the eq. 13 score of slices ``x`` with the command line's solver settings."""
    return score_slices(model, x, **_score_options(args))


def load_slices(args, size: int):
    if sum(v is not None for v in (args.data, args.bmad, args.phantom)) != 1:
        raise AnomalyDiffusionError("give exactly one of --data, --bmad or --phantom")
    start, stop = parse_slice_range(args.slices)
    if args.bmad is not None:
        if args.slices:
            raise AnomalyDiffusionError("--slices does not apply to --bmad: its PNGs are already axial slices 60-100")
        ds = read_bmad(args.bmad, args.split, size=size)
        if args.max_slices and len(ds) > args.max_slices:
            ds = ds.select(np.sort(np.random.default_rng(args.seed).choice(len(ds), args.max_slices, replace=False)))
        return np.asarray(ds.images, np.float32), ds
    return load_or_make(
        args.data,
        args.split,
        args.phantom,
        ("flair",),
        size,
        args.phantom_seed,
        max_slices=args.max_slices,
        seed=args.seed,
        start=start,
        stop=stop,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_dode(args.model)
        args.slice_size = args.slice_size or model.input_size
        x, ds = load_slices(args, args.slice_size)
        labels = np.asarray(ds.labels).astype(int)
        t0 = time.perf_counter()
        per_scale, score = _score(model, x, args)
        secs = time.perf_counter() - t0
        table1 = image_level(labels, score)
        ablation = []
        for r in range(1, len(model.scales) + 1):
            for combo in itertools.combinations(range(len(model.scales)), r):
                res = image_level(labels, per_scale[:, list(combo)].mean(1))
                ablation.append({"scales": [model.scales[i] for i in combo], **res.as_dict()})
    except (AnomalyDiffusionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "slices": len(labels),
        "anomalous": int(labels.sum()),
        "axial_range": args.slices,
        "scales": model.scales,
        "encoder": model.spec.as_dict(),
        "solver": args.solver,
        "seconds": round(secs, 1),
        "table1": table1.as_dict(),
        "table2": ablation,
        # what trivial scores reach on the same slices: a likelihood that does not beat them has
        # found the slice position or the intensity, not the lesion
        "references": {name: image_level(labels, s).auroc for name, s in slice_references(x).items()},
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    lines = ["| Scales | AUROC | best F1 | ACC |", "|---|---|---|---|"]
    for row in ablation:
        scales = ",".join(map(str, row["scales"]))
        lines.append(f"| {scales} | {row['auroc']:.3f} | {row['best_f1']:.3f} | {row['accuracy']:.3f} |")
    for name, auroc in report["references"].items():
        lines.append(f"| reference: {name} | {auroc:.3f} | | |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    if args.real_case is not None:
        try:
            real = score_case(model, args.real_case, args.slice_size, **_score_options(args))
        except AnomalyDiffusionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report["real_case"] = {k: v for k, v in real.items() if k != "per_slice"}
        (args.out / "real_case.json").write_text(json.dumps(real, indent=1))
        (args.out / "results.json").write_text(json.dumps(report, indent=1))
        print(
            f"real case {real['case']}: mean S lesion slices {real['mean_score_lesion']:.3f} vs other "
            f"{real['mean_score_other']:.3f} bpd, AUROC {real.get('auroc', float('nan')):.3f}"
        )
    if args.split == "val":
        # beside a training run (make_bundle.py reads it there); a bundle's folder is never written to
        (args.out if is_bundle(args.model) else args.model).joinpath("dode_threshold.json").write_text(
            json.dumps(
                {
                    "threshold": table1.threshold,
                    "best_f1": table1.best_f1,
                    "scales": model.scales,
                    "source": f"{args.split} split, {len(labels)} slices"
                    + (f" (axial {args.slices})" if args.slices else ""),
                },
                indent=1,
            )
        )
    _figures(args, x, labels, score)
    loc = _localisation(args, model, x, labels, ds)
    if loc is not None:
        report["localisation"] = loc
        (args.out / "results.json").write_text(json.dumps(report, indent=1))
        lines += ["", "| t0 | pixel AUROC | pixel AUPRC |", "|---|---|---|"]
        lines += [f"| {r['t0']:g} | {r['auroc']:.3f} | {r['auprc']:.3f} |" for r in loc["t0"]]
        lines.append(f"| FLAIR intensity | {loc['intensity']['auroc']:.3f} | {loc['intensity']['auprc']:.3f} |")
        (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(
        f"AUROC {table1.auroc:.3f}, best F1 {table1.best_f1:.3f}, ACC {table1.accuracy:.3f} "
        f"(threshold {table1.threshold:.4f} bpd) on {len(labels)} slices in {secs:.0f} s"
    )
    print("\n".join(lines))
    return 0


def _figures(args, x, labels, score) -> None:
    """Fig. 4: the ROC curve and the score distributions of healthy and anomalous slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, score)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(fpr, tpr)
    ax[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    ax[0].set_xlabel("false positive rate")
    ax[0].set_ylabel("true positive rate")
    ax[0].set_title("ROC")
    for val, name in ((0, "healthy"), (1, "anomalous")):
        ax[1].hist(score[labels == val], bins=30, alpha=0.6, label=name)
    ax[1].set_xlabel("anomaly score S (bpd)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(args.out / "roc_scores.png", dpi=90)
    plt.close(fig)


def _pixel_scores(heat: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> dict:
    """Pixel-level AUROC and AUPRC of a heatmap over brain pixels (the reference's foreground)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, s = truth[brain].astype(int), heat[brain]
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s))}


def _localisation(args, model, x, labels, ds) -> dict | None:
    """Section 4.3 / Fig. 5: reconstruction heatmaps over the t0 grid on the first lesion slices, their
    pixel-level AUROC/AUPRC against the masks (brain pixels), and the FLAIR intensity as a reference."""
    folder = args.decoder or args.model
    found = sorted(int(p.stem.rsplit("_", 1)[1]) for p in Path(folder).glob("dode_decoder_*.safetensors"))
    usable = [s for s in found if s in model.scales]
    if not usable:
        if args.decoder is not None:
            raise SystemExit(f"error: no dode_decoder_<scale>.safetensors for scales {model.scales} in '{folder}'")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from AnomalyDiffusionLib.dode.localise import localise
    from AnomalyDiffusionLib.dode.sde import VPSDE

    scale = max(usable)
    dec = load_decoder(folder, scale)
    k = model.scales.index(scale)
    net = model.nets[k]
    net.sde = VPSDE(net.sde.beta_min, net.sde.beta_max, N=args.pc_steps)
    masks = np.asarray(ds.masks).astype(bool)
    idx = np.flatnonzero((labels == 1) & masks.reshape(len(masks), -1).any(1))[: args.loc_slices]
    if len(idx) == 0:
        return None
    brain = x[idx, 0] > -0.95
    t0s = [float(t) for t in args.t0.split(",")]
    heats, rows = [], []
    for t0 in t0s:
        heat, _ = localise(
            model.encoder,
            scale,
            net,
            model.standardisers[k],
            dec,
            x[idx],
            t0=t0,
            generator=torch.Generator().manual_seed(args.seed),
        )
        heat = heat * brain
        heats.append(heat)
        rows.append({"t0": t0, **_pixel_scores(heat, masks[idx], brain)})
        print(f"localisation t0 = {t0:g}: pixel AUROC {rows[-1]['auroc']:.3f}, AUPRC {rows[-1]['auprc']:.3f}")
    show = idx[:4]
    fig, axes = plt.subplots(len(show), len(t0s) + 2, figsize=(2 * (len(t0s) + 2), 2 * len(show)), squeeze=False)
    for r, i in enumerate(show):
        axes[r, 0].imshow(x[i, 0], cmap="gray")
        axes[r, 1].imshow(masks[i], cmap="gray")
        if r == 0:
            axes[r, 0].set_title("FLAIR")
            axes[r, 1].set_title("mask")
        for c, t0 in enumerate(t0s):
            axes[r, c + 2].imshow(heats[c][r], cmap="inferno")
            if r == 0:
                axes[r, c + 2].set_title(f"t0 = {t0}")
    for a in axes.ravel():
        a.axis("off")
    fig.tight_layout()
    fig.savefig(args.out / "localisation_t0.png", dpi=80)
    plt.close(fig)
    return {
        "scale": scale,
        "slices": len(idx),
        "pc_steps": args.pc_steps,
        "t0": rows,
        "intensity": _pixel_scores(x[idx, 0], masks[idx], brain),
    }


if __name__ == "__main__":
    sys.exit(main())
