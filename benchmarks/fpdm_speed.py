#!/usr/bin/env python
"""AnoFPDM speed: the reference code's procedure vs ours, same model and inputs, one run.

Baseline (as in SoloChe/AnoFPDM): every forward step, four separate network calls on the slice batch
(DDIM inversion with ∅, guided healthy, guided ∅, "unguided" healthy with w = 0), full trajectories
[N, T, C, S, S] of the predictions kept in memory and reduced at the end. Both clamp the predictions
to [-1, 1] (the reference's clip_denoised) when the calibration did, and neither when it did not.
Ours: one stacked call per step ([healthy; ∅] in one batch), streaming aggregation, optional early
stop after the M_t peak, a step stride whose gaps follow the stride-1 inversion (``--gap extrapolate``),
and, on the CPU, channels-last weights (``devices.for_inference``).

Both run the paper's eq. 10 form for the unguided prediction here (the baseline's fourth call is
then the ∅ call again; the call count is what the reference code pays). Segmentation uses no slice
classification (every slice segmented), so the comparison isolates the forward process.

Prints the baseline time, ours, the ratio, the memory each keeps (bytes of retained tensors; CUDA
peak when on a GPU), the fraction of slices (× map channels) whose t_e agrees within the stride, and
the DICE change. For flat-topped M_t curves it also prints how far the baseline's M_t at our t_e
falls below its peak (relative), and the largest relative difference of M_{t_e}.

  python benchmarks/fpdm_speed.py --model runs/fpdm_small --phantom 2 --slices 64
  python benchmarks/fpdm_speed.py --model Resources/Bundles/phantom-small --slices 32   # a bundle's own calibration
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.devices import for_inference, tune_cpu_allocator
from AnomalyDiffusionLib.diffusion import HEALTHY, NULL, Schedule, predict_x0, q_sample
from AnomalyDiffusionLib.fpdm import Calibration, ForwardResult, FPDMSettings, forward_process, segment
from AnomalyDiffusionLib.fpdm.model import load_unet_any
from AnomalyDiffusionLib.metrics import pixel_level


@torch.no_grad()
def reference_procedure(model, x0: torch.Tensor, st: FPDMSettings, device) -> tuple[ForwardResult, int, int]:
    """The reference code's loop: 4 calls per step, trajectories kept, reductions at the end."""
    abar = Schedule().tensor(device)
    x0 = x0.to(device)
    n = x0.shape[0]
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    chans = list(st.map_channels) if st.map_channels is not None else list(range(x0.shape[1]))
    hgps, ugps = [], []
    x_prev = None
    t_prev = 0
    calls = 0
    h_lab = torch.full((n,), HEALTHY, device=device)
    n_lab = torch.full((n,), NULL, device=device)
    for k, t in enumerate(st.visited):
        tt = torch.full((n,), int(t), device=device)
        if k == 0:
            x_t = q_sample(x0, tt, torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device), abar)
        else:
            tp = torch.full_like(tt, t_prev)
            eps_inv = model(x_prev, tp, n_lab)  # call 1: inversion with the unconditional ε
            calls += 1
            x0_t = predict_x0(x_prev, tp, eps_inv, abar).clamp(-1, 1)
            a_t, a_p = abar[int(t)].float(), abar[t_prev].float()
            x_t = a_t.sqrt() * x0_t + (1 - a_t).sqrt() * (x_prev - a_p.sqrt() * x0_t) / (1 - a_p).sqrt()
        eps_h = model(x_t, tt, h_lab)  # call 2: guided, healthy
        eps_n = model(x_t, tt, n_lab)  # call 3: guided, null
        eps_u = model(x_t, tt, n_lab)  # call 4: "unguided"
        calls += 3
        hgp_t = predict_x0(x_t, tt, (1 + st.w) * eps_h - st.w * eps_n, abar)[:, chans]
        ugp_t = predict_x0(x_t, tt, eps_u, abar)[:, chans]
        if st.clip_denoised:  # the reference's calc_pred_xstart_loop(clip_denoised=True)
            hgp_t, ugp_t = hgp_t.clamp(-1, 1), ugp_t.clamp(-1, 1)
        hgps.append(hgp_t)
        ugps.append(ugp_t)
        x_prev, t_prev = x_t, int(t)
    hgp = torch.stack(hgps, 1)  # [N, K, C, S, S]
    ugp = torch.stack(ugps, 1)
    retained = hgp.element_size() * hgp.numel() * 2
    xg = x0[:, chans][:, None]
    m = ((hgp - ugp) ** 2).mean(dim=(-2, -1))  # [N, K, C]
    sam = (hgp - xg) ** 2
    t_idx = m.argmax(1)  # [N, C]
    cums = sam.cumsum(1) / torch.arange(1, len(st.visited) + 1, device=device).float()[None, :, None, None, None]
    h = torch.stack([cums[i, t_idx[i, c], c] for i in range(n) for c in range(len(chans))]).reshape(
        n, len(chans), *x0.shape[-2:]
    )
    s_te = torch.stack([sam[i, t_idx[i, c], c] for i in range(n) for c in range(len(chans))]).reshape(
        n, len(chans), *x0.shape[-2:]
    )
    mse_h = sam.mean(dim=(2, 3, 4)).cpu().numpy()
    mse_u = ((ugp - xg) ** 2).mean(dim=(2, 3, 4)).cpu().numpy()
    res = ForwardResult(
        steps=st.visited,
        m=m.cpu().numpy(),
        mse_h=mse_h,
        mse_u=mse_u,
        t_e=st.visited[t_idx.cpu().numpy()],
        m_te=m.max(1).values.cpu().numpy(),
        h=h.cpu().numpy(),
        s_te=s_te.cpu().numpy(),
        cosine=np.ones(n, np.float32),
        steps_run=np.full(n, len(st.visited)),
        network_calls=calls,
        foreground=(x0[:, chans] > -0.95).any(1).cpu().numpy(),
    )
    return res, calls, retained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument(
        "--calibration", type=Path, default=None, help="default: calibration_fpdm_ddim.json beside the model"
    )
    p.add_argument("--phantom", type=int, default=2, help="synthetic subjects for inputs (default 2)")
    p.add_argument("--phantom-seed", type=int, default=7000)
    p.add_argument("--slices", type=int, default=64, help="slices timed (default 64, unhealthy first)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--stride", type=int, default=2, help="our step stride (default 2; the baseline uses 1)")
    p.add_argument(
        "--gap",
        choices=("jump", "extrapolate"),
        default="extrapolate",
        help="how our DDIM inversion crosses a stride's gap (default extrapolate: the stride-1 unit steps with "
        "ε_∅ extrapolated from the last two visited steps; jump: one eq. 4 step)",
    )
    p.add_argument("--patience", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    tune_cpu_allocator()

    model, meta = load_unet_any(args.model, device=args.device)
    folder = args.model if args.model.is_dir() else args.model.parent
    cal_file = args.calibration or folder / "calibration_fpdm_ddim.json"
    if args.calibration is None and "bundle" in meta:  # a model bundle carries its own calibration
        rep = meta["bundle"]
    elif cal_file.is_file():
        rep = json.loads(cal_file.read_text())
    else:
        raise SystemExit(f"error: no calibration '{cal_file}'; run training/calibrate_fpdm.py or pass --calibration")
    cal = Calibration(**rep["calibration"])
    mods = list(meta["modalities"])
    x, ds = load_or_make(None, "test", args.phantom, mods, model.config.image_size, args.phantom_seed)
    order = np.argsort(-np.asarray(ds.labels, dtype=np.int64), kind="stable")[: args.slices]  # unhealthy first
    x, truth = torch.from_numpy(x[order]), np.asarray(ds.masks)[order].astype(bool)
    chans = tuple(rep["settings"]["map_channels"] or range(len(mods)))
    clip = FPDMSettings.from_dict(rep["settings"]).clip_denoised  # as calibrated (old calibrations: off)
    base_st = FPDMSettings(
        w=cal.w, steps=args.steps, stride=1, map_channels=chans, clip_denoised=clip, batch_size=args.batch_size
    )
    ours_st = FPDMSettings(
        w=cal.w,
        clip_denoised=clip,
        steps=args.steps,
        stride=args.stride,
        gap=args.gap,
        map_channels=chans,
        early_stop=True,
        patience=args.patience,
        cosine_steps=0,
        batch_size=args.batch_size,
    )

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
        return out, time.perf_counter() - t0, peak

    (base, base_calls, base_kept), t_base, peak_base = timed(
        lambda: reference_procedure(model, x, base_st, args.device)
    )
    # ours also stores the weights channels-last on the CPU (devices.for_inference, as the pipeline does);
    # the baseline ran first on the plain NCHW model, as the reference code does
    for_inference(model, args.device)
    ours, t_ours, peak_ours = timed(lambda: forward_process(model, x, ours_st, device=args.device))
    ours_kept = 3 * ours.h[:1].nbytes * min(len(x), args.batch_size)  # running sum, H and S at the argmax
    agree = np.mean(np.abs(base.t_e - ours.t_e) <= args.stride)
    # where t_e differs, how far below its peak is the baseline's M_t at our t_e (flat tops)?
    m_at_ours = np.take_along_axis(base.m, ours.t_e[:, None, :].astype(np.int64), 1)[:, 0]
    shortfall = 1 - m_at_ours / base.m.max(1)
    seg_b = segment(base, cal, classify=False)
    seg_o = segment(ours, cal, classify=False)
    d_b, d_o = pixel_level(seg_b.masks, truth).dice, pixel_level(seg_o.masks, truth).dice
    res = {
        "device": args.device,
        "slices": len(x),
        "steps": args.steps,
        "stride": args.stride,
        "gap": args.gap,
        "baseline_s": round(t_base, 2),
        "ours_s": round(t_ours, 2),
        "ratio": round(t_base / t_ours, 2),
        "baseline_calls": base_calls,
        "ours_calls_per_batch": int(ours.network_calls),
        "baseline_retained_MB": round(base_kept / 2**20, 1),
        "ours_retained_MB": round(ours_kept / 2**20, 2),
        "baseline_cuda_peak_MB": None if peak_base is None else round(peak_base / 2**20, 1),
        "ours_cuda_peak_MB": None if peak_ours is None else round(peak_ours / 2**20, 1),
        "t_e_agreement": round(float(agree), 4),
        "t_e_entries": int(base.t_e.size),
        "m_shortfall_at_our_t_e_max": round(float(shortfall.max()), 5),
        "m_te_relative_difference_max": round(float(np.abs(ours.m_te / base.m_te - 1).max()), 4),
        "dice_baseline": round(d_b, 4),
        "dice_ours": round(d_o, 4),
        "dice_change_points": round(100 * (d_o - d_b), 2),
        "mean_steps_run_ours": float(ours.steps_run.mean()),
    }
    for k, v in res.items():
        print(f"{k:24s} {v}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
