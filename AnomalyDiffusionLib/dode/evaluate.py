"""AnoDODE evaluation references: slice scores of one case against its lesion slices.

:func:`score_case` scores every axial slice of one FLAIR volume whose brain covers at least 5 % of
the slice (eq. 13) and compares the slices a lesion mask marks with the rest (mean score each side,
AUROC). ``training/evaluate_dode.py --real-case``
reports it beside the phantom or BraTS tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import slices_from_case
from ..errors import AnomalyDiffusionError
from ..metrics import image_level
from ..volumes import load_case, read_labelmap_like
from .model import DODEModel, score_slices

#: slices whose brain covers less of the slice are not scored
MIN_BRAIN_FRACTION = 0.05


def case_files(folder: str | Path) -> tuple[Path, Path]:
    """The FLAIR (``*_fla*`` or ``*_flair``) and lesion mask (``*_seg``) volumes of a case folder."""
    f = Path(folder)
    flair = next(iter(sorted(f.glob("*_fla*.nii*")) + sorted(f.glob("*_flair.nii*"))), None)
    seg = next(iter(sorted(f.glob("*_seg.nii*"))), None)
    if flair is None or seg is None:
        raise AnomalyDiffusionError(f"no *_fla/*_flair and *_seg volumes in '{f}'")
    return flair, seg


def score_case(model: DODEModel, folder: str | Path, size: int, **score_options: Any) -> dict:
    """Per-slice AnoDODE scores of the case in ``folder`` (:func:`case_files`) at slice ``size``,
    and how the lesion slices compare with the others. ``score_options`` go to
    :func:`~AnomalyDiffusionLib.dode.model.score_slices` (solver, probe, seed, rtol, atol, n_probes).
    Returns a JSON-ready dict: case, slice counts, mean score of lesion and other slices, ``auroc``
    (when both kinds exist) and ``per_slice`` (canonical slice index, lesion flag, score)."""
    flair, seg = case_files(folder)
    name = Path(folder).name
    case = load_case({"flair": flair})
    ds = slices_from_case(
        case, read_labelmap_like(seg, case), name, ("flair",), size, min_brain_fraction=MIN_BRAIN_FRACTION
    )
    _, score = score_slices(model, ds.images, **score_options)
    lab = np.asarray(ds.labels).astype(int)
    out: dict[str, Any] = {
        "case": name,
        "slices": len(lab),
        "lesion_slices": int(lab.sum()),
        "mean_score_lesion": float(score[lab == 1].mean()) if lab.any() else None,
        "mean_score_other": float(score[lab == 0].mean()) if not lab.all() else None,
        "per_slice": [
            {"slice": int(k), "lesion": int(y), "score": round(float(v), 4)}
            for k, y, v in zip(ds.slices, lab, score, strict=True)
        ],
    }
    if 0 < lab.sum() < len(lab):
        out["auroc"] = image_level(lab, score).auroc
    return out
