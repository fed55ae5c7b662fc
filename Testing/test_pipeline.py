"""The detect pipeline and CLI: outputs, geometry, progress, cancellation and every bad input.

Plumbing tests use an untrained tiny bundle (results are meaningless, shapes and geometry are not);
the accuracy test runs the embedded default bundle against a phantom's ground truth.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_tiny_bundle

from AnomalyDiffusionLib import cli
from AnomalyDiffusionLib.errors import Cancelled, InputError
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject, write_case
from AnomalyDiffusionLib.pipeline import DetectOptions, detect, slice_positions
from AnomalyDiffusionLib.progress import CancelToken
from AnomalyDiffusionLib.volumes import load_case, read_labelmap_like

GEOMETRY = ("GetSize", "GetSpacing", "GetOrigin", "GetDirection")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory):
    """A small phantom on an oblique, axis-flipped, anisotropic (1.8 × 1.8 × 3.6 mm) grid, as NRRD."""
    ph = make_subject(
        11,
        PhantomOptions(
            spacing=2.0,
            n_lesions=1,
            modalities=("flair", "t2"),
            clinical_grid=True,
            clinical_spacing=(1.8, 1.8, 3.6),
        ),
    )
    return write_case(ph, tmp_path_factory.mktemp("case"), "obl", extension=".nrrd")


def test_detect_outputs_live_on_the_input_grid(tiny, oblique_case, tmp_path):
    stages = []
    result = detect(
        {"flair": oblique_case["flair"], "t2": oblique_case["t2"]},
        bundle=tiny,
        options=DetectOptions(device="cpu"),
        progress=lambda s, f, m: stages.append((s, f)),
    )
    ref = sitk.ReadImage(str(oblique_case["flair"]))
    assert ref.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1) and len(set(ref.GetSpacing())) > 1
    for img in (result.heatmap, result.labelmap):
        assert all(getattr(img, f)() == getattr(ref, f)() for f in GEOMETRY)
    seg = sitk.GetArrayFromImage(result.labelmap)
    assert set(np.unique(seg)) <= {0, 1}
    case = result.case
    canon = case.reorientation.to_canonical(seg) > 0
    assert not (canon & ~case.mask).any()  # never outside the brain
    # progress: stages in pipeline order, fractions within [0, 1], each stage ends at 1
    order = [s for i, (s, _) in enumerate(stages) if i == 0 or stages[i - 1][0] != s]
    assert order[0] == "reading" and order[-1] == "writing" and {"dode", "fpdm"} <= set(order)
    assert all(0.0 <= f <= 1.0 for _, f in stages)
    assert max(f for s, f in stages if s == "fpdm") == 1.0
    # the table: one row per analysed brain slice, the lesion area is the labelmap's
    assert len(result.rows) == result.summary["slices_analysed"] == len(result.indices)
    area = canon.reshape(canon.shape[0], -1).sum(1) * case.spacing[0] * case.spacing[1]
    for r in result.rows:
        assert r["lesion_area_mm2"] == pytest.approx(area[r["slice"]], abs=0.1)
        assert r["fpdm_ran"] and "dode_score" in r
    vol_ml = canon.sum() * np.prod(case.spacing) / 1000
    assert result.summary["lesion_volume_ml"] == pytest.approx(vol_ml, abs=1e-3)
    assert result.summary["pretrained_encoder"] is False  # the tiny bundle's encoder is random
    assert any("stride" in s for s in result.summary["shortcuts"])
    # the bundle's own settings are those it was calibrated with: no mismatch warning (the tiny bundle's
    # random-encoder AnoDODE may be called uninformative by the reliability check)
    assert all(w.startswith("results may be unreliable") for w in result.summary["warnings"])
    assert set(result.summary["reliability"]) == {"fpdm", "dode", "messages"}


def test_slice_positions_match_itk(oblique_case):
    """Oracle: mark canonical slice k, map the marker back to the original voxel order, and ask
    SimpleITK for the physical centre of those voxels."""
    case = load_case({"flair": oblique_case["flair"]})
    ref = case.reference
    for k in (0, case.shape[0] // 2, case.shape[0] - 1):
        marker = np.zeros(case.shape, np.uint8)
        marker[k] = 1
        orig = case.reorientation.from_canonical(marker)
        zyx = np.argwhere(orig > 0)
        centre = np.array(
            ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in ((zyx.min(0) + zyx.max(0)) / 2.0)[::-1]])
        )
        got = slice_positions(case, np.array([k]))[0]
        np.testing.assert_allclose(got, centre, atol=1e-6)


def test_cancel_stops_the_pipeline(tiny, oblique_case):
    token = CancelToken()

    def progress(stage, fraction, message):
        if stage == "fpdm" and fraction > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        detect(
            {"flair": oblique_case["flair"], "t2": oblique_case["t2"]},
            bundle=tiny,
            options=DetectOptions(device="cpu", methods=("fpdm",)),
            progress=progress,
            cancel=token,
        )


def test_cli_detect_writes_every_output_in_the_input_format(tiny, oblique_case, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    code = cli.main(
        [
            "--progress", "none", "detect", "--flair", str(oblique_case["flair"]), "--t2", str(oblique_case["t2"]),
            "--bundle", str(tiny), "--out", str(out), "--stride", "20", "--gap", "extrapolate", "--slices", "5:25",
        ]
    )  # fmt: skip
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["heatmap.nrrd", "overview.png", "segmentation.nrrd", "slices.csv", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    # the tiny bundle was calibrated at stride 10 with gap "jump": both overrides are named, once each
    # (a reliability line about its random-encoder AnoDODE may follow)
    assert len([w for w in summary["warnings"] if not w.startswith("results may be unreliable")]) == 2
    assert summary["warnings"][0].startswith("AnoFPDM stride 20 differs from the stride 10 the bundle was calibrated")
    assert "gap extrapolate differs from the gap jump" in summary["warnings"][1]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert err == [f"warning: {w}" for w in summary["warnings"]]
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "differs" in r.getMessage()]
    assert logged == summary["warnings"][:2]  # the library logs them too
    assert summary["method_details"]["fpdm"]["settings"]["stride"] == 20
    assert summary["method_details"]["fpdm"]["settings"]["gap"] == "extrapolate"
    assert summary["bundle"]["name"] == "tiny-test" and len(summary["bundle"]["sha256"]) == 64
    rows = list(csv.DictReader(open(out / "slices.csv")))
    assert [int(r["slice"]) for r in rows] == [r for r in range(5, 25) if str(r) in {x["slice"] for x in rows}]
    assert all(5 <= int(r["slice"]) < 25 for r in rows)
    ref = sitk.ReadImage(str(oblique_case["flair"]))
    for name in ("heatmap.nrrd", "segmentation.nrrd"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize()
        # NRRD stores direction × spacing; splitting it again on reading differs from the input's
        # own round trip in the last bit (the in-memory images are compared exactly above)
        for f in GEOMETRY[1:]:
            np.testing.assert_allclose(getattr(img, f)(), getattr(ref, f)(), rtol=0, atol=1e-12)


def test_cli_dode_only_writes_no_segmentation(tiny, oblique_case, tmp_path):
    out = tmp_path / "d"
    argv = ["--progress", "none", "detect", "--flair", str(oblique_case["flair"]), "--t2", str(oblique_case["t2"])]
    code = cli.main([*argv, "--bundle", str(tiny), "--out", str(out), "--methods", "dode", "--format", "nii.gz"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["overview.png", "slices.csv", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["lesion_volume_ml"] is None


# ------------------------------------------------------------------------------------ bad input
def _bad_inputs(tmp: Path, case: dict, tiny: Path) -> dict[str, tuple[list[str], str]]:
    flair, t2 = str(case["flair"]), str(case["t2"])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(flair))
    sitk.WriteImage(sitk.GetImageFromArray(arr[arr.shape[0] // 2]), str(tmp / "2d.nrrd"))
    four = sitk.JoinSeries([sitk.ReadImage(flair), sitk.ReadImage(flair)])
    sitk.WriteImage(four, str(tmp / "4d.nrrd"))
    nan = arr.astype(np.float32)
    nan[3, 3, 3] = np.nan
    img = sitk.GetImageFromArray(nan)
    img.CopyInformation(sitk.ReadImage(flair))
    sitk.WriteImage(img, str(tmp / "nan.nrrd"))
    far = sitk.ReadImage(t2)
    far.SetOrigin(tuple(o + 500.0 for o in far.GetOrigin()))
    sitk.WriteImage(far, str(tmp / "far_t2.nrrd"))
    (tmp / "garbage.nii.gz").write_bytes(b"not an image at all")
    tampered = tmp / "tampered"
    shutil.copytree(tiny, tampered)
    blob = bytearray((tampered / "models/fpdm.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (tampered / "models/fpdm.safetensors").write_bytes(bytes(blob))
    v2 = tmp / "v2"
    shutil.copytree(tiny, v2)
    m = json.loads((v2 / "manifest.json").read_text())
    m["format_version"] = "2.0"
    (v2 / "manifest.json").write_text(json.dumps(m))
    evil = tmp / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        for f in Path(tiny).iterdir():
            zf.write(f, f.name)
        zf.writestr("../../escape.txt", b"x")
    ok = ["--flair", flair, "--t2", t2, "--bundle", str(tiny)]
    return {
        "missing file": (["--flair", str(tmp / "nope.nii.gz"), "--t2", t2, "--bundle", str(tiny)], "not found"),
        "unreadable": (["--flair", str(tmp / "garbage.nii.gz"), "--t2", t2, "--bundle", str(tiny)], "cannot read"),
        "2D image": (["--flair", str(tmp / "2d.nrrd"), "--t2", t2, "--bundle", str(tiny)], "2D"),
        "4D image": (["--flair", str(tmp / "4d.nrrd"), "--t2", t2, "--bundle", str(tiny)], "4D"),
        "NaN": (["--flair", str(tmp / "nan.nrrd"), "--t2", t2, "--bundle", str(tiny)], "NaN"),
        "no overlap": (["--flair", flair, "--t2", str(tmp / "far_t2.nrrd"), "--bundle", str(tiny)], "overlap"),
        "tampered bundle": ([*ok[:4], "--bundle", str(tampered)], "sha256"),
        "bundle version": ([*ok[:4], "--bundle", str(v2)], "version 2.0"),
        "zip escape": ([*ok[:4], "--bundle", str(evil)], "outside the bundle"),
        "bad option": ([*ok, "--methods", "magic"], "--methods"),
    }


def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(tiny, oblique_case, tmp_path, capsys):
    cases = _bad_inputs(tmp_path, oblique_case, tiny)
    for what, (args, needle) in cases.items():
        out = tmp_path / f"out-{what.replace(' ', '_')}"
        code = cli.main(["--progress", "none", "detect", *args, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0, what
        assert len(err) == 1 and err[0].startswith("error: ") and needle.lower() in err[0].lower(), (what, err)
        assert not out.exists(), what


def test_with_bias_correction_the_refinement_thresholds_the_corrected_flair(tiny):
    """The refinement's FLAIR z-score (``DetectResult.refinement_flair_z``) is of the FLAIR the models
    saw. A steep left-right gain ramp (0.7 to 1.3) shifts the uncorrected z-score by the ramp (its
    change against the case without the ramp follows the ramp); with ``--bias-correction n4`` the
    z-scores of the case with and without the ramp agree (N4 divides the ramp out). Without correction
    the models saw the case as read (``source`` is None)."""
    ph = make_subject(12, PhantomOptions(spacing=2.0, n_lesions=0, modalities=("flair", "t2")))
    shape = sitk.GetArrayFromImage(ph.images["flair"]).shape
    ramp = np.broadcast_to(np.linspace(0.7, 1.3, shape[2], dtype=np.float32), shape)

    def with_gain(gain: np.ndarray) -> dict[str, sitk.Image]:
        out = {}
        for m in ("flair", "t2"):
            img = sitk.GetImageFromArray(sitk.GetArrayFromImage(ph.images[m]).astype(np.float32) * gain)
            img.CopyInformation(ph.images[m])
            out[m] = img
        return out

    opts = {"device": "cpu", "methods": ("fpdm",), "slice_range": (30, 32)}
    z = {}
    for mode in ("none", "n4"):
        for name, gain in (("flat", np.ones(shape, np.float32)), ("ramp", ramp)):
            res = detect(with_gain(gain), tiny, DetectOptions(bias_correction=mode, **opts))
            assert (res.source is None) == (mode == "none")
            z[mode, name] = res.refinement_flair_z()
    brain = res.case.mask
    canonical_ramp = res.case.reorientation.to_canonical(np.ascontiguousarray(ramp))[brain]

    def shift(mode: str) -> np.ndarray:
        return (z[mode, "ramp"] - z[mode, "flat"])[brain]

    assert np.corrcoef(shift("none"), canonical_ramp)[0, 1] > 0.8
    assert np.abs(shift("n4")).mean() < 0.3 * np.abs(shift("none")).mean()


def test_intensity_scaling_follows_the_bundle_the_flag_and_faithful(tiny, oblique_case, tmp_path):
    """Landmark standardisation needs the bundle's reference (a one-line error without it); with it, it
    is the bundle's default, it is what the models see (the images differ from the papers' scaling),
    summary.json records the case's landmarks beside the reference, and --faithful returns to the
    papers' 99th-percentile scaling. --bias-correction n4 is recorded with the field it removed and its
    N4 levels (the bundle's pipeline.bias_levels, or --bias-levels); off by default and under --faithful."""
    inputs = {"flair": oblique_case["flair"], "t2": oblique_case["t2"]}
    opts = {"device": "cpu", "methods": ("fpdm",), "slice_range": (28, 31)}
    with pytest.raises(InputError, match=r"no intensity reference.*--intensity percentile"):
        detect(inputs, tiny, DetectOptions(intensity="landmarks", **opts))
    ref = tmp_path / "ref"
    shutil.copytree(tiny, ref)
    m = json.loads((ref / "manifest.json").read_text())
    m["intensity_reference"] = {
        "percentiles": [10, 25, 50, 75],
        "modalities": {"flair": [0.2, 0.3, 0.4, 0.5], "t2": [0.3, 0.4, 0.5, 0.6]},
        "data": "test",
    }
    m.setdefault("pipeline", {})["intensity"] = "landmarks"
    (ref / "manifest.json").write_text(json.dumps(m))
    got = detect(inputs, ref, DetectOptions(**opts))
    paper = detect(inputs, ref, DetectOptions(intensity="percentile", **opts))
    faithful = detect(inputs, ref, DetectOptions(faithful=True, bias_correction="n4", **opts))
    n4 = detect(inputs, ref, DetectOptions(bias_correction="n4", **opts))
    assert (
        n4.summary["bias_correction"]["method"] == "n4"
        and len(n4.summary["bias_correction"]["t2"]["field_p5_p95"]) == 2
    )
    assert faithful.summary["bias_correction"] == {"method": "none"} == got.summary["bias_correction"]
    assert n4.summary["bias_correction"]["levels"] == 3  # the library's when the bundle names none
    m["pipeline"].update(bias_correction="n4", bias_levels=4)
    (ref / "manifest.json").write_text(json.dumps(m))
    fine = detect(inputs, ref, DetectOptions(**opts))
    coarse = detect(inputs, ref, DetectOptions(bias_levels=2, **opts))
    assert (fine.summary["bias_correction"]["levels"], coarse.summary["bias_correction"]["levels"]) == (4, 2)
    assert got.summary["intensity"]["mode"] == "landmarks"
    assert got.summary["intensity"]["reference"]["flair"] == [0.2, 0.3, 0.4, 0.5]
    assert len(got.summary["intensity"]["case"]["t2"]) == 4
    assert paper.summary["intensity"] == {"mode": "percentile"} == faithful.summary["intensity"]
    np.testing.assert_array_equal(paper.model_images, faithful.model_images)
    brain = paper.model_images > -1
    assert np.abs(got.model_images - paper.model_images)[brain].mean() > 0.05


def test_a_brain_framed_bundle_frames_anofpdm_only_and_maps_back_to_the_input_grid(tiny, oblique_case, tmp_path):
    """A bundle with ``slice_fov_mm`` frames the brain at that physical size for AnoFPDM: its model
    slices show the brain larger than over the scanner's whole field of view, outputs still land on the
    input grid inside the brain, and AnoDODE (trained over the whole field) scores exactly as before."""
    inputs = {"flair": oblique_case["flair"], "t2": oblique_case["t2"]}
    opts = DetectOptions(device="cpu", methods=("fpdm", "dode"), slice_range=(26, 32), seed=3)
    framed = tmp_path / "framed"
    shutil.copytree(tiny, framed)
    m = json.loads((framed / "manifest.json").read_text())
    m["slice_fov_mm"] = 150.0
    (framed / "manifest.json").write_text(json.dumps(m))
    whole, got = detect(inputs, tiny, opts), detect(inputs, framed, opts)
    case = got.case
    side_mm = np.array(got.fit.padded_shape) * np.array([case.spacing[1], case.spacing[0]])
    assert side_mm.min() >= 150.0 - 2 * max(case.spacing[:2])  # a physical square box, not the scanner's field
    brain_px = [int((r.model_images[:, 0] > -0.95).sum()) for r in (whole, got)]
    assert brain_px[1] > 1.2 * brain_px[0]
    ref = sitk.ReadImage(str(oblique_case["flair"]))
    for img in (got.heatmap, got.labelmap):
        assert all(getattr(img, f)() == getattr(ref, f)() for f in GEOMETRY)
    canon = case.reorientation.to_canonical(sitk.GetArrayFromImage(got.labelmap)) > 0
    assert not (canon & ~case.mask).any()
    assert [r["dode_score"] for r in got.rows] == [r["dode_score"] for r in whole.rows]


# ------------------------------------------------------------------------ the embedded bundle
@pytest.fixture(scope="module")
def default_run(oblique_case):
    """The embedded bundle with its default settings on the oblique phantom, and its truth mask."""
    result = detect({"flair": oblique_case["flair"], "t2": oblique_case["t2"]}, options=DetectOptions(device="cpu"))
    return result, read_labelmap_like(oblique_case["seg"], result.case) > 0


def _margin(result, truth) -> float:
    """A trivial segmentation of the same volume placed uniformly in the brain scores ≈ lesion/brain;
    a mask must beat max(0.4, 3 × that)."""
    return max(0.4, 3 * 2 * truth.sum() / (truth.sum() + result.case.mask.sum()))


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="bundle 3.6's papers' decision (--calibration bundle, not the default) flags 3 of the 17 lesion "
    "slices here: DICE 0.18 (3.5: 0.42, 6 slices); 3.7 (the same weights with N4) still fails; its cosine "
    "threshold and M_max were recalibrated on framed slices but not re-chosen for this decision (issue 15 "
    "closing note)",
)
def test_default_bundle_model_finds_the_lesion_on_an_oblique_anisotropic_phantom(default_run, oblique_case):
    """End to end with the embedded bundle against the phantom's own mask (not a stored output): the
    outputs keep the input geometry, and the model's map, decided by the papers' rule (the
    ``bundle`` decision, computed in the same run), finds the lesion. Measured: bundle 3.0 0.45, 2.1
    0.55, 3.5 0.42, 3.6 0.18 (an expected failure, strict: it must be looked at when it passes);
    trivial 0.12."""
    from AnomalyDiffusionLib.metrics import dice
    from AnomalyDiffusionLib.pipeline import labelmap_from_model

    result, truth = default_run
    _, lab = labelmap_from_model(result.case, result.extras["fpdm_model_masks"]["bundle"], result.indices, result.fit)
    d = dice(lab > 0, truth)
    assert d > _margin(result, truth), (d, _margin(result, truth))
    ref = sitk.ReadImage(str(oblique_case["flair"]))
    assert all(getattr(result.labelmap, f)() == getattr(ref, f)() for f in GEOMETRY)


@pytest.mark.slow
def test_default_decision_finds_the_lesion_on_an_oblique_anisotropic_phantom(default_run, oblique_case):
    """The default (volume) decision on the same run. Bundles 3.0 to 3.2 found nothing here (the map
    never reached z 32; DICE 0.0, an expected failure until 2026-12-04); bundle 3.3's standardised
    inputs find the lesion (passed 2026-12-04, growth 2 and 3 alike)."""
    from AnomalyDiffusionLib.metrics import dice

    result, truth = default_run
    pred = result.case.reorientation.to_canonical(sitk.GetArrayFromImage(result.labelmap)) > 0
    lesion = np.flatnonzero(truth.any((1, 2)))
    found = result.summary["lesion_slices"]
    assert found is not None and found[0] <= lesion.max() and found[1] >= lesion.min()
    d = dice(pred, truth)
    assert d > _margin(result, truth), (d, _margin(result, truth))
    ref = sitk.ReadImage(str(oblique_case["flair"]))
    assert all(getattr(result.labelmap, f)() == getattr(ref, f)() for f in GEOMETRY)


@pytest.mark.slow
def test_default_bundle_dode_bpd_does_not_depend_on_the_seed(oblique_case):
    """Issue 19: the probe noise of the per-slice AnoDODE bpd is controlled. Two seeds draw other
    Hutchinson probes; with the bundle's probe count the bpd of every slice agrees within 0.01. On the
    papers' intensity scaling, which AnoDODE was trained on: with bundle 3.3's default landmark
    standardisation the largest difference here was 0.0104 (measured 2026-12-04)."""
    runs = [
        detect(
            {"flair": oblique_case["flair"], "t2": oblique_case["t2"]},
            options=DetectOptions(
                device="cpu", methods=("dode",), slice_range=(20, 30), seed=seed, intensity="percentile"
            ),
        )
        for seed in (0, 1)
    ]
    cols = [c for c in runs[0].rows[0] if c.startswith("dode_bpd_")]
    a = np.array([[r[c] for c in cols] for r in runs[0].rows])
    b = np.array([[r[c] for c in cols] for r in runs[1].rows])
    assert a.shape == b.shape and len(a) >= 5
    assert np.abs(a - b).max() < 0.01, np.abs(a - b).max()


def test_refinement_redraws_the_mask_from_the_flair_near_the_models_finding(tiny, oblique_case, tmp_path):
    """With the bundle's FLAIR refinement the written labelmap is exactly the FLAIR-bright voxels
    (robust z above the level) within the reach of the model's own mask and connected to it;
    summary.json records both volumes; --refine none and --faithful write the model's mask."""
    from scipy import ndimage

    from AnomalyDiffusionLib.flair_reference import flair_zscore

    inputs = {"flair": oblique_case["flair"], "t2": oblique_case["t2"]}
    opts = {"device": "cpu", "methods": ("fpdm",), "slice_range": (27, 32), "calibration": "volume"}
    ref = tmp_path / "ref"
    shutil.copytree(tiny, ref)
    m = json.loads((ref / "manifest.json").read_text())
    # an untrained model's map, thresholded low: a finding to refine
    m.setdefault("pipeline", {}).update(volume_z=1.0, refine="flair", refine_flair_z=0.5, refine_reach_mm=4.0)
    (ref / "manifest.json").write_text(json.dumps(m))
    plain = detect(inputs, ref, DetectOptions(refine="none", **opts))
    refined = detect(inputs, ref, DetectOptions(**opts))
    faithful = detect(inputs, ref, DetectOptions(faithful=True, **opts))
    case = refined.case
    model = case.reorientation.to_canonical(sitk.GetArrayFromImage(plain.labelmap)) > 0
    got = case.reorientation.to_canonical(sitk.GetArrayFromImage(refined.labelmap)) > 0
    assert model.sum() > 0 and got.sum() > 0 and not np.array_equal(got, model)
    z = flair_zscore(case.arrays["flair"], case.mask)
    sx, sy, sz = case.spacing
    near = ndimage.distance_transform_edt(~model, sampling=(sz, sy, sx)) <= 4.0
    assert not (got & ~((z > 0.5) & near)).any()  # nothing dull, nothing out of reach
    lab, _ = ndimage.label(got, structure=np.ones((3, 3, 3), bool))
    assert set(np.unique(lab[got])) <= set(np.unique(lab[got & model]))  # every component touches a finding
    info = refined.summary["refinement"]
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    assert info["method"] == "flair" and info["flair_z"] == 0.5 and info["reach_mm"] == 4.0
    assert info["model_ml"] == pytest.approx(model.sum() * voxel_ml, abs=1e-3)
    assert info["refined_ml"] == pytest.approx(got.sum() * voxel_ml, abs=1e-3) == refined.summary["lesion_volume_ml"]
    assert plain.summary["refinement"] == {"method": "none"} == faithful.summary["refinement"]
