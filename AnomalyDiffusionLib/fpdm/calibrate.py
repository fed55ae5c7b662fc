"""AnoFPDM's dataset-level calibration from image-level labels (AnoFPDM section 4.2).

For every candidate guidance strength w: run the forward process, compute each slice's cosine
similarity of the guided and unguided MSE sequences (eq. 18), and choose the threshold that best
separates healthy from unhealthy slices. w* = the largest w whose accuracy stays within
``tolerance`` of the best. M_max = the largest M_{t_e} (per channel) over the validation slices
labelled unhealthy. No pixel labels are read. All candidate w share one forward pass.

When the best accuracy sits at the largest candidate (rising or level there), the grid extends
itself (:func:`~AnomalyDiffusionLib.fpdm.extend_guidance_grid`: 1.5× the last candidate, two per
round, up to ``w_cap``) with one more forward pass per round, until the accuracy falls below the
best at the top or the cap is reached. M_t grows as (1 + w)² (eq. 13), so M_max is taken from the
run at the chosen w*, and inference must use that w. The calibration records the settings it was
made with (``Calibration.settings``). ``training/calibrate_fpdm.py`` is the command line around
:func:`calibrate_fpdm`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..errors import AnomalyDiffusionError
from ..progress import ProgressCallback
from .decision import Calibration, extend_guidance_grid, m_max_from, select_guidance
from .forward import FPDMSettings, forward_process_multi

log = logging.getLogger(__name__)


def calibrate_fpdm(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    settings: FPDMSettings,
    ws: Sequence[float],
    *,
    tolerance: float = 0.99,
    w_cap: float = 40.0,
    a: float = 0.90,
    b: float = 0.98,
    median_size: int = 5,
    min_component: int = 40,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
) -> dict:
    """Calibrate AnoFPDM on validation slices ``x`` [N, C, S, S] with image-level ``labels`` [N].

    ``settings`` are the forward-process settings (its ``w`` is replaced by each candidate of
    ``ws``); ``a``, ``b``, ``median_size`` and ``min_component`` are stored in the calibration for
    Algorithm 1 at inference. ``w_cap`` ≤ 0 turns the grid extension off. Returns a JSON-ready dict:
    ``settings`` (with w*), ``calibration``, ``table`` (accuracy and threshold per w, with the
    extension ``round`` that added it), ``grid_extension`` (each round's candidates and why),
    ``validation`` (slice counts), ``seconds`` and ``network_calls``."""
    lab = np.asarray(labels).astype(bool)
    if lab.all() or not lab.any():
        raise AnomalyDiffusionError("validation needs both healthy and unhealthy slices (image-level labels)")
    cands = sorted(float(w) for w in ws)
    if not cands:
        raise AnomalyDiffusionError("no candidate guidance strength w")
    st = replace(settings, w=cands[0])
    t0 = time.perf_counter()
    results = forward_process_multi(model, x, st, cands, seed=seed, device=device, progress=progress)
    w_star, table = select_guidance({w: r.cosine for w, r in results.items()}, lab, tolerance)
    rounds = dict.fromkeys(results, 0)
    extension: list[dict] = []
    while w_cap > 0 and (more := extend_guidance_grid(table, cap=w_cap)) is not None:
        top = max(table)
        below = sorted(table)[-2] if len(table) > 1 else None
        why = f"the best accuracy {table[top]['accuracy']:.4f} was at the largest candidate w = {top:g}" + (
            f", above {table[below]['accuracy']:.4f} at w = {below:g}" if below is not None else ""
        )
        log.info("extending the w grid by %s: %s", more, why)
        results.update(forward_process_multi(model, x, st, more, seed=seed, device=device, progress=progress))
        rounds.update(dict.fromkeys(more, len(extension) + 1))
        extension.append({"added": more, "why": why})
        w_star, table = select_guidance({w: r.cosine for w, r in results.items()}, lab, tolerance)
    seconds = time.perf_counter() - t0
    best = results[w_star]
    fg = best.foreground  # brain fraction per slice
    cal = Calibration(
        w=w_star,
        cos_threshold=table[w_star]["threshold"],
        m_max=m_max_from(best, lab),
        a=a,
        b=b,
        median_size=median_size,
        min_component=min_component,
        # image-level quantity (no pixel labels): how much of a lesion slice the brain covers
        brain_fraction=None if fg is None else float(fg[lab].mean()),
    )
    chosen = replace(st, w=w_star)
    cal.settings = chosen.calibration_dict()  # what the threshold and M_max hold for
    return {
        "settings": chosen.as_dict(),
        "calibration": cal.as_dict(),
        "table": {str(w): {**v, "round": rounds[w]} for w, v in table.items()},
        "grid_extension": {
            "extended": bool(extension),
            "rule": f"while the best accuracy is at the largest w (rising or level): 1.5x, two per round, "
            f"up to w = {w_cap:g}",
            "rounds": extension,
        },
        "validation": {"slices": len(lab), "unhealthy": int(lab.sum()), "pixel_labels_used": False},
        "seconds": round(seconds, 1),
        "network_calls": best.network_calls * (1 + len(extension)),
    }
