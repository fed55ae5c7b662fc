"""Slice datasets: patient split, prepare_brats.py on a phantom BraTS folder, ATLAS discovery."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AnomalyDiffusionLib import datasets as D
from AnomalyDiffusionLib.errors import InputError
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject, write_brats_folder, write_case

ROOT = Path(__file__).resolve().parents[1]


def test_split_is_by_patient_complete_disjoint_and_seeded():
    subs = [f"P{i:03d}" for i in range(40)]
    a = D.split_subjects(subs, (0.75, 0.05, 0.20), seed=10)
    assert [len(a[k]) for k in ("train", "val", "test")] == [30, 2, 8]
    assert sorted(s for v in a.values() for s in v) == subs
    assert a == D.split_subjects(list(reversed(subs)), seed=10)
    assert a != D.split_subjects(subs, seed=11)
    small = D.split_subjects(["a", "b", "c"], (0.75, 0.05, 0.20))
    assert all(len(v) == 1 for v in small.values())
    with pytest.raises(ValueError, match="sum"):
        D.split_subjects(subs, (0.5, 0.2, 0.2))


@pytest.fixture(scope="module")
def brats_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    write_brats_folder(root, 4, seed=20, options=PhantomOptions(spacing=2.0), prefix="BraTS2021", healthy_fraction=0.25)
    return root


def test_prepare_brats_script_on_a_phantom_folder(brats_folder, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    argv = [
        "prepare_brats.py",
        "--data",
        str(brats_folder),
        "--out",
        str(out),
        "--split",
        "0.5,0.25,0.25",
        "--seed",
        "3",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "training" / "prepare_brats.py"), run_name="__main__")
    assert exit_info.value.code == 0
    summary = json.loads((out / "split.json").read_text())
    subjects = {k: set(v["subjects"]) for k, v in summary["splits"].items()}
    assert sum(len(v) for v in subjects.values()) == 4
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    total = 0
    for split in ("train", "val", "test"):
        ds = D.SliceDataset.load(out / split)
        total += len(ds)
        assert ds.images.shape[1:] == (4, 128, 128) and ds.images.dtype == np.float16
        assert ds.modalities == ("flair", "t1", "t1ce", "t2")
        assert ds.images.min() >= -1 and ds.images.max() <= 1
        assert set(ds.subjects) == subjects[split]
        # labels = "any lesion voxel in the slice", checked against the seg files directly
        for sub in set(ds.subjects):
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(brats_folder / sub / f"{sub}_seg.nii.gz")))
            flair = sitk.GetArrayFromImage(sitk.ReadImage(str(brats_folder / sub / f"{sub}_flair.nii.gz")))
            kept = (flair > 0).reshape(flair.shape[0], -1).mean(1) >= 0.01  # --min-brain-fraction default
            sel = np.array([s == sub for s in ds.subjects])
            assert {int(k) for k in ds.slices[sel]} == {int(k) for k in np.flatnonzero(kept)}
            expected = {int(k) for k in np.flatnonzero(seg.reshape(seg.shape[0], -1).any(1) & kept)}
            got = {int(k) for k in ds.slices[sel][ds.labels[sel] == 1]}
            assert got == expected  # phantom grids are identity-oriented: canonical k == file z
            assert not ds.masks[sel][ds.labels[sel] == 0].any()
    assert total == sum(v["slices"] for v in summary["splits"].values())
    assert not list(out.glob(".*partial"))


def test_prepare_with_slice_range_and_channel_subset(brats_folder, tmp_path):
    cases = D.find_brats_cases(brats_folder, ("flair", "t2"))
    summary = D.prepare_dataset(
        cases, tmp_path / "o", ("flair", "t2"), size=64, start=30, stop=50, fractions=(1.0, 0.0, 0.0)
    )
    ds = D.SliceDataset.load(tmp_path / "o" / "train", mmap=False)
    assert ds.images.shape[1:] == (2, 64, 64) and ds.slices.min() >= 30 and ds.slices.max() < 50
    assert summary["splits"]["val"]["slices"] == 0
    assert np.array_equal(ds.channels(("t2",))[:, 0], ds.images[:, 1])


def test_missing_modality_is_named(tmp_path, brats_folder):
    import shutil

    shutil.copytree(brats_folder, tmp_path / "b")
    (tmp_path / "b" / "BraTS2021_1" / "BraTS2021_1_t2.nii.gz").unlink()
    with pytest.raises(InputError, match="BraTS2021_1' lacks t2"):
        D.find_brats_cases(tmp_path / "b")
    with pytest.raises(InputError, match="no BraTS-style subjects"):
        D.find_brats_cases(tmp_path)


def test_atlas_layout_discovery_and_preparation(tmp_path):
    ph = make_subject(4, PhantomOptions(spacing=2.0, n_lesions=1, modalities=("t1",)))
    anat = tmp_path / "ATLAS_2" / "Training" / "R001" / "sub-r001s001" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    sitk.WriteImage(ph.images["t1"], str(anat / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"))
    sitk.WriteImage(
        sitk.Cast(ph.labels > 0, sitk.sitkUInt8),
        str(anat / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"),
    )
    cases = D.find_atlas_cases(tmp_path / "ATLAS_2")
    assert [c.subject for c in cases] == ["sub-r001s001_ses-1"] and cases[0].seg is not None
    D.prepare_dataset(cases, tmp_path / "atlas", ("t1",), fractions=(1.0, 0.0, 0.0))
    ds = D.SliceDataset.load(tmp_path / "atlas" / "train")
    assert ds.labels.sum() == int(ph.mask.reshape(ph.mask.shape[0], -1).any(1).sum())


def test_phantom_dataset_and_save_load_round_trip(tmp_path):
    ds = D.phantom_dataset(2, seed=30, size=64, healthy_fraction=0.5)
    assert set(ds.subjects) == {"phantom_30", "phantom_31"}
    sick = np.array([s == "phantom_30" for s in ds.subjects])
    assert ds.labels[sick].any() and not ds.labels[~sick].any()
    ds.save(tmp_path / "ds", dtype="float32")
    back = D.SliceDataset.load(tmp_path / "ds")
    assert np.array_equal(back.images, ds.images) and np.array_equal(back.masks, ds.masks)
    assert back.subjects == ds.subjects and np.array_equal(back.slices, ds.slices)
    assert back.meta["count"] == len(ds) and back.meta["unhealthy"] == int(ds.labels.sum())

    # an axial range picks the same slices from a prepared folder as from the phantom itself
    band = D.open_slices(tmp_path / "ds", "train", None, ("flair",), 64, start=30, stop=40)
    keep = (ds.slices >= 30) & (ds.slices < 40)
    assert np.array_equal(band.slices, ds.slices[keep])
    assert band.subjects == [s for s, k in zip(ds.subjects, keep, strict=True) if k]
    x, _ = D.load_or_make(None, "train", 2, ("flair",), 64, phantom_seed=30, healthy_fraction=0.5, start=30, stop=40)
    assert np.array_equal(x, np.asarray(ds.channels(("flair",)), np.float32)[keep])
    with pytest.raises(InputError, match="axial range 300:400"):
        D.open_slices(tmp_path / "ds", "train", None, ("flair",), 64, start=300, stop=400)


def test_write_case_int16_and_names(tmp_path):
    ph = make_subject(1, PhantomOptions(spacing=2.0, n_lesions=1, modalities=("flair",)))
    paths = write_case(ph, tmp_path, "X")
    assert paths["flair"].name == "X_flair.nii.gz"
    assert sitk.ReadImage(str(paths["flair"])).GetPixelID() == sitk.sitkInt16


def test_bmad_folder_is_read_back_to_intensity(tmp_path):
    """A BMAD-like folder rendered with the "bone" colormap: the reader recovers the grey levels
    (to 1/255) and the masks, with good = 0 and Ungood = 1."""
    from matplotlib import colormaps
    from PIL import Image

    rng = np.random.default_rng(0)
    greys = []
    for kind, n in (("good", 2), ("Ungood/img", 2)):
        (tmp_path / "test" / kind).mkdir(parents=True)
        for i in range(n):
            g = rng.integers(0, 256, (240, 240)).astype(np.float64) / 255
            greys.append(g)
            rgb = (colormaps["bone"](g)[..., :3] * 255).round().astype(np.uint8)
            Image.fromarray(rgb).save(tmp_path / "test" / kind / f"s{i}.png")
    (tmp_path / "test" / "Ungood" / "label").mkdir()
    lab = np.zeros((240, 240), np.uint8)
    lab[100:140, 60:120] = 255
    for i in range(2):
        Image.fromarray(lab).save(tmp_path / "test" / "Ungood" / "label" / f"s{i}.png")
    assert (
        np.abs(
            D.colormap_to_grey((colormaps["bone"](greys[0])[..., :3] * 255).round().astype(np.uint8)) - greys[0]
        ).max()
        <= 1 / 255 + 1e-9
    )
    ds = D.read_bmad(tmp_path, "test", size=240)
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.images.shape == (4, 1, 240, 240)
    assert np.abs((ds.images[0, 0] + 1) / 2 - greys[0]).max() <= 1 / 255 + 1e-6
    assert ds.masks[2].sum() == 40 * 60 and not ds.masks[0].any()
    with pytest.raises(InputError, match="no 'train/' split"):
        D.read_bmad(tmp_path, "train")
