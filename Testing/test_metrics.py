"""Metrics against hand-computed values."""

import numpy as np
import pytest

from AnomalyDiffusionLib import metrics as M


def test_image_level_hand_case():
    # AUROC: of the 4 (healthy, anomalous) pairs, 3 are ranked correctly -> 0.75.
    # Thresholds: 0.8 -> F1 2/3; 0.4 -> 0.5; 0.35 -> P 2/3, R 1, F1 0.8; 0.1 -> 2/3. Best 0.8 at 0.35,
    # where predictions [0, 1, 1, 1] vs truth [0, 0, 1, 1] give accuracy 0.75.
    r = M.image_level(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert r.auroc == pytest.approx(0.75)
    assert r.best_f1 == pytest.approx(0.8)
    assert r.threshold == pytest.approx(0.35)
    assert r.accuracy == pytest.approx(0.75)


def test_image_level_perfect_and_invalid():
    r = M.image_level([0, 0, 1, 1, 1], [0.1, 0.2, 0.7, 0.8, 0.9])
    assert (r.auroc, r.best_f1, r.accuracy, r.threshold) == (1.0, 1.0, 1.0, 0.7)
    with pytest.raises(ValueError, match="both healthy and anomalous"):
        M.image_level([1, 1], [0.3, 0.4])
    with pytest.raises(ValueError, match="differ in length"):
        M.image_level([0, 1], [0.3])


def test_dice_iou_hand_case():
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 pixels
    truth[0, 2:4] = True  # 2 pixels, 1 shared
    assert M.dice(pred, truth) == pytest.approx(2 * 1 / 5)
    assert M.iou(pred, truth) == pytest.approx(1 / 4)
    empty = np.zeros((4, 4), bool)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(pred, empty) == 0.0


def test_pixel_level_and_table_hand_case():
    truth = np.zeros((2, 2, 2), bool)
    truth[0] = [[1, 0], [1, 0]]  # slice 0 unhealthy, slice 1 healthy
    pred = np.zeros_like(truth)
    pred[0] = [[1, 1], [0, 0]]  # dice 2*1/4 = 0.5, iou 1/3
    maps = np.zeros((2, 2, 2))
    maps[0] = [[0.9, 0.8], [0.7, 0.1]]
    maps[1] = [[0.05, 0.05], [0.05, 0.05]]
    fg = np.ones_like(truth)
    fg[1] = False  # only slice 0 counts for AUPRC
    # ranking of slice-0 pixels: 0.9 (pos) P=1 R=.5; 0.8 (neg); 0.7 (pos) P=2/3 R=1 -> AP = .5 + .5*2/3
    table = M.segmentation_table(pred, truth, maps, fg)
    assert table["mixed"].dice == pytest.approx((0.5 + 1.0) / 2)
    assert table["mixed"].iou == pytest.approx((1 / 3 + 1.0) / 2)
    assert table["mixed"].auprc == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert table["unhealthy"].dice == pytest.approx(0.5) and table["unhealthy"].n_slices == 1
    assert np.isnan(M.pixel_level(pred, truth).auprc)
    # the unhealthy setup can score other masks (the authors' ungated ones); mixed keeps pred
    ungated = pred.copy()
    ungated[0] = [[1, 0], [1, 0]]  # perfect on slice 0
    table = M.segmentation_table(pred, truth, maps, fg, unhealthy_masks=ungated)
    assert table["unhealthy"].dice == pytest.approx(1.0)
    assert table["mixed"].dice == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        M.segmentation_table(pred, truth, unhealthy_masks=ungated[:1])


def test_slice_references_hand_case():
    """Brain area = pixels above the background; the percentile is taken over brain pixels only."""
    x = np.full((2, 1, 10, 10), -1.0, np.float32)
    x[0, 0, :5] = 0.0  # half the slice is brain, all at 0
    x[1, 0, :2] = np.linspace(-0.5, 0.5, 20).reshape(2, 10)  # a fifth, intensities spread
    ref = M.slice_references(x, percentile=100)
    assert np.allclose(ref["brain area"], [0.5, 0.2])
    assert np.allclose(ref["FLAIR p100"], [0.0, 0.5])  # the background's -1 never counts
    assert M.slice_references(np.full((1, 4, 4), -1.0))["FLAIR p99.9"][0] == -1.0  # no brain at all
