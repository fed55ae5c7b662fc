"""The real glioma case in ../shared/data (skipped when absent): read → canonical → slices → back."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AnomalyDiffusionLib import volumes as V
from AnomalyDiffusionLib.metrics import dice


def test_real_case_tumour_mask_lands_back_exactly(real_case):
    case = V.load_case({"flair": real_case / "TCGA-DU-7294_fla.nii.gz", "t2": real_case / "TCGA-DU-7294_t2.nii.gz"})
    seg_img = sitk.ReadImage(str(real_case / "TCGA-DU-7294_seg.nii.gz"))
    seg_file = sitk.GetArrayFromImage(seg_img)
    seg = V.read_labelmap_like(real_case / "TCGA-DU-7294_seg.nii.gz", case, "tumour mask")
    assert case.shape == (155, 240, 240)
    # documented extent: axial slices 93-132 hold tumour; label voxel counts 9,281 and 14,907
    ks = np.flatnonzero(seg.reshape(155, -1).any(1))
    assert (ks.min(), ks.max()) == (93, 132)
    assert (seg == 1).sum() == 9281 and (seg == 2).sum() == 14907

    # native-size slices: the labelmap comes back bit-exact on the original grid
    fit = V.PlaneFit.for_case(case, 240)
    idx = np.arange(155)
    back = V.reassemble(case, fit.to_model(seg[idx].astype(np.float32), "label"), idx, fit, kind="label")
    assert np.array_equal(sitk.GetArrayFromImage(back), seg_file.astype(np.uint8))
    for f in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, f)() == getattr(case.reference, f)()

    # through the 128×128 model space and back, the whole-tumour mask keeps its place
    images, idx, fit = V.case_slices(case, ("flair", "t2"), size=128)
    masks = fit.to_model((seg[idx] > 0).astype(np.float32), "mask")
    back = sitk.GetArrayFromImage(V.reassemble(case, masks, idx, fit, kind="label")) > 0
    assert dice(back, seg_file > 0) > 0.95
    assert images.shape == (155, 2, 128, 128) and images.min() >= -1 and images.max() <= 1
    # the tumour is hyperintense on normalised FLAIR
    flair = case.normalised(("flair",))[0]
    assert flair[seg > 0].mean() > flair[case.mask & (seg == 0)].mean() + 0.3
