#!/usr/bin/env python
"""Train the AnoFPDM classifier-free-guided DDPM (ε-prediction UNet on healthy + unhealthy slices).

Labels: 0 = healthy, 1 = unhealthy (slice holds lesion), replaced by the null label with probability
--p-uncond (0.1) so one network learns both ε(x_t, t, y) and ε(x_t, t, ∅). AdamW (lr 1e-4, β 0.9/0.999,
no weight decay), EMA of weights, linear β schedule 1e-4 → 0.02 over T = 1000 (AnoFPDM appendix B).

Data: a slice dataset from prepare_brats.py (--data DIR, using DIR/train when DIR holds splits) or
synthetic phantom subjects made on the fly (--phantom N).

Outputs in --out: fpdm.safetensors (EMA weights + config in its metadata), loss.csv, loss.png,
checkpoint/ (for --resume, which continues exactly), train_args.json.

Examples:
  python training/train_fpdm.py --data data/brats128 --config paper --batch-size 64 --iterations 210000 \
      --amp --out runs/fpdm
  torchrun --nproc_per_node 2 training/train_fpdm.py --data data/brats128 --config paper --out runs/fpdm   # DDP
  python training/train_fpdm.py --phantom 24 --config small --image-size 64 --iterations 6000 --out runs/fpdm_small
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from AnomalyDiffusionLib.cli_support import TqdmProgress, parse_slice_range
from AnomalyDiffusionLib.datasets import open_slices
from AnomalyDiffusionLib.devices import tune_cpu_allocator
from AnomalyDiffusionLib.diffusion import NULL, Schedule, q_sample
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.fpdm.model import load_unet_any
from AnomalyDiffusionLib.modelio import save_unet
from AnomalyDiffusionLib.nets import UNet, count_parameters, unet_config
from AnomalyDiffusionLib.trainer import EMA_WARMUP_RULE, cleanup_distributed, setup_distributed, train_loop

log = logging.getLogger("train_fpdm")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        description=doc[0], epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("data (one of)")
    src.add_argument(
        "--data", type=Path, help="slice dataset folder from prepare_brats.py (its train/ split if present)"
    )
    src.add_argument("--phantom", type=int, metavar="N", help="train on N synthetic phantom subjects generated now")
    p.add_argument(
        "--modalities",
        default="flair,t2",
        help="channels to train on, in order (default flair,t2; BraTS may use flair,t1,t1ce,t2)",
    )
    p.add_argument("--phantom-seed", type=int, default=1000, help="seed of the first phantom subject (default 1000)")
    p.add_argument(
        "--phantom-healthy-fraction",
        type=float,
        default=0.25,
        help="phantom subjects without lesion (default 0.25)",
    )
    p.add_argument("--phantom-spacing", type=float, default=2.0, help="phantom voxel size in mm (default 2)")
    p.add_argument(
        "--fov-mm",
        type=float,
        default=None,
        help="frame the brain in a square of this side in mm instead of the scanner's whole field of view "
        "(recorded in the weights; a bundle made from them frames its inputs the same way; a prepared "
        "--data set must have been made with the same --fov-mm)",
    )
    p.add_argument(
        "--phantom-randomise",
        action="store_true",
        help="domain-randomised phantoms: each subject draws its own contrasts, bias, noise, gamma, blur, "
        "slice thickness and lesion sizes/counts (PhantomOptions.randomise)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="MODEL",
        help="start from these AnoFPDM weights (a bundle, its zip, a run folder or a weights file) instead of "
        "a random initialisation; the UNet configuration is the model's (--config and --image-size are ignored)",
    )
    p.add_argument(
        "--slices",
        default=None,
        metavar="START:STOP",
        help="phantom axial slice range (default: all with brain)",
    )
    p.add_argument(
        "--config",
        default="small",
        choices=("tiny", "small", "paper"),
        help="UNet configuration (default small)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="slice size (default: the config's: paper 128, small 64, tiny 32)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (paper: 64)")
    p.add_argument("--iterations", type=int, default=1000, help="optimisation steps in total (paper: 210k)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay (default 0.9999; 0 disables)")
    p.add_argument(
        "--p-uncond", type=float, default=0.1, help="probability of replacing the label by null (default 0.1)"
    )
    p.add_argument(
        "--max-t",
        type=int,
        default=None,
        help="draw training steps t only below this (default: all T = 1000, as the paper). AnoFPDM never "
        "visits steps past its forward steps (600), so a CPU run may spend its budget there; such a model "
        "cannot generate images from pure noise",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for batches, noise and initialisation (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint exactly where it stopped")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N iterations (default 500)")
    p.add_argument("--log-every", type=int, default=10, help="record the loss every N iterations (default 10)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: GPU when present")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on GPU (ignored on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = None
    finished = False  # every rank got to the end: they leave the process group together
    try:
        dist = setup_distributed(args.device)
        modalities = tuple(m.strip() for m in args.modalities.split(","))
        init = None
        if args.init_from is not None:
            if args.resume:
                raise AnomalyDiffusionError("--init-from starts a new run; --resume continues one: give only one")
            init, init_meta = load_unet_any(args.init_from)
            if list(init_meta.get("modalities", modalities)) != list(modalities):
                raise AnomalyDiffusionError(
                    f"--init-from model has channels {init_meta.get('modalities')}, not {list(modalities)}"
                )
            cfg = init.config
        else:
            cfg = unet_config(args.config, in_channels=len(modalities), image_size=args.image_size)
        start, stop = parse_slice_range(args.slices)
        with TqdmProgress() as progress:
            ds = open_slices(
                args.data,
                "train",
                args.phantom,
                modalities,
                cfg.image_size,
                args.phantom_seed,
                args.phantom_healthy_fraction,
                args.phantom_spacing,
                start,
                stop,
                progress,
                randomise=args.phantom_randomise,
                fov_mm=args.fov_mm,
            )
        chans = ds.channel_index(modalities)
        images = ds.images  # memory-mapped for prepared data: only each batch is read
        labels = np.asarray(ds.labels).astype(np.int64)
        if dist.world > 1 and args.batch_size % dist.world:
            raise AnomalyDiffusionError(f"--batch-size {args.batch_size} is not divisible by {dist.world} processes")
        per_rank = args.batch_size // dist.world
        schedule = Schedule()
        abar = schedule.tensor(dist.device)
        max_t = schedule.steps if args.max_t is None else args.max_t
        if not 1 <= max_t <= schedule.steps:
            raise AnomalyDiffusionError(f"--max-t must be within 1..{schedule.steps}, not {args.max_t}")
        torch.manual_seed(args.seed)
        model = UNet(cfg)
        if init is not None:
            model.load_state_dict(init.state_dict())
        if dist.main:
            print(
                f"{len(ds)} slices ({int(labels.sum())} unhealthy), {len(modalities)} channel(s) {modalities}, "
                f"UNet '{args.config}' {count_parameters(model) / 1e6:.2f} M parameters, device {dist.device}"
            )

        def loss_fn(net, rng: np.random.Generator) -> torch.Tensor:
            idx = np.sort(rng.integers(0, len(labels), per_rank))
            x0 = torch.from_numpy(np.asarray(images[idx][:, chans], dtype=np.float32)).to(dist.device)
            y = labels[idx].copy()
            y[rng.random(per_rank) < args.p_uncond] = NULL  # classifier-free guidance: null label
            t = torch.from_numpy(rng.integers(0, max_t, per_rank)).to(dist.device)
            noise = torch.randn(x0.shape).to(dist.device)
            x_t = q_sample(x0, t, noise, abar)
            return F.mse_loss(net(x_t, t, torch.from_numpy(y).to(dist.device)).float(), noise)

        run = {
            "init_from": str(args.init_from) if args.init_from else None,
            "model": cfg.as_dict(),
            "data": {"fov_mm": args.fov_mm},  # a resumed run must see its slices framed the same way
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        with TqdmProgress(force=False) as progress:
            ema_model, history = train_loop(
                model,
                loss_fn,
                args.out,
                args.iterations,
                lr=args.lr,
                ema_decay=args.ema,
                save_every=args.save_every,
                log_every=args.log_every,
                seed=args.seed,
                resume=args.resume,
                run=run,
                amp=args.amp,
                dist=dist,
                progress=progress if dist.main else None,
            )
        if dist.main:
            source = (
                f"slice dataset '{args.data}'"
                if args.data
                else f"{args.phantom} {'domain-randomised ' if args.phantom_randomise else ''}synthetic phantom "
                f"subjects (seed {args.phantom_seed})"
            )
            if args.init_from:
                source += f", continued from '{args.init_from}'"
            save_unet(
                ema_model,
                args.out / "fpdm.safetensors",
                method="fpdm",
                modalities=list(modalities),
                schedule=schedule.as_dict(),
                iterations=args.iterations,
                training_data=source,
                ema=args.ema,
                ema_warmup=EMA_WARMUP_RULE if args.ema > 0 else None,
                p_uncond=args.p_uncond,
                max_t=max_t,
                fov_mm=args.fov_mm,
            )
            (args.out / "train_args.json").write_text(json.dumps(run["args"], indent=1))
            last = history[-1] if history else {}
            print(
                f"done: {args.iterations} iterations, last loss {last.get('loss', float('nan')):.4f}, "
                f"{last.get('seconds', 0):.0f} s; weights in {args.out / 'fpdm.safetensors'}"
            )
        finished = True
    except AnomalyDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(barrier=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
