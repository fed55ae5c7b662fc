"""The tuned FLAIR-threshold bound (flair_reference.tuned_slice_threshold, used by evaluate_fpdm.py)."""

from __future__ import annotations

import numpy as np

from AnomalyDiffusionLib.flair_reference import tuned_slice_threshold
from AnomalyDiffusionLib.metrics import pixel_level


def test_tuned_threshold_separates_a_bright_lesion_and_stays_in_the_brain():
    rng = np.random.default_rng(0)
    flair = rng.uniform(-0.6, 0.2, (3, 32, 32))  # healthy tissue: [0.2, 0.6] on the [0, 1] scale
    truth = np.zeros(flair.shape, bool)
    truth[1, 10:16, 12:20] = True
    flair[truth] = 0.7  # lesion: 0.85
    brain = np.zeros(flair.shape, bool)
    brain[:, 4:28, 4:28] = True
    flair[:, :2] = 1.0  # bright outside the brain: never in the mask
    tau, maps, masks = tuned_slice_threshold(flair, brain, truth)
    assert 0.6 < tau <= 0.85
    assert pixel_level(masks, truth).dice == 1.0 and not (masks & ~brain).any()
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and (maps[~brain] == 0).all()
    # the candidates given are the only levels tried
    tau2, _, masks2 = tuned_slice_threshold(flair, brain, truth, taus=np.array([0.8, 0.95]))
    assert tau2 == 0.8 and (masks2 == masks).all()
