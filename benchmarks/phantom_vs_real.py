#!/usr/bin/env python
"""Figure: synthetic phantom slices beside the real glioma case, for a side-by-side look.

Rows: the real case (../shared/data/TCGA-DU-7294) and phantom subjects on a BraTS-like grid; columns:
FLAIR, T2, T1, T1ce, labels, each at the slice with the largest lesion area. Writes a PNG (default
out/phantom_vs_real.png). The real data are only read, never copied.

  python benchmarks/phantom_vs_real.py --seeds 3 7 --out out/phantom_vs_real.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk

from AnomalyDiffusionLib.devices import tune_cpu_allocator
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject
from AnomalyDiffusionLib.volumes import to_canonical

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "TCGA-DU-7294"
FILES = {"flair": "fla", "t2": "t2", "t1": "t1", "t1ce": "t1c", "seg": "seg"}


def canonical(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(to_canonical(sitk.Cast(img, sitk.sitkFloat32))[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 7])
    p.add_argument("--real", type=Path, default=REAL)
    p.add_argument("--out", type=Path, default=Path("out/phantom_vs_real.png"))
    args = p.parse_args()
    tune_cpu_allocator()
    rows = []
    if (args.real / "TCGA-DU-7294_fla.nii.gz").is_file():
        rows.append(
            (
                "real TCGA-DU-7294",
                {k: canonical(sitk.ReadImage(str(args.real / f"TCGA-DU-7294_{f}.nii.gz"))) for k, f in FILES.items()},
            )
        )
    for seed in args.seeds:
        ph = make_subject(seed, PhantomOptions(brats_grid=True))
        vols = {k: canonical(ph.images[k]) for k in ("flair", "t2", "t1", "t1ce")}
        vols["seg"] = canonical(ph.labels)
        rows.append((f"phantom seed {seed}", vols))
    fig, axes = plt.subplots(len(rows), 5, figsize=(15, 3.2 * len(rows)), facecolor="black", squeeze=False)
    for r, (name, vols) in enumerate(rows):
        k = int(np.argmax((vols["seg"] > 0).sum((1, 2))))
        for c, key in enumerate(FILES):
            v = vols[key]
            vmax = 4 if key == "seg" else np.percentile(v[v > 0], 99.5)
            axes[r, c].imshow(v[k], cmap="gray", vmin=0, vmax=vmax)
            axes[r, c].axis("off")
            if c == 0:
                axes[r, c].set_title(f"{name}, slice {k}", color="white", fontsize=9, loc="left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=70, facecolor="black")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
