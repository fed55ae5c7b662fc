#!/usr/bin/env python
"""Train the AnoDODE feature decoder (section 4.3): healthy slices → frozen encoder features → image.

A latent-diffusion-style decoder learns to reconstruct the slice from its stride-32 features at one
input scale (L1 + L2 loss, healthy slices only). Localisation then denoises the features with the
score network of the same scale and decodes them; the heatmap is (x − x')².

Reads the encoder from an AnoDODE model folder (train_dode.py output) or a model bundle, so features
match, and writes dode_decoder_<scale>.safetensors into the model folder, or into --out (required for a
bundle, whose folder is never written to).

Examples:
  python training/train_decoder.py --model runs/dode --data data/bmad_flair --scale 256 --iterations 50000
  python training/train_decoder.py --model runs/dode_small --phantom 16 --scale 128 --iterations 2000
  python training/train_decoder.py --model Resources/Bundles/phantom-small --out runs/decoder --phantom 12 \
      --scale 256 --mults 8,4,2,1 --iterations 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.bundle import is_bundle
from AnomalyDiffusionLib.cli_support import TqdmProgress, add_slice_range_argument, parse_slice_range
from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.devices import tune_cpu_allocator
from AnomalyDiffusionLib.dode.features import extract
from AnomalyDiffusionLib.dode.localise import reconstruction_loss
from AnomalyDiffusionLib.dode.model import load_dode
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.modelio import save_weights
from AnomalyDiffusionLib.nets import Decoder
from AnomalyDiffusionLib.trainer import EMA_WARMUP_RULE, cleanup_distributed, setup_distributed, train_loop


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        description=doc[0], epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, required=True, help="AnoDODE model folder (train_dode.py --out), or a model bundle"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the decoder weights and its run (default: the model folder; required for a bundle)",
    )
    src = p.add_argument_group("data (one of)")
    src.add_argument("--data", type=Path, help="slice dataset (train/ split; healthy slices used)")
    src.add_argument("--phantom", type=int, metavar="N", help="N synthetic subjects")
    p.add_argument("--phantom-seed", type=int, default=3000)
    add_slice_range_argument(p)
    p.add_argument("--modality", default="flair")
    p.add_argument("--slice-size", type=int, default=128)
    p.add_argument("--scale", type=int, default=128, help="encoder input size whose features are decoded")
    p.add_argument("--base", type=int, default=32, help="decoder base width (default 32)")
    p.add_argument(
        "--mults",
        default="8,4,2,2,1",
        help="width multipliers, one ×2 upsampling stage each (default 8,4,2,2,1: stride-32 features back to "
        "the encoder's input size; 4 stages decode to half of it, which localise() resizes to the slice; "
        "CPUs train that about 4× faster)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    finished = False  # every rank got to the end: they leave the process group together
    try:
        out = args.out
        if out is None:
            if is_bundle(args.model):
                raise AnomalyDiffusionError(f"'{args.model}' is a model bundle: give --out for the decoder")
            out = args.model
        dist = setup_distributed(args.device)
        start, stop = parse_slice_range(args.slices)
        model = load_dode(args.model, device=str(dist.device))
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
        healthy = torch.from_numpy(x[np.asarray(ds.labels) == 0])
        if len(healthy) < 2:
            raise AnomalyDiffusionError("no healthy slices to train the decoder on")
        (feats,) = extract(model.encoder, healthy, (args.scale,))
        torch.manual_seed(args.seed)
        decoder = Decoder(feats.shape[1], base=args.base, mults=tuple(int(m) for m in args.mults.split(",")))
        bs = min(args.batch_size, len(healthy))

        def loss_fn(net, rng: np.random.Generator) -> torch.Tensor:
            idx = torch.from_numpy(np.sort(rng.integers(0, len(healthy), bs)))
            return reconstruction_loss(net, feats[idx].to(dist.device), healthy[idx].to(dist.device))

        with TqdmProgress() as progress:
            ema_model, history = train_loop(
                decoder,
                loss_fn,
                out / f"decoder_{args.scale}",
                args.iterations,
                lr=args.lr,
                ema_decay=args.ema,
                save_every=args.save_every,
                log_every=args.log_every,
                seed=args.seed,
                resume=args.resume,
                run={"model": decoder.config, "scale": args.scale},
                amp=args.amp,
                dist=dist,
                optimizer="adam",
                progress=progress if dist.main else None,
            )
        finished = True
        if not dist.main:  # under torchrun, rank 0 writes
            return 0
        save_weights(
            ema_model,
            out / f"dode_decoder_{args.scale}.safetensors",
            {
                "kind": "dode_decoder",
                "config": decoder.config,
                "scale": args.scale,
                "healthy_slices": len(healthy),
                "iterations": args.iterations,
                "ema": {"decay": args.ema, "warmup": EMA_WARMUP_RULE if args.ema > 0 else None},
            },
        )
        print(f"decoder for scale {args.scale}: final loss {history[-1]['loss']:.4f}")
    except AnomalyDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(barrier=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
