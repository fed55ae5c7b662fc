"""Evaluation metrics of both papers, on scikit-learn.

* Image level (AnoDODE Table 1): AUROC of the anomaly score, the best F1 over all thresholds and the
  accuracy at that same threshold.
* Pixel level (AnoFPDM Table 1): DICE and IoU per slice averaged over slices (a slice with an empty
  prediction and an empty truth scores 1, as in the reference code), and AUPRC over the foreground
  (brain) pixels of all slices pooled. The "mixed" setup uses every slice, the "unhealthy" setup
  only slices whose ground truth contains a lesion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


@dataclass(frozen=True)
class ImageLevel:
    auroc: float
    best_f1: float
    accuracy: float  #: accuracy at the best-F1 threshold
    threshold: float  #: score ≥ threshold is called anomalous

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def image_level(labels: np.ndarray, scores: np.ndarray) -> ImageLevel:
    """AUROC, best F1 and accuracy at the best-F1 threshold for binary ``labels`` (1 = anomalous)
    and ``scores`` (higher = more anomalous)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if y.all() or not y.any():
        raise ValueError("image-level metrics need both healthy and anomalous samples")
    auroc = float(roc_auc_score(y, s))
    precision, recall, thresholds = precision_recall_curve(y, s)
    # the last (precision=1, recall=0) point has no threshold
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    k = int(np.argmax(f1))
    thr = float(thresholds[k])
    acc = float(np.mean((s >= thr) == y))
    return ImageLevel(auroc=auroc, best_f1=float(f1[k]), accuracy=acc, threshold=thr)


def slice_references(slices: np.ndarray, background: float = -0.95, percentile: float = 99.9) -> dict[str, np.ndarray]:
    """Trivial per-slice scores that an image-level detector must beat, for grey slices
    [N, 1, S, S] (or [N, S, S]) in [-1, 1] with background at -1.

    * ``brain area``: the fraction of pixels above ``background``. Lesions sit in the large central
      slices of a brain, so on a test set that keeps all slices this alone separates them (the
      reason BMAD keeps axial slices 60–100 only).
    * ``FLAIR p<percentile>``: that percentile of the brain pixels' intensity (lesions are FLAIR-bright).
    """
    x = np.asarray(slices, dtype=np.float32)
    x = x.reshape(len(x), -1)
    brain = x > background
    high = np.array([np.percentile(v[b], percentile) if b.any() else -1.0 for v, b in zip(x, brain, strict=True)])
    return {"brain area": brain.mean(1), f"FLAIR p{percentile:g}": high}


def dice(pred: np.ndarray, truth: np.ndarray, empty: float = 1.0) -> float:
    """DICE = 2|P∩T| / (|P| + |T|); ``empty`` when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    return float(empty) if denom == 0 else 2.0 * int((p & t).sum()) / denom


def iou(pred: np.ndarray, truth: np.ndarray, empty: float = 1.0) -> float:
    """IoU = |P∩T| / |P∪T|; ``empty`` when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = int((p | t).sum())
    return float(empty) if union == 0 else int((p & t).sum()) / union


def lesion_slice_sensitivity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Share of the axial slices (axis 0) holding truth lesion voxels on which ``pred`` marks at least
    one voxel; NaN when the truth is empty."""
    p = np.asarray(pred, bool).reshape(len(pred), -1).any(1)
    t = np.asarray(truth, bool).reshape(len(truth), -1).any(1)
    return float("nan") if not t.any() else float((p & t).sum() / t.sum())


def false_positive_volume(pred: np.ndarray, truth: np.ndarray, voxel_ml: float) -> float:
    """Volume (mL) of the voxels ``pred`` marks outside ``truth``; ``voxel_ml``: one voxel's volume."""
    return float((np.asarray(pred, bool) & ~np.asarray(truth, bool)).sum()) * float(voxel_ml)


def volume_level(pred: np.ndarray, truth: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """A case's segmentation against its truth mask, as ``batch`` reports it: DICE over the whole
    volume (1 when both are empty), lesion-slice sensitivity, false-positive and truth volumes (mL)."""
    t = np.asarray(truth, bool)
    return {
        "dice": dice(pred, t),
        "lesion_slice_sensitivity": lesion_slice_sensitivity(pred, t),
        "false_positive_ml": false_positive_volume(pred, t, voxel_ml),
        "truth_volume_ml": float(t.sum()) * float(voxel_ml),
    }


@dataclass(frozen=True)
class PixelLevel:
    dice: float
    iou: float
    auprc: float
    n_slices: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def pixel_level(
    pred_masks: np.ndarray,
    truth_masks: np.ndarray,
    anomaly_maps: np.ndarray | None = None,
    foreground: np.ndarray | None = None,
) -> PixelLevel:
    """Slice-averaged DICE/IoU and pooled foreground AUPRC for ``[N, H, W]`` arrays.

    ``anomaly_maps`` (continuous, higher = more anomalous) are needed for AUPRC; ``foreground``
    restricts AUPRC to brain pixels (the reference code uses image > −0.95). AUPRC is NaN when the
    maps are not given or the pooled truth has no positive pixel.
    """
    pred = np.asarray(pred_masks, bool)
    truth = np.asarray(truth_masks, bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must both be [N, H, W]")
    dices = [dice(p, t) for p, t in zip(pred, truth, strict=True)]
    ious = [iou(p, t) for p, t in zip(pred, truth, strict=True)]
    auprc = float("nan")
    if anomaly_maps is not None:
        maps = np.asarray(anomaly_maps, dtype=float)
        fg = np.ones_like(truth) if foreground is None else np.asarray(foreground, bool)
        y = truth[fg]
        if y.any():
            auprc = float(average_precision_score(y, maps[fg]))
    return PixelLevel(dice=float(np.mean(dices)), iou=float(np.mean(ious)), auprc=auprc, n_slices=len(dices))


def segmentation_table(
    pred_masks: np.ndarray,
    truth_masks: np.ndarray,
    anomaly_maps: np.ndarray | None = None,
    foreground: np.ndarray | None = None,
    unhealthy_masks: np.ndarray | None = None,
) -> dict[str, PixelLevel]:
    """AnoFPDM Table 1 row: ``{"mixed": ..., "unhealthy": ...}`` (unhealthy = truth has a lesion).

    ``unhealthy_masks``: the masks scored in the unhealthy setup, when they differ from
    ``pred_masks``. The authors' evaluation (SoloChe/AnoFPDM, ``get_mask_batch_FPDM``) scores the
    unhealthy setup on the masks of every slice, before the cosine classifier empties those it calls
    healthy (``batch_mask_all``), and the mixed setup on the classifier-gated masks.
    """
    truth = np.asarray(truth_masks, bool)
    sick = truth.reshape(len(truth), -1).any(1)
    out = {"mixed": pixel_level(pred_masks, truth_masks, anomaly_maps, foreground)}
    if sick.any():
        sel = np.flatnonzero(sick)
        masks = np.asarray(pred_masks if unhealthy_masks is None else unhealthy_masks)
        if masks.shape != truth.shape:
            raise ValueError(f"unhealthy masks {masks.shape} and truth {truth.shape} differ in shape")
        out["unhealthy"] = pixel_level(
            masks[sel],
            truth[sel],
            None if anomaly_maps is None else np.asarray(anomaly_maps)[sel],
            None if foreground is None else np.asarray(foreground)[sel],
        )
    return out
