#!/usr/bin/env python
"""Train AnoDODE score networks: denoising score matching (eq. 3) on features of healthy slices only.

Healthy slices (image-level label 0) pass once through the frozen ImageNet encoder at each input
scale. The features are standardised per channel, with statistics fitted here and stored with the
model. Then one time-conditioned ADM-style UNet per scale learns the score of the VP SDE (eq. 6).
Adam (lr 1e-4), EMA, seeded, atomic checkpoints, exact --resume; AMP on GPU.

Outputs in --out: dode_encoder.safetensors (the cut encoder's weights, so inference needs no extra
package), dode_score_<scale>.safetensors per scale (EMA weights; the config, encoder spec and feature
standardisation live in its metadata), scale_<scale>/ (checkpoint, loss.csv, loss.png), and
bundle/: the same model as an AnoDODE-only bundle (no decision threshold yet; --no-bundle skips it).

Examples:
  python training/train_dode.py --data data/bmad_flair --encoder efficientnet_b5 --encoder-weights b5.pth \
      --config paper --iterations 100000 --out runs/dode
  python training/train_dode.py --phantom 16 --config small --scales 128,64 --iterations 2000 --out runs/dode_small
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.cli_support import TqdmProgress, add_slice_range_argument, parse_slice_range
from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.devices import tune_cpu_allocator
from AnomalyDiffusionLib.dode.features import DEFAULT_ENCODER, EncoderSpec, Standardiser, build_encoder, extract
from AnomalyDiffusionLib.dode.score import ScoreNet, dsm_loss, score_config
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.modelio import save_weights
from AnomalyDiffusionLib.trainer import EMA_WARMUP_RULE, cleanup_distributed, setup_distributed, train_loop


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        description=doc[0], epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("data (one of)")
    src.add_argument(
        "--data", type=Path, help="slice dataset from prepare_brats.py (train/ split; healthy slices used)"
    )
    src.add_argument("--phantom", type=int, metavar="N", help="N synthetic subjects (their healthy slices)")
    p.add_argument("--phantom-seed", type=int, default=2000)
    add_slice_range_argument(p)
    p.add_argument("--modality", default="flair", help="channel encoded (default flair, as the paper)")
    p.add_argument(
        "--slice-size",
        type=int,
        default=None,
        help="grey slice size the phantom slices are made at (default: the largest scale, so each scale is "
        "resampled from the source slice as in the paper, not upsampled from a smaller one)",
    )
    p.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help=f"timm encoder (default {DEFAULT_ENCODER}, the architecture of the packaged Lite0 weights; paper "
        "efficientnet_b5 with --encoder-weights)",
    )
    p.add_argument("--encoder-weights", type=Path, default=None, help="local ImageNet weights file for the encoder")
    p.add_argument("--stages", type=int, default=6, help="keep blocks[:stages] (default 6: stride 32)")
    p.add_argument(
        "--random-encoder",
        action="store_true",
        help="randomly initialised encoder instead of ImageNet weights (ablation; seeded by --seed)",
    )
    p.add_argument(
        "--scales", default="256,192,128,64", help="input sizes (default 256,192,128,64; paper best 128,192)"
    )
    p.add_argument("--config", default="small", choices=("tiny", "small", "paper"), help="score UNet size")
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout of the score UNet's residual blocks (default: the config's, 0.1 for paper, 0 otherwise)",
    )
    p.add_argument(
        "--hflip",
        action="store_true",
        help="also train on the left-right mirror of every healthy slice (brains are near-symmetric; "
        "twice the healthy features for a small training set)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=2000, help="iterations per scale")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue every scale's checkpoint exactly")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-bundle", action="store_true", help="do not write OUT/bundle (the AnoDODE-only bundle)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    finished = False  # every rank got to the end: they leave the process group together
    try:
        dist = setup_distributed(args.device)
        scales = tuple(int(s) for s in args.scales.split(","))
        if args.slice_size is None:
            args.slice_size = max(scales)
        elif args.slice_size < max(scales):
            print(
                f"warning: slices of {args.slice_size}² are upsampled to the {max(scales)}² scale (no extra detail)",
                file=sys.stderr,
            )
        start, stop = parse_slice_range(args.slices)
        spec = EncoderSpec(name=args.encoder, stages=args.stages, pretrained=not args.random_encoder, scales=scales)
        torch.manual_seed(args.seed)
        encoder = build_encoder(spec, weights_file=None if args.random_encoder else args.encoder_weights)
        encoder = encoder.to(dist.device)
        with TqdmProgress() as progress:
            x, ds = load_or_make(
                args.data,
                "train",
                args.phantom,
                (args.modality,),
                args.slice_size,
                args.phantom_seed,
                progress=progress,
                start=start,
                stop=stop,
            )
        healthy = np.asarray(ds.labels) == 0
        if healthy.sum() < 2:
            raise AnomalyDiffusionError("no healthy slices to train on (AnoDODE models healthy anatomy only)")
        slices = torch.from_numpy(x[healthy])
        if args.hflip:
            slices = torch.cat([slices, slices.flip(-1)])
        feats = extract(encoder, slices, scales)
        print(
            f"{len(slices)} healthy slices{' (half of them mirrored)' if args.hflip else ''}, "
            f"encoder {spec.name} blocks[:{spec.stages}] "
            f"({feats[0].shape[1]} channels), scales {scales}, device {dist.device}"
        )
        args.out.mkdir(parents=True, exist_ok=True)
        save_weights(
            encoder,
            args.out / "dode_encoder.safetensors",
            {"kind": "encoder", "spec": spec.as_dict(), "source": "ImageNet (timm / packaged weights)"},
        )
        source = f"slice dataset '{args.data}'" if args.data else f"{args.phantom} synthetic phantom subjects"
        for k, (scale, f) in enumerate(zip(scales, feats, strict=True)):
            std = Standardiser.fit(f)
            z_all = std(f).float()
            torch.manual_seed(args.seed + k)
            config = score_config(args.config, f.shape[1], f.shape[-1])
            if args.dropout is not None:
                config = dataclasses.replace(config, dropout=args.dropout)
            model = ScoreNet(config)
            bs = min(args.batch_size, len(z_all))

            def loss_fn(net, rng: np.random.Generator, z_all=z_all, bs=bs) -> torch.Tensor:
                idx = torch.from_numpy(np.sort(rng.integers(0, len(z_all), bs)))
                score_net = net.module if hasattr(net, "module") else net
                return dsm_loss(score_net, z_all[idx].to(dist.device))

            run = {"model": model.config.as_dict(), "scale": scale}
            with TqdmProgress() as progress:
                ema_model, history = train_loop(
                    model,
                    loss_fn,
                    args.out / f"scale_{scale}",
                    args.iterations,
                    lr=args.lr,
                    ema_decay=args.ema,
                    save_every=args.save_every,
                    log_every=args.log_every,
                    seed=args.seed + k,
                    resume=args.resume,
                    run=run,
                    amp=args.amp,
                    dist=dist,
                    optimizer="adam",
                    progress=progress,
                )
            save_weights(
                ema_model,
                args.out / f"dode_score_{scale}.safetensors",
                {
                    "kind": "dode_score",
                    "config": model.config.as_dict(),
                    "scale": scale,
                    "encoder": spec.as_dict(),
                    "feature_mean": std.mean.tolist(),
                    "feature_std": std.std.tolist(),
                    "modality": args.modality,
                    "training_data": source,
                    "healthy_slices": len(slices),
                    "augmentation": "hflip" if args.hflip else "none",
                    "slice_range": [start, stop],
                    "slice_size": args.slice_size,
                    "iterations": args.iterations,
                    "ema": {"decay": args.ema, "warmup": EMA_WARMUP_RULE if args.ema > 0 else None},
                },
            )
            print(f"scale {scale}: final loss {history[-1]['loss']:.4f} ({history[-1]['seconds']:.0f} s)")
        (args.out / "train_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
        finished = True  # past the last collective: rank 0 builds the bundle while the others wait
        if dist.main and not args.no_bundle:
            import make_bundle  # beside this script

            # the end product: an AnoDODE-only bundle (no decision threshold until evaluate_dode.py
            # calibrates one; make_bundle.py --dode RUN then adds it), the form every loader reads
            rc = make_bundle.main(["--dode", str(args.out), "--out", str(args.out / "bundle")])
            if rc:
                return rc
    except AnomalyDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(barrier=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
