#!/usr/bin/env python
"""AnoDODE likelihood speed: per-sample scipy RK45 (the paper's procedure) vs one batched torch solve.

Same trained model, same slices, same probes and tolerances (rtol = atol = 1e-5 by default), one run.
Prints both times, the ratio and the agreement: the largest |Δ bpd| over slices and scales, and the
AUROC of each when labels are available.

  python benchmarks/dode_likelihood_speed.py --model runs/dode_small --phantom 1 --slices 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.devices import tune_cpu_allocator
from AnomalyDiffusionLib.dode.model import load_dode, score_slices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--phantom", type=int, default=1)
    p.add_argument("--phantom-seed", type=int, default=9000)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    tune_cpu_allocator()
    model = load_dode(args.model)
    x, ds = load_or_make(None, "test", args.phantom, ("flair",), 128, args.phantom_seed, max_slices=args.slices)
    runs = {}
    for solver in ("scipy", "torch"):
        t0 = time.perf_counter()
        per, score = score_slices(model, x, solver=solver, rtol=args.rtol, atol=args.rtol, batch_size=len(x))
        runs[solver] = (time.perf_counter() - t0, per, score)
    (t_b, per_b, s_b), (t_o, per_o, s_o) = runs["scipy"], runs["torch"]
    res = {
        "slices": len(x),
        "scales": model.scales,
        "rtol": args.rtol,
        "threads": torch.get_num_threads(),
        "baseline_scipy_s": round(t_b, 2),
        "ours_torch_s": round(t_o, 2),
        "ratio": round(t_b / t_o, 2),
        "max_abs_bpd_difference": float(np.abs(per_b - per_o).max()),
        "max_abs_score_difference": float(np.abs(s_b - s_o).max()),
    }
    labels = np.asarray(ds.labels)
    if 0 < labels.sum() < len(labels):
        from sklearn.metrics import roc_auc_score

        res["auroc_scipy"] = round(float(roc_auc_score(labels, s_b)), 4)
        res["auroc_torch"] = round(float(roc_auc_score(labels, s_o)), 4)
    for k, v in res.items():
        print(f"{k:26s} {v}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
