"""Volume I/O, canonical orientation, alignment, normalisation, slicing and reassembly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import head, image

from AnomalyDiffusionLib import volumes as V
from AnomalyDiffusionLib.errors import GeometryError, InputError
from AnomalyDiffusionLib.phantom import oblique_direction


def signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for col, row in enumerate(perm):
                d[row, col] = signs[col]
            yield d


# ------------------------------------------------------------------------------------ reading
def test_read_rejects_bad_inputs_with_one_clear_message(tmp_path):
    with pytest.raises(InputError, match="FLAIR file not found"):
        V.read_volume(tmp_path / "missing.nii.gz", "FLAIR")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read FLAIR file"):
        V.read_volume(garbage, "FLAIR")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="cannot read"):
        V.read_volume(empty, "T2")

    sitk.WriteImage(
        sitk.GetImageFromArray(np.random.default_rng(0).random((10, 12)).astype(np.float32)),
        str(tmp_path / "2d.nii.gz"),
    )
    with pytest.raises(InputError, match="2-D"):
        V.read_volume(tmp_path / "2d.nii.gz", "FLAIR")

    sitk.WriteImage(sitk.JoinSeries([image(head((5, 6, 7), seed=s)) for s in range(3)]), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(InputError, match="4-D"):
        V.read_volume(tmp_path / "4d.nii.gz", "FLAIR")

    vec = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="components per voxel"):
        V.read_volume(tmp_path / "rgb.nrrd", "FLAIR")

    for bad, name in ((np.nan, "nan"), (np.inf, "inf")):
        a = head()
        a[3, 4, 5] = bad
        sitk.WriteImage(image(a), str(tmp_path / f"{name}.mha"))
        with pytest.raises(InputError, match="1 NaN/Inf voxels"):
            V.read_volume(tmp_path / f"{name}.mha", "FLAIR")

    for value in (0.0, 7.0):
        sitk.WriteImage(image(np.full((6, 7, 8), value, np.float32)), str(tmp_path / "const.nrrd"))
        with pytest.raises(InputError, match="constant"):
            V.read_volume(tmp_path / "const.nrrd", "T2")

    sitk.WriteImage(image(head()), str(tmp_path / "ok.nii.gz"))
    with pytest.raises(InputError, match="voxels, more than"):
        V.read_volume(tmp_path / "ok.nii.gz", "FLAIR", max_voxels=1000)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_read_round_trip_keeps_values_and_geometry(tmp_path, ext):
    d = oblique_direction((5, 10, -20), flip=(1,))
    img = image(head(), spacing=(0.9, 1.1, 3.0), origin=(-12.5, 30.25, 7.0), direction=d)
    path = V.write_volume(img, tmp_path / f"vol{ext}")
    back = V.read_volume(path, "vol")
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert np.allclose(back.GetSpacing(), img.GetSpacing()) and np.allclose(
        back.GetOrigin(), img.GetOrigin(), atol=1e-4
    )
    assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vol{ext}"]  # no temporary left behind


def test_single_frame_4d_is_accepted_as_3d():
    img = sitk.JoinSeries([image(head())])
    assert img.GetDimension() == 4
    out = V.check_volume(img)
    assert out.GetDimension() == 3 and np.array_equal(sitk.GetArrayFromImage(out), head())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(V.sitk, "WriteImage", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        V.write_volume(image(head()), tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="unsupported output extension"):
        V.write_volume(image(head()), tmp_path / "out.png")


# -------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize(
    "direction", list(signed_permutations()), ids=lambda d: "".join(f"{int(v):+d}" for v in d.ravel())
)
def test_canonical_orientation_matches_simpleitk_dicomorient(direction):
    """Oracle: SimpleITK's own DICOMOrient to LPS, for all 48 axis permutations and flips."""
    img = image(head((6, 7, 8)), spacing=(0.7, 1.3, 2.9), origin=(10.0, -20.0, 5.5), direction=direction)
    ours, reo = V.to_canonical(img)
    theirs = sitk.DICOMOrient(img, "LPS")
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
    assert np.allclose(ours.GetSpacing(), theirs.GetSpacing())
    assert np.allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-9)
    assert np.allclose(ours.GetDirection(), np.eye(3).ravel())
    arr = sitk.GetArrayFromImage(img)
    assert np.array_equal(reo.from_canonical(reo.to_canonical(arr)), arr)


@pytest.mark.parametrize("angles", [(0, 0, 30), (20, -15, 40), (0, 0, 44)])
def test_canonical_orientation_of_oblique_volumes_matches_simpleitk(angles):
    img = image(head((6, 7, 8)), spacing=(1.0, 1.2, 2.5), direction=oblique_direction(angles, flip=(0,)))
    ours, _ = V.to_canonical(img)
    theirs = sitk.DICOMOrient(img, "LPS")
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
    assert np.allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-9)
    assert np.allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-12)


def test_flipped_direction_matrix_gives_identical_axial_slices():
    """The same physical voxels stored with x and z reversed (direction diag(-1, 1, -1), origin at the
    far corner) must give exactly the same canonical slices."""
    a = head()
    img = image(a, spacing=(1.0, 1.5, 3.0), origin=(0.0, 0.0, 0.0))
    flipped_arr = a[::-1, :, ::-1].copy()
    far = img.TransformIndexToPhysicalPoint((a.shape[2] - 1, 0, a.shape[0] - 1))
    flipped = image(flipped_arr, spacing=(1.0, 1.5, 3.0), origin=far, direction=np.diag([-1.0, 1.0, -1.0]))
    # same physical position of one voxel in both
    assert np.allclose(
        img.TransformIndexToPhysicalPoint((2, 3, 4)),
        flipped.TransformIndexToPhysicalPoint((a.shape[2] - 3, 3, a.shape[0] - 5)),
    )
    c1 = V.case_from_images({"flair": img})
    c2 = V.case_from_images({"flair": flipped})
    assert np.array_equal(c1.arrays["flair"], c2.arrays["flair"])
    for k in range(a.shape[0]):
        assert np.array_equal(c1.arrays["flair"][k], c2.arrays["flair"][k])


def test_canonical_axial_slice_is_superior_and_radiological():
    """Canonical index k grows towards Superior; rows grow Posterior; columns grow to patient Left."""
    a = np.zeros((5, 6, 7), np.float32)
    a[4, 0, 0] = 1  # RAS-stored volume: index (x=0,y=0,z=4) ...
    ras = image(a + 1e-3, direction=np.diag([-1.0, -1.0, 1.0]), origin=(50.0, 60.0, 0.0))
    canon, _ = V.to_canonical(ras)
    arr = sitk.GetArrayFromImage(canon)
    k, r, c = np.unravel_index(np.argmax(arr), arr.shape)
    p = np.array(canon.TransformIndexToPhysicalPoint((int(c), int(r), int(k))))
    assert np.allclose(p, ras.TransformIndexToPhysicalPoint((0, 0, 4)))
    # moving one index along each canonical numpy axis moves +S, +P, +L in LPS
    o = np.array(canon.TransformIndexToPhysicalPoint((0, 0, 0)))
    assert np.allclose(np.array(canon.TransformIndexToPhysicalPoint((0, 0, 1))) - o, [0, 0, 1])
    assert np.allclose(np.array(canon.TransformIndexToPhysicalPoint((0, 1, 0))) - o, [0, 1, 0])
    assert np.allclose(np.array(canon.TransformIndexToPhysicalPoint((1, 0, 0))) - o, [1, 0, 0])


# ---------------------------------------------------------------------------------- alignment
def cube_image(spacing, origin, direction=None, shape=(40, 48, 56), centre_mm=(20.0, 24.0, 18.0), half_mm=6.0):
    """Image whose bright cube sits at a known physical place, whatever the grid."""
    ref = image(np.zeros(shape, np.float32), spacing, origin, direction)
    z, y, x = np.indices(shape)
    pts = np.stack([x, y, z], -1).reshape(-1, 3).astype(float)
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    phys = (pts * np.asarray(spacing)) @ d.T + np.asarray(origin)
    inside = np.all(np.abs(phys - np.asarray(centre_mm)) <= half_mm, axis=1).reshape(shape)
    brain = np.all(np.abs(phys - np.asarray(centre_mm)) <= 18.0, axis=1).reshape(shape)
    arr = (brain * 100.0 + inside * 400.0).astype(np.float32)
    return image(arr, spacing, origin, direction)


def test_t2_on_a_different_grid_is_aligned_to_flair():
    flair = cube_image((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    # other spacing, shifted origin, x axis flipped (origin on the far side so the field covers the cube)
    t2 = cube_image((1.5, 0.8, 2.0), (60.0, -4.1, -3.0), direction=np.diag([-1.0, 1.0, 1.0]), shape=(30, 70, 50))
    case = V.case_from_images({"flair": flair, "t2": t2})
    f, t = case.arrays["flair"] > 250, case.arrays["t2"] > 250
    assert t.sum() > 0.5 * f.sum()
    assert np.allclose(np.argwhere(f).mean(0), np.argwhere(t).mean(0), atol=0.6)
    inter = (f & t).sum() / f.sum()
    assert inter > 0.75


def test_non_overlapping_t2_is_refused():
    flair = cube_image((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    far = cube_image((1.0, 1.0, 1.0), (500.0, 0.0, 0.0), centre_mm=(520.0, 24.0, 18.0))
    with pytest.raises(GeometryError, match="do not overlap"):
        V.case_from_images({"flair": flair, "t2": far})
    partial = cube_image((1.0, 1.0, 1.0), (30.0, 0.0, 0.0), centre_mm=(50.0, 24.0, 18.0))
    with pytest.raises(GeometryError, match="covers only"):
        V.case_from_images({"flair": flair, "t2": partial})


def test_case_arrays_own_their_memory():
    """Regression: a same-grid T2 once kept a view into a freed SimpleITK buffer (segfault later)."""
    img = image(head(), spacing=(1.0, 1.0, 2.0))
    t2 = image(head(seed=3), spacing=(1.0, 1.0, 2.0))
    case = V.case_from_images({"flair": img, "t2": t2})
    del t2
    import gc

    gc.collect()
    assert all(a.flags.owndata for a in case.arrays.values())
    assert np.array_equal(case.arrays["t2"], head(seed=3))


def test_load_case_reports_missing_modality(tmp_path):
    V.write_volume(image(head()), tmp_path / "flair.nii.gz")
    with pytest.raises(InputError, match="T2 file not found"):
        V.load_case({"flair": tmp_path / "flair.nii.gz", "t2": tmp_path / "t2.nii.gz"})


# ---------------------------------------------------------------------------- normalisation
def test_normalisation_matches_its_definition():
    """Foreground values 1..100: the 99th percentile (linear) is 1 + 0.99·99 = 99.01."""
    arr = np.zeros((2, 10, 10), np.float32)
    arr[0] = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    mask = arr > 0
    out = V.normalise(arr, mask)
    expected = 2 * np.clip(arr / 99.01, 0, 1) - 1
    assert np.allclose(out[mask], expected[mask], atol=1e-6)
    assert np.all(out[~mask] == -1.0)
    assert out.max() == 1.0 and out[0, 9, 9] == 1.0 and np.isclose(out[0, 0, 0], 2 / 99.01 - 1)


def test_brain_mask_zero_background_and_otsu():
    a = head()
    assert np.array_equal(V.brain_mask(a), a > 0)
    rng = np.random.default_rng(1)
    noisy = a + rng.normal(20, 2, a.shape).astype(np.float32)  # no exact background any more
    m = V.brain_mask(noisy)
    assert (m == (a > 0)).mean() > 0.97
    with pytest.raises(InputError):
        V.normalise(a, np.zeros_like(a, bool))


# ------------------------------------------------------------------------------------- slices
def test_slice_range_validation():
    assert list(V.slice_indices(10, 2, 5)) == [2, 3, 4]
    for s, e in ((-1, 5), (3, 11), (5, 5)):
        with pytest.raises(InputError, match="slice range"):
            V.slice_indices(10, s, e)


def test_plane_fit_pads_to_a_physically_square_field_of_view():
    fit = V.PlaneFit.for_slice((100, 60), (1.0, 1.0), 128)
    assert fit.pad == ((0, 0), (20, 20)) and fit.padded_shape == (100, 100)
    fit = V.PlaneFit.for_slice((100, 50), (1.0, 2.0), 64)  # 100 mm × 100 mm already
    assert fit.pad == ((0, 0), (0, 0))
    fit = V.PlaneFit.for_slice((64, 64), (1.0, 1.0), 64)
    x = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    assert np.array_equal(fit.to_model(x), x) and np.array_equal(fit.from_model(x), x)


def test_brain_framing_is_a_box_of_the_asked_side_centred_on_the_brain():
    brain = np.zeros((240, 200), bool)
    brain[40:200, 50:150] = True  # 160 × 100 mm at 1 mm, centred at row 120, column 100
    fit = V.PlaneFit.for_brain(brain, (1.0, 1.0), 64, 192.0, margin_mm=6.0)
    assert fit.padded_shape == (192, 192)
    (t, b), (left, r) = fit.pad
    assert (t, b) == (-24, -24)  # rows 24 … 215 kept: crops the scanner's field of view
    assert (left, r) == (-4, -4)  # columns 4 … 195
    # anisotropic pixels: the box is square in mm, and larger brains widen it by the margin
    brain = np.zeros((100, 300), bool)
    brain[5:95, 20:280] = True  # 90 × 2 mm = 180 mm by 260 × 0.8 mm = 208 mm
    fit = V.PlaneFit.for_brain(brain, (2.0, 0.8), 64, 192.0, margin_mm=6.0)
    assert fit.padded_shape[0] * 2.0 == pytest.approx(220.0, abs=2.0)  # 208 + 2 × 6 mm, not 192
    assert fit.padded_shape[1] * 0.8 == pytest.approx(220.0, abs=0.8)
    # no brain: the scanner's field of view
    assert V.PlaneFit.for_brain(np.zeros((50, 40), bool), (1.0, 1.0), 32, 192.0) == V.PlaneFit.for_slice(
        (50, 40), (1.0, 1.0), 32
    )


def test_brain_framing_keeps_every_brain_pixel_and_round_trips_masks():
    brain = np.zeros((240, 240), bool)
    brain[30:210, 60:180] = True
    fit = V.PlaneFit.for_brain(brain, (1.0, 1.0), 96, 192.0)  # 2 mm model pixels
    model = fit.to_model(brain[None].astype(np.float32), "mask")[0]
    assert model.sum() * 4 == brain.sum()  # 2 × 2 blocks, aligned: nothing lost at the box edge
    back = fit.from_model(model[None], "label")[0].astype(bool)
    assert back.shape == brain.shape and np.array_equal(back, brain)
    # a native pixel outside the box comes back 0 (the box crops), never a wrapped or stretched value
    ones = np.ones((1, 96, 96), np.float32)
    back = fit.from_model(ones, "image")[0]
    (t, _), (left, _) = fit.pad
    box = np.zeros(brain.shape, bool)
    box[-t : -t + 192, -left : -left + 192] = True
    assert t < 0 and left < 0 and back[~box].max() == 0 and back[box].min() == 1


def test_brain_framing_makes_the_model_slice_independent_of_the_scanners_field_of_view():
    """The same head acquired with a 240 mm and a 300 mm field of view (1 mm pixels): framed on the
    brain, the model sees the same slice; over the whole field of view, a differently sized brain."""
    rng = np.random.default_rng(0)
    head_2d = np.zeros((180, 150), np.float32)
    yy, xx = np.indices(head_2d.shape)
    inside = ((yy - 90) / 85.0) ** 2 + ((xx - 75) / 70.0) ** 2 < 1
    head_2d[inside] = 0.5 + 0.5 * rng.random(inside.sum())
    small, large = np.zeros((240, 240), np.float32), np.zeros((300, 300), np.float32)
    small[30:210, 45:195] = head_2d
    large[60:240, 75:225] = head_2d
    framed = [V.PlaneFit.for_brain(a > 0, (1.0, 1.0), 64, 192.0).to_model(a[None])[0] for a in (small, large)]
    assert np.allclose(framed[0], framed[1], atol=1e-6)
    whole = [V.PlaneFit.for_slice(a.shape, (1.0, 1.0), 64).to_model(a[None])[0] for a in (small, large)]
    assert (whole[0] > 0).sum() > 1.4 * (whole[1] > 0).sum()  # (300 / 240)² = 1.56 times the pixels


def test_downsampled_mask_round_trip_keeps_a_disk():
    yy, xx = np.indices((240, 240))
    disk = ((yy - 100) ** 2 + (xx - 130) ** 2 < 30**2).astype(np.float32)
    fit = V.PlaneFit.for_slice((240, 240), (1.0, 1.0), 128)
    back = fit.from_model(fit.to_model(disk[None], "mask"), "label")[0] > 0
    inter = (back & (disk > 0)).sum()
    assert 2 * inter / (back.sum() + disk.sum()) > 0.97


@pytest.mark.parametrize(
    ("direction", "spacing"),
    [
        (np.eye(3), (0.9, 0.9, 3.3)),
        (np.diag([-1.0, -1.0, 1.0]), (0.9, 0.9, 3.3)),
        (oblique_direction((15, -10, 25), flip=(0, 2)), (0.9, 0.9, 3.3)),
        # stored sagittally: file axes (x, y, z) point to (P, I, L), so the slice plane uses spacings 1 and 3
        (np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0.0]]), (0.9, 3.3, 0.9)),
    ],
    ids=["identity", "ras", "oblique-flipped", "sagittal-stored"],
)
def test_slice_reassemble_round_trip_is_exact(direction, spacing):
    """Anisotropic, oblique/flipped volumes: model-space round trip at native size is value-exact,
    and every output carries the input geometry bit for bit."""
    a = head((24, 30, 30))
    img = image(a, spacing=spacing, origin=(-3.25, 17.5, 101.0), direction=direction)
    case = V.case_from_images({"flair": img})
    assert case.spacing[0] == case.spacing[1] == 0.9 and case.spacing[2] == 3.3
    size = max(case.shape[1], case.shape[2])
    images, idx, fit = V.case_slices(case, size=size)
    heat = V.reassemble(case, images[:, 0], idx, fit, kind="image", fill=-1.0)
    expected = V.normalise(case.arrays["flair"], case.mask)
    assert np.array_equal(case.reorientation.to_canonical(sitk.GetArrayFromImage(heat)), expected)
    labels = (images[:, 0] > 0).astype(np.uint8)
    lab = V.reassemble(case, labels, idx, fit, kind="label")
    assert np.array_equal(case.reorientation.to_canonical(sitk.GetArrayFromImage(lab)), (expected > 0).astype(np.uint8))
    for out in (heat, lab):
        assert out.GetSize() == img.GetSize()
        assert out.GetSpacing() == img.GetSpacing()
        assert out.GetOrigin() == img.GetOrigin()
        assert out.GetDirection() == img.GetDirection()
    # a resized round trip keeps geometry exactly too
    images, idx, fit = V.case_slices(case, size=64, start=3, stop=20)
    heat = V.reassemble(case, images[:, 0], idx, fit)
    assert heat.GetOrigin() == img.GetOrigin() and heat.GetDirection() == img.GetDirection()
    assert heat.GetSpacing() == img.GetSpacing() and heat.GetSize() == img.GetSize()


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_outputs_written_to_file_carry_the_input_geometry_exactly(tmp_path, ext):
    """Formats that store doubles as text (NRRD, MetaImage) keep the copied geometry bit for bit."""
    d = oblique_direction((11, -4, 33), flip=(0,))
    V.write_volume(image(head(), spacing=(0.9, 0.9, 3.3), origin=(1.1, -2.3, 50.7), direction=d), tmp_path / f"in{ext}")
    case = V.load_case({"flair": tmp_path / f"in{ext}"})
    images, idx, fit = V.case_slices(case, size=32)
    V.write_volume(V.reassemble(case, images[:, 0] > 0, idx, fit, kind="label"), tmp_path / f"out{ext}")
    a, b = sitk.ReadImage(str(tmp_path / f"in{ext}")), sitk.ReadImage(str(tmp_path / f"out{ext}"))
    for f in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(a, f)() == getattr(b, f)()


def test_anisotropic_in_plane_spacing_keeps_geometry_and_shape():
    """0.9 × 3.3 mm in-plane pixels are padded to a physically square field, resized, and mapped back."""
    a = head((24, 30, 30))
    img = image(a, spacing=(3.3, 0.9, 0.9), origin=(1.0, 2.0, 3.0), direction=np.diag([1.0, -1.0, 1.0]))
    case = V.case_from_images({"flair": img})
    images, idx, fit = V.case_slices(case, size=32)
    assert fit.padded_shape[0] * 0.9 == pytest.approx(fit.padded_shape[1] * 3.3, abs=3.3)
    heat = V.reassemble(case, images[:, 0], idx, fit)
    back = case.reorientation.to_canonical(sitk.GetArrayFromImage(heat))
    expected = V.normalise(case.arrays["flair"], case.mask)
    assert np.corrcoef(back.ravel(), expected.ravel())[0, 1] > 0.85
    assert heat.GetOrigin() == img.GetOrigin() and heat.GetSpacing() == img.GetSpacing()
    assert heat.GetDirection() == img.GetDirection() and heat.GetSize() == img.GetSize()
