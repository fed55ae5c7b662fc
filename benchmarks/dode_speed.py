#!/usr/bin/env python
"""AnoDODE likelihood speed: per-sample scipy RK45 (the paper's procedure) vs one batched torch solve.

Same trained model, same slices, same standardised features and the same Hutchinson probe vectors,
in one run; only the integration differs. The baseline runs at ``--rtol`` (rtol = atol = 1e-5, the
paper's); the batched solve runs at that tolerance and at each of ``--batched-rtol`` (e.g. the looser
1e-4 a product would use), each checked against the baseline. Prints both times, the ratio, the
score-network evaluations (NFE) of each, the largest |Δ bpd| over slices and scales, and the AUROC
of each when the slices carry labels.

  python benchmarks/dode_speed.py --model Resources/Bundles/phantom-small --slices 32 --batched-rtol 1e-4,1e-3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.devices import resolve_device, tune_cpu_allocator
from AnomalyDiffusionLib.dode.model import load_dode, score_features, standardised_features


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="trained AnoDODE folder (train_dode.py --out) or a bundle")
    p.add_argument("--phantom", type=int, default=1, help="synthetic test subjects (default 1)")
    p.add_argument("--phantom-seed", type=int, default=9000)
    p.add_argument("--slices", type=int, default=32, help="slices scored by both solvers (default 32)")
    p.add_argument("--scales", default=None, help="comma-separated subset of the model's scales")
    p.add_argument("--rtol", type=float, default=1e-5, help="rtol = atol of both solvers (default 1e-5)")
    p.add_argument(
        "--batched-rtol",
        default="",
        help="comma-separated extra tolerances for the batched solve alone, each compared with the baseline",
    )
    p.add_argument("--seed", type=int, default=0, help="probe seed")
    p.add_argument(
        "--probes",
        type=int,
        default=1,
        help="Hutchinson probes averaged per slice in every run (default 1, the paper's; bundles use more)",
    )
    p.add_argument("--device", default="auto", help="device of the batched solve (the baseline runs on CPU)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    scales = [int(s) for s in args.scales.split(",")] if args.scales else None
    model = load_dode(args.model, scales=scales)
    x, ds = load_or_make(
        None, "test", args.phantom, ("flair",), model.input_size, args.phantom_seed, max_slices=args.slices
    )
    z = standardised_features(model, x)
    labels = np.asarray(ds.labels)
    has_labels = 0 < labels.sum() < len(labels)
    extra = [float(r) for r in args.batched_rtol.split(",") if r.strip()]
    dev = str(resolve_device(args.device))
    jobs = [("scipy", "cpu", args.rtol), ("torch", dev, args.rtol), *(("torch", dev, r) for r in extra)]
    runs = []
    for solver, device, rtol in jobs:
        m = load_dode(args.model, scales=scales, device=device)
        zz = [f.to(device) for f in z]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        per, score, nfe = score_features(
            m, zz, solver=solver, seed=args.seed, rtol=rtol, atol=rtol, batch_size=len(x), n_probes=args.probes
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0, per, score, nfe))
        print(f"{solver} rtol {rtol:g} on {device}: {runs[-1][0]:.1f} s", flush=True)
    t_b, per_b, s_b, nfe_b = runs[0]
    res = {
        "slices": len(x),
        "scales": model.scales,
        "rtol": args.rtol,
        "probes": args.probes,
        "threads": torch.get_num_threads(),
        "device_batched": dev,
        "baseline_scipy_s": round(t_b, 2),
        "network_calls_scipy": nfe_b,
        "nfe_scipy_mean_per_sample_and_scale": round(nfe_b / (len(x) * len(model.scales)), 1),
    }
    if has_labels:
        from sklearn.metrics import roc_auc_score

        res["auroc_scipy"] = round(float(roc_auc_score(labels, s_b)), 4)
    for (_, _, rtol), (t_o, per_o, s_o, nfe_o) in zip(jobs[1:], runs[1:], strict=True):
        tag = "" if rtol == args.rtol else f"_rtol_{rtol:g}"
        res[f"ours_torch_s{tag}"] = round(t_o, 2)
        res[f"ratio{tag}"] = round(t_b / t_o, 2)
        res[f"network_calls_torch{tag}"] = nfe_o
        res[f"nfe_torch{tag}"] = nfe_o // len(model.scales)
        res[f"max_abs_bpd_difference{tag}"] = float(np.abs(per_b - per_o).max())
        res[f"max_abs_score_difference{tag}"] = float(np.abs(s_b - s_o).max())
        if has_labels:
            res[f"auroc_torch{tag}"] = round(float(roc_auc_score(labels, s_o)), 4)
    for k, v in res.items():
        print(f"{k:26s} {v}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
