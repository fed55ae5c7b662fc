#!/usr/bin/env python
"""Density-free references for AnoDODE: how well do the encoder's features alone separate slices?

Fits simple models on the standardised features of healthy training slices and scores test slices:
a diagonal Gaussian per (channel, position), the mean distance to the k nearest training slices, and
a PCA model (Mahalanobis distance in the top components, squared residual outside them). Prints the
AUROC of each per scale. A trained AnoDODE score model far below these numbers is limited by its
likelihood, not by the encoder.

Example:
  python benchmarks/dode_feature_baselines.py --stages 6 --scales 256,128
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from AnomalyDiffusionLib.cli_support import add_slice_range_argument, parse_slice_range
from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.devices import tune_cpu_allocator
from AnomalyDiffusionLib.dode.features import DEFAULT_ENCODER, EncoderSpec, Standardiser, build_encoder, extract


def scores(train: torch.Tensor, test: torch.Tensor, k: int, components: int) -> dict[str, np.ndarray]:
    """Anomaly scores of ``test`` [M, C, h, w] under models fitted on standardised ``train`` [N, C, h, w]."""
    std = Standardiser.fit(train)
    a, b = std(train).double(), std(test).double()
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-3)
    out = {"diagonal Gaussian": (0.5 * ((b - mu) / sd) ** 2 + sd.log()).flatten(1).sum(1).numpy()}
    fa, fb = a.flatten(1), b.flatten(1)
    out[f"kNN (k = {k})"] = torch.cdist(fb, fa).topk(k, largest=False).values.mean(1).numpy()
    centre = fa.mean(0)
    _, s, v = torch.pca_lowrank(fa - centre, q=min(components, len(fa) - 1), center=False)
    proj = (fb - centre) @ v
    out["PCA Mahalanobis"] = (proj**2 / (s**2 / (len(fa) - 1))).sum(1).numpy()
    out["PCA residual"] = ((fb - centre) - proj @ v.T).pow(2).sum(1).numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    p.add_argument("--stages", type=int, default=6, help="blocks kept (default 6: the stride-32 stage)")
    p.add_argument("--scales", default="256,128")
    p.add_argument("--random-encoder", action="store_true", help="randomly initialised encoder (seeded)")
    p.add_argument("--train-phantom", type=int, default=12, help="training subjects (default 12, seed 2000)")
    p.add_argument("--test-phantom", type=int, default=4, help="test subjects (default 4, seed 9000)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--components", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    add_slice_range_argument(p)
    args = p.parse_args(argv)
    tune_cpu_allocator()
    scales = tuple(int(s) for s in args.scales.split(","))
    start, stop = parse_slice_range(args.slices)
    xtr, dtr = load_or_make(None, "train", args.train_phantom, ("flair",), 128, 2000, start=start, stop=stop)
    xte, dte = load_or_make(None, "test", args.test_phantom, ("flair",), 128, 9000, start=start, stop=stop)
    healthy = np.asarray(dtr.labels) == 0
    y = np.asarray(dte.labels).astype(bool)
    torch.manual_seed(args.seed)
    spec = EncoderSpec(name=args.encoder, stages=args.stages, pretrained=not args.random_encoder, scales=scales)
    enc = build_encoder(spec)
    ftr = extract(enc, torch.from_numpy(xtr[healthy]), scales)
    fte = extract(enc, torch.from_numpy(xte), scales)
    print(f"{healthy.sum()} healthy training slices; {len(y)} test slices, {y.sum()} with a lesion")
    print(f"encoder {spec.name} blocks[:{spec.stages}], pretrained {spec.pretrained}")
    for scale, a, b in zip(scales, ftr, fte, strict=True):
        res = scores(a, b, args.k, args.components)
        print(
            f"scale {scale} ({a.shape[1]} x {a.shape[2]} x {a.shape[3]}): "
            + ", ".join(f"{name} AUROC {roc_auc_score(y, s):.3f}" for name, s in res.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
