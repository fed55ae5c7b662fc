#!/usr/bin/env python
"""How far a strided AnoFPDM cosine (eq. 18) is from the stride-1 one, per weighting of its terms.

Runs the model at stride 1 and at each ``--strides`` value (with both DDIM gap modes) on the same
phantom validation slices (half with lesions), and prints the max and mean |cos − cos_stride1| for
uniform, spacing (trapezoid, the library default) and left-Riemann weights, twice: for the strided
run's own MSE sequences (quadrature plus trajectory error) and for the stride-1 run's sequences taken
at the strided steps (quadrature error alone).

Measured on the shipped phantom-small bundle (12 slices, w 5, no clamp, CPU, 48 min for stride 1):
quadrature alone, max error stride 10 5.9e-3 (uniform) vs 5.2e-4 (spacing), stride 30 1.7e-2 vs
7.9e-3; strided runs, jump gap, stride 10 3.9e-2 vs 4.3e-2, stride 30 0.108 vs 0.110; extrapolate
gap, stride 10 2.0e-2 vs 2.5e-2, stride 30 6.6e-2 vs 6.9e-2.

  python benchmarks/fpdm_cosine_weights.py --slices 12 --out cosine_weights.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.bundle import open_bundle
from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.fpdm import _cosine, cosine_weights, forward_process, sequence_cosine
from AnomalyDiffusionLib.fpdm.model import fpdm_from_bundle


def errors(mse_h: np.ndarray, mse_u: np.ndarray, st, ref: np.ndarray) -> dict[str, list[float]]:
    """[max, mean] |cosine − ref| per weighting of the [N, K] sequences at ``st.visited``."""
    out = {}
    for wt in ("uniform", "spacing"):
        e = np.abs(sequence_cosine(mse_h, mse_u, replace(st, cosine_weighting=wt)) - ref)
        out[wt] = [float(e.max()), float(e.mean())]
    e = np.abs(_cosine(mse_h, mse_u, cosine_weights(st.visited, st.horizon, "left")) - ref)
    out["left"] = [float(e.max()), float(e.mean())]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the embedded one)")
    p.add_argument("--slices", type=int, default=12, help="validation slices, half with lesions (default 12)")
    p.add_argument("--strides", default="10,30", help="strides compared with stride 1 (default 10,30)")
    p.add_argument("--phantom", type=int, default=2, help="phantom validation subjects (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    b = open_bundle(args.bundle)
    unet, schedule, st, _ = fpdm_from_bundle(b, args.device)
    x, ds = load_or_make(None, "val", args.phantom, b.modalities, b.slice_size, 5000, max_slices=400, seed=0)
    lab = np.asarray(ds.labels).astype(bool)
    rng = np.random.default_rng(0)
    n = args.slices
    idx = np.r_[
        rng.choice(np.flatnonzero(lab), n // 2, replace=False),
        rng.choice(np.flatnonzero(~lab), n - n // 2, replace=False),
    ]
    x = torch.from_numpy(np.asarray(x)[idx])
    s1 = replace(st, stride=1, early_stop=False)
    t0 = time.perf_counter()
    r1 = forward_process(unet, x, s1, schedule, device=args.device)
    print(f"stride 1: {time.perf_counter() - t0:.0f} s for {len(x)} slices", flush=True)
    ref = sequence_cosine(r1.mse_h, r1.mse_u, s1)
    res: dict = {"slices": len(x), "settings": s1.calibration_dict(), "rows": []}
    for gap in ("jump", "extrapolate"):
        for stride in (int(s) for s in args.strides.split(",")):
            s = replace(s1, stride=stride, gap=gap)
            r = forward_process(unet, x, s, schedule, device=args.device)
            v = s.visited
            row = {
                "gap": gap,
                "stride": stride,
                "run": errors(r.mse_h, r.mse_u, s, ref),
                "quadrature_only": errors(r1.mse_h[:, v], r1.mse_u[:, v], s, ref),
            }
            res["rows"].append(row)
            for kind in ("run", "quadrature_only"):
                cells = "  ".join(f"{wt} {m:.2e}/{a:.2e}" for wt, (m, a) in row[kind].items())
                print(f"{gap:11s} stride {stride:3d} {kind:15s} max/mean |err|: {cells}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
