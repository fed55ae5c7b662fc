"""Model bundles: round trip, float16 storage, and every refusal (tamper, version, unsafe zip, schema)."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from conftest import make_tiny_bundle

from AnomalyDiffusionLib.bundle import FORMAT_VERSION, BundleError, open_bundle
from AnomalyDiffusionLib.dode.model import dode_from_bundle
from AnomalyDiffusionLib.fpdm.model import fpdm_from_bundle
from AnomalyDiffusionLib.methods import validate_manifest_sections


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny")


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_rebuilds_identical_networks(tmp_path):
    path = make_tiny_bundle(tmp_path / "b", seed=3)
    torch.manual_seed(3)  # make_tiny_bundle draws the FPDM UNet first from this seed
    from AnomalyDiffusionLib.nets import UNet, unet_config

    expected = UNet(unet_config("tiny", in_channels=2, image_size=32))
    b = open_bundle(path)
    unet, schedule, settings, cal = fpdm_from_bundle(b)
    assert _state_equal(unet, expected)
    assert (schedule.steps, schedule.beta_start, schedule.beta_end) == (1000, 1e-4, 0.02)
    assert settings.stride == 10 and cal.m_max == [0.1, 0.1] and cal.min_component == 0
    dm = dode_from_bundle(b)
    assert dm.scales == [64] and dm.spec.pretrained is False and dm.nets[0].config.in_channels == 192
    np.testing.assert_array_equal(dm.standardisers[0].std, np.ones(192))
    assert b.modalities == ["flair", "t2"] and b.slice_size == 32
    info = b.info()
    assert info["sha256"] == b.sha256 and len(b.sha256) == 64
    assert set(info["files"]) == {
        "models/fpdm.safetensors",
        "models/dode_encoder.safetensors",
        "models/dode_score_64.safetensors",
    }


def test_bundle_stands_in_for_a_weights_file(tmp_path, tiny):
    """The training/benchmark scripts' loader takes a bundle (folder or zip) and returns its AnoFPDM
    network with the bundle's modalities, settings and calibration; a tampered one is refused there too."""
    from AnomalyDiffusionLib.fpdm.model import load_unet_any

    unet, _, settings, cal = fpdm_from_bundle(open_bundle(tiny))
    for src in (tiny, make_tiny_bundle(tmp_path / "b.zip", as_zip=True)):
        model, meta = load_unet_any(src)
        assert _state_equal(model, unet) and meta["modalities"] == ["flair", "t2"]
        assert meta["bundle"]["calibration"] == cal.as_dict()
        assert meta["bundle"]["settings"] == settings.as_dict()
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "models/fpdm.safetensors").write_bytes(b"x" + (bad / "models/fpdm.safetensors").read_bytes()[1:])
    with pytest.raises(BundleError, match="sha256"):
        load_unet_any(bad)


def test_method_loaders_refuse_a_bundle_without_their_method_and_read_the_decoder(tmp_path):
    """The method-side loaders (the bundle module itself builds no network): each refuses a bundle
    that lacks its method or the optional AnoDODE decoder by name; the decoder round-trips."""
    from AnomalyDiffusionLib.bundle import write_bundle
    from AnomalyDiffusionLib.dode.manifest import section as dode_section
    from AnomalyDiffusionLib.dode.model import decoder_from_bundle
    from AnomalyDiffusionLib.nets import Decoder

    only_fpdm = open_bundle(make_tiny_bundle(tmp_path / "f", methods=("fpdm",)))
    only_dode = open_bundle(make_tiny_bundle(tmp_path / "d", methods=("dode",)))
    with pytest.raises(BundleError, match="no AnoDODE model"):
        dode_from_bundle(only_fpdm)
    with pytest.raises(BundleError, match="no AnoFPDM model"):
        fpdm_from_bundle(only_dode)
    with pytest.raises(BundleError, match="no AnoDODE localisation decoder"):
        decoder_from_bundle(only_dode)
    torch.manual_seed(1)
    dm = dode_from_bundle(only_dode)
    dec = Decoder(192, base=4, mults=(2, 1))
    sec, files = dode_section(
        dm, 5.0, only_dode.manifest["dode"]["likelihood"], decoder=dec, decoder_scale=64, decoder_settings={"steps": 7}
    )
    manifest = {k: v for k, v in only_dode.manifest.items() if k not in ("dode", "files")}
    with_dec = open_bundle(write_bundle(tmp_path / "dd", {**manifest, "dode": sec}, files))
    net, scale, settings = decoder_from_bundle(with_dec)
    assert scale == 64 and settings["steps"] == 7 and _state_equal(net, dec)


def test_float16_storage_halves_size_and_loads_as_float32(tmp_path):
    full = open_bundle(make_tiny_bundle(tmp_path / "f32", methods=("fpdm",)))
    half = open_bundle(make_tiny_bundle(tmp_path / "f16", methods=("fpdm",), dtype="float16"))
    assert half.info()["total_bytes"] < 0.6 * full.info()["total_bytes"]
    a = full.tensors("models/fpdm.safetensors")
    b = half.tensors("models/fpdm.safetensors")
    for k in a:
        assert b[k].dtype == a[k].dtype
        # float16 keeps 11 significant bits: relative rounding error ≤ 2^-11
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=2**-11, atol=6e-8)


def test_zip_forms_load(tmp_path, tiny):
    z1 = make_tiny_bundle(tmp_path / "b.zip", as_zip=True)
    assert open_bundle(z1).methods == ["fpdm", "dode"]
    # a zip of the folder itself (members under "tiny/")
    z2 = tmp_path / "folder.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        for f in tiny.rglob("*"):
            zf.write(f, f"tiny/{f.relative_to(tiny).as_posix()}")
    assert open_bundle(z2).sha256 == open_bundle(tiny).sha256


def test_tampered_file_is_refused(tmp_path, tiny):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    f = bad / "models/fpdm.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor's data: same size, different hash
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(bad)
    f.write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match="bytes"):
        open_bundle(bad)
    f.unlink()
    with pytest.raises(BundleError, match="lacks the file"):
        open_bundle(bad)


def _edit_manifest(src, dst, edit):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_versions(tmp_path, tiny):
    major = _edit_manifest(tiny, tmp_path / "v2", lambda m: m.update(format_version="2.0"))
    with pytest.raises(BundleError, match=r"version 2\.0 is not supported"):
        open_bundle(major)
    minor = _edit_manifest(tiny, tmp_path / "v1_9", lambda m: m.update(format_version="1.9", future_field=1))
    assert open_bundle(minor).name == "tiny-test"
    other = _edit_manifest(tiny, tmp_path / "other", lambda m: m.update(format="something-else"))
    with pytest.raises(BundleError, match="not an AnomalyDiffusion bundle"):
        open_bundle(other)


def test_zip_with_escaping_member_is_refused(tmp_path, tiny):
    for evil in ("../evil.txt", "/etc/evil", "a/../../evil"):
        z = tmp_path / f"evil{abs(hash(evil))}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for f in tiny.iterdir():
                zf.write(f, f.name)
            zf.writestr(evil, b"x")
        with pytest.raises(BundleError, match="outside the bundle"):
            open_bundle(z)


def test_manifest_file_entry_escaping_folder_is_refused(tmp_path, tiny):
    def edit(m):
        m["files"]["../x.safetensors"] = m["files"].pop("models/fpdm.safetensors")
        m["fpdm"]["weights"] = "../x.safetensors"

    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(_edit_manifest(tiny, tmp_path / "esc", edit))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("modalities"), "lacks 'modalities'"),
        (lambda m: m.update(slice_size="64"), "slice_size has the wrong type"),
        (lambda m: m.update(methods=["fpdm", "Magic!"]), r"methods\[1\]: 'Magic!' does not match"),
        (lambda m: m.update(methods=["fpdm", "fpdm"]), "methods: .* non-unique"),
        (lambda m: m.update(modalities=["flair", "pd"]), r"modalities\[1\]: 'pd' is not one of"),
        (lambda m: m.update(slice_size=True), "slice_size has the wrong type"),
        (
            lambda m: m["files"]["models/fpdm.safetensors"].update(sha256="abc"),
            r"files\['models/fpdm.safetensors'\].sha256",
        ),
        (lambda m: m.update(pipeline={"calibration": "magic"}), "pipeline.calibration: 'magic' is not one of"),
        (lambda m: m.update(pipeline={"volume_z": 4.0, "volume_grow_z": 6.0}), "volume_grow_z must not exceed"),
        (lambda m: m.update(pipeline={"volume_z": -1}), "pipeline.volume_z: -1 is less than or equal to"),
        (
            lambda m: m.update(pipeline={"volume_z": 32.0, "volume_seed_map_z": 8.0, "volume_seed_flair_z": 4.0}),
            "pipeline: 'volume_grow_z' is a dependency of 'volume_seed_map_z'",
        ),
        (
            lambda m: m.update(pipeline={"volume_z": 32.0, "volume_grow_z": 3.0, "volume_seed_flair_z": 4.0}),
            "pipeline: 'volume_seed_map_z' is a dependency of 'volume_seed_flair_z'",
        ),
        (
            lambda m: m.update(
                pipeline={"volume_z": 32.0, "volume_grow_z": 3.0, "volume_seed_map_z": 40.0, "volume_seed_flair_z": 4}
            ),
            "volume_seed_map_z must lie between pipeline.volume_grow_z and volume_z",
        ),
        (
            lambda m: m.update(
                pipeline={
                    "volume_z": 32.0,
                    "volume_grow_z": 3.0,
                    "volume_seed_map_z": 8.0,
                    "volume_seed_flair_z": 5.0,
                    "volume_flair_bias_px": 0,
                }
            ),
            "volume_flair_bias_px: 0 is less than or equal",
        ),
        (
            lambda m: m.update(pipeline={"volume_flair_bias_px": 8.0}),
            "'volume_seed_map_z' is a dependency of 'volume_flair_bias_px'",
        ),
        (lambda m: m.update(pipeline={"intensity": "landmarks"}), "'landmarks' needs an intensity_reference"),
        (lambda m: m.update(pipeline={"refine": "flair"}), "'flair' needs pipeline.refine_flair_z"),
        (
            lambda m: m.update(pipeline={"refine_flair_z": 2.0}),
            "'refine_reach_mm' is a dependency of 'refine_flair_z'",
        ),
        (
            lambda m: m.update(pipeline={"refine": "flair", "refine_flair_z": 2.0, "refine_reach_mm": -1}),
            "refine_reach_mm: -1 is less than the minimum",
        ),
        (lambda m: m.update(pipeline={"refine": "edges"}), "pipeline.refine: 'edges' is not one of"),
        (lambda m: m.update(pipeline={"volume_components": "3d"}), "pipeline.volume_components: '3d' is not one of"),
        (
            lambda m: m.update(pipeline={"refine_keep_flair_z": 1.0}),
            "'refine_flair_z' is a dependency of 'refine_keep_flair_z'",
        ),
        (
            lambda m: m.update(intensity_reference={"percentiles": [25, 50], "modalities": {"flair": [0.4, 0.6]}}),
            "intensity_reference has no landmarks for t2",
        ),
        (
            lambda m: m.update(
                intensity_reference={"percentiles": [25, 50], "modalities": {"flair": [0.6, 0.4], "t2": [0.3, 0.5]}}
            ),
            "intensity_reference: flair must be 2 increasing values",
        ),
        (
            lambda m: m.update(intensity_reference={"percentiles": [25, 50], "modalities": {"flair": [0.4, 1.2]}}),
            r"intensity_reference.modalities.flair\[1\]: 1.2 is greater than or equal to the maximum",
        ),
        (lambda m: m.update(methods=["fpdm", "magic"]), "method 'magic' has no 'magic' section"),
        (lambda m: m["fpdm"]["calibration"].pop("cos_threshold"), "fpdm.calibration lacks 'cos_threshold'"),
        (lambda m: m["fpdm"]["calibration"].update(cos_threshold=2), "cos_threshold: 2 is greater than the maximum"),
        (lambda m: m["fpdm"]["calibration"].update(w=float("nan")), "fpdm.calibration.w: nan is not a finite number"),
        (lambda m: m["fpdm"]["settings"].update(stride=0), "fpdm.settings.stride: 0 is less than the minimum"),
        (lambda m: m["fpdm"]["settings"].update(steps=5000), "fpdm.settings.steps: 5000 is greater"),
        (lambda m: m["fpdm"]["settings"].update(mode="euler"), "fpdm.settings.mode: 'euler' is not one of"),
        (lambda m: m["fpdm"]["settings"].update(map_channels=[0, 5]), "map_channels .* beyond the modalities"),
        (lambda m: m["fpdm"].update(network=None), "fpdm.network must be an object"),
        (lambda m: m["dode"]["score_networks"]["64"].update(feature_std=[0.0] * 40), r"feature_std\[\d+\]: 0.0 is"),
        (lambda m: m["dode"].update(scales=[16]), r"dode.scales\[0\]: 16 is less than the minimum of 32"),
        (lambda m: m["dode"]["score_networks"].pop("64"), "score_networks lacks '64'"),
        (lambda m: m["fpdm"]["calibration"].update(m_max=[0.1]), "m_max has 1 value"),
        (lambda m: m["dode"].update(modality="pd"), "dode.modality: 'pd' is not one of"),
        (lambda m: m.update(modalities=["t2", "t1"]), "dode.modality 'flair' is not among the modalities"),
        (lambda m: m["dode"]["score_networks"]["64"].update(feature_std=[1.0]), "standardisation"),
        (lambda m: m["fpdm"].update(weights="missing.safetensors"), "not listed under files"),
    ],
)
def test_schema_errors_name_the_problem(tiny, edit, message):
    m = json.loads((tiny / "manifest.json").read_text())
    edit(m)
    with pytest.raises(BundleError, match=message):
        validate_manifest_sections(m)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        open_bundle(tmp_path / "empty")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(BundleError, match="neither"):
        open_bundle(tmp_path / "junk.bin")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(bad)


def test_bundles_older_than_the_clamp_and_cosine_weighting_keep_their_behaviour(tmp_path, tiny):
    """A bundle written before clip_denoised / cosine_weighting / Calibration.settings existed was
    calibrated without the clamp and with uniform cosine weights: it is read that way, not with
    today's defaults. A new bundle stores all three."""
    from AnomalyDiffusionLib.fpdm import calibration_mismatches

    def strip(m):
        del m["fpdm"]["settings"]["clip_denoised"], m["fpdm"]["settings"]["cosine_weighting"]
        del m["fpdm"]["calibration"]["settings"]

    _, _, st, cal = fpdm_from_bundle(open_bundle(_edit_manifest(tiny, tmp_path / "old", strip)))
    assert st.clip_denoised is False and st.cosine_weighting == "uniform" and cal.settings is None
    _, _, st, cal = fpdm_from_bundle(open_bundle(tiny))
    assert st.clip_denoised is True and st.cosine_weighting == "spacing"
    assert cal.settings == st.calibration_dict()
    # the shipped bundle (2.0) was calibrated with the clamp and spacing weights, and says so; its
    # inference settings are those it was calibrated with
    shipped = open_bundle()
    _, _, st, cal = fpdm_from_bundle(shipped)
    assert st.clip_denoised is True and st.cosine_weighting == "spacing" and cal.settings is not None
    assert calibration_mismatches(st, cal, shipped.manifest["fpdm"].get("calibrated_stride")) == []


def test_make_bundle_from_a_bundle_keeps_weights_byte_for_byte_and_sets_the_pipeline(tmp_path, tiny):
    """training/make_bundle.py --from: new defaults and a changelog entry, the same weight bytes."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    out = tmp_path / "v2"
    argv = [sys.executable, str(script), "--from", str(tiny), "--out", str(out), "--calibration", "volume"]
    argv += ["--volume-z", "9", "--default-methods", "fpdm", "--default-methods-reason", "uninformative here"]
    argv += ["--version", "2.1.0", "--changelog", "volume calibration by default"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    old, new = open_bundle(tiny).manifest, open_bundle(out).manifest
    weights = {k: v["sha256"] for k, v in new["files"].items() if "dtype" in v}  # the card is new
    assert weights == {k: v["sha256"] for k, v in old["files"].items()}
    assert new["fpdm"] == old["fpdm"] and new["dode"] == old["dode"]
    assert new["pipeline"] == {
        "gate": "none",
        "calibration": "volume",
        "volume_z": 9.0,
        "default_methods": ["fpdm"],
        "default_methods_reason": "uninformative here",
    }
    assert new["changelog"][-1] == {"version": "2.1.0", "changes": ["volume calibration by default"]}
    # --fpdm with --from replaces AnoFPDM (section and weights) and keeps AnoDODE's bytes
    other = make_tiny_bundle(tmp_path / "other", methods=("fpdm",), seed=3)
    om = open_bundle(other).manifest["fpdm"]
    cal_file = tmp_path / "calibration_fpdm_ddim.json"
    cal_file.write_text(json.dumps({"settings": om["settings"], "calibration": om["calibration"]}))
    swap = tmp_path / "swap"
    argv2 = [sys.executable, str(script), "--from", str(tiny), "--out", str(swap)]
    done = subprocess.run([*argv2, "--fpdm", str(other), "--fpdm-calibration", str(cal_file)], capture_output=True)
    assert done.returncode == 0, done.stderr
    swapped = open_bundle(swap)
    sha = {k: v["sha256"] for k, v in swapped.manifest["files"].items()}
    assert sha["models/fpdm.safetensors"] == open_bundle(other).manifest["files"]["models/fpdm.safetensors"]["sha256"]
    assert sha["models/fpdm.safetensors"] != old["files"]["models/fpdm.safetensors"]["sha256"]
    kept = {k: v for k, v in sha.items() if k.startswith("models/dode_")}
    assert len(kept) == 2 and kept == {  # the same AnoDODE bytes
        k: v["sha256"] for k, v in old["files"].items() if k.startswith("models/dode_")
    }
    assert swapped.manifest["dode"] == old["dode"] and sorted(swapped.methods) == ["dode", "fpdm"]


def test_make_bundle_carries_the_anofpdm_models_framing(tmp_path, tiny):
    """``slice_fov_mm`` belongs to the AnoFPDM weights it was trained with: --fpdm takes it from them
    (or drops it, for weights trained over the whole field of view), --from keeps it."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    framed = _edit_manifest(
        make_tiny_bundle(tmp_path / "src", methods=("fpdm",), seed=3),
        tmp_path / "framed",
        lambda m: m.update(slice_fov_mm=150),
    )
    assert open_bundle(framed).slice_fov_mm == 150.0 and open_bundle(tiny).slice_fov_mm is None
    fm = open_bundle(framed).manifest["fpdm"]
    cal_file = tmp_path / "calibration_fpdm_ddim.json"
    cal_file.write_text(json.dumps({"settings": fm["settings"], "calibration": fm["calibration"]}))

    def make(out: str, *args: str) -> dict:
        done = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / out)], capture_output=True)
        assert done.returncode == 0, done.stderr
        return open_bundle(tmp_path / out).manifest

    assert (
        make("a", "--from", str(tiny), "--fpdm", str(framed), "--fpdm-calibration", str(cal_file))["slice_fov_mm"]
        == 150
    )
    assert make("b", "--from", str(tmp_path / "a"))["slice_fov_mm"] == 150
    unframed = tmp_path / "src"
    assert "slice_fov_mm" not in make(
        "c", "--from", str(tmp_path / "a"), "--fpdm", str(unframed), "--fpdm-calibration", str(cal_file)
    )


def test_make_bundle_writes_the_flair_assisted_seed_rule_and_refuses_it_out_of_order(tmp_path, tiny):
    """--volume-seed MAP_Z FLAIR_Z lands in the pipeline block with --volume-flair-bias-px; a map level
    outside [--volume-grow-z, --volume-z], or no growth at all, is refused before anything is written."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    base = [sys.executable, str(script), "--from", str(tiny), "--calibration", "volume", "--volume-z", "32"]
    out = tmp_path / "seeded"
    argv = [*base, "--volume-grow-z", "3", "--volume-seed", "8", "5", "--volume-flair-bias-px", "8", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pipe = open_bundle(out).manifest["pipeline"]
    assert (pipe["volume_seed_map_z"], pipe["volume_seed_flair_z"], pipe["volume_flair_bias_px"]) == (8.0, 5.0, 8.0)
    for extra in (["--volume-grow-z", "3", "--volume-seed", "40", "5"], ["--volume-seed", "8", "5"]):
        bad = tmp_path / "bad"
        done = subprocess.run([*base, *extra, "--out", str(bad)], capture_output=True, text=True)
        assert done.returncode != 0 and "--volume-seed MAP_Z FLAIR_Z needs" in done.stderr
        assert not bad.exists()


def test_make_bundle_writes_the_refinement_and_refuses_a_negative_reach(tmp_path, tiny):
    """--refine-flair FLAIR_Z REACH_MM (and --refine-keep-z) make the FLAIR refinement the bundle's
    default, --bias-correction n4 its bias correction (absent: none) and --bias-levels its N4 levels; a
    reach below 0 mm, a keep level alone or N4 levels without N4 are refused before anything is written."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    base = [sys.executable, str(script), "--from", str(tiny)]
    out = tmp_path / "refined"
    argv = [*base, "--refine-flair", "2.5", "6", "--refine-keep-z", "1", "--volume-components", "volume"]
    argv += ["--bias-correction", "n4", "--bias-levels", "4", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pipe = open_bundle(out).manifest["pipeline"]
    assert (pipe["refine"], pipe["refine_flair_z"], pipe["refine_reach_mm"]) == ("flair", 2.5, 6.0)
    assert pipe["refine_keep_flair_z"] == 1.0 and pipe["volume_components"] == "volume"
    assert pipe["bias_correction"] == "n4" and "bias_correction" not in open_bundle(tiny).manifest.get("pipeline", {})
    assert pipe["bias_levels"] == 4
    bad = tmp_path / "bad"
    for extra, needle in (
        (["--refine-flair", "2.5", "-1"], "--refine-flair FLAIR_Z REACH_MM"),
        (["--refine-keep-z", "1"], "--refine-keep-z applies with --refine-flair only"),
        (["--bias-levels", "4"], "--bias-levels needs --bias-correction n4"),
    ):
        done = subprocess.run([*base, *extra, "--out", str(bad)], capture_output=True, text=True)
        assert done.returncode != 0 and needle in done.stderr
        assert not bad.exists()


def test_make_bundle_writes_the_intensity_reference_and_keeps_it_from_its_source(tmp_path, tiny):
    """--intensity-reference FILE lands in the manifest (the bundle's modalities only) and --intensity
    landmarks makes it the default; a bundle made --from it keeps the reference; landmarks without a
    reference, or a reference lacking a modality, are refused before anything is written."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    ref = tmp_path / "ref.json"
    marks = {"flair": [0.3, 0.5, 0.6, 0.7], "t2": [0.3, 0.4, 0.5, 0.6], "t1": [0.2, 0.3, 0.4, 0.5]}
    ref.write_text(json.dumps({"percentiles": [10, 25, 50, 75], "modalities": marks, "data": "unit test"}))
    out = tmp_path / "std"
    argv = [sys.executable, str(script), "--from", str(tiny), "--intensity-reference", str(ref)]
    done = subprocess.run([*argv, "--intensity", "landmarks", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m = open_bundle(out).manifest
    assert m["pipeline"]["intensity"] == "landmarks" and m["format_version"] == FORMAT_VERSION
    assert m["intensity_reference"]["modalities"] == {k: marks[k] for k in ("flair", "t2")}
    again = tmp_path / "again"
    done = subprocess.run([argv[0], argv[1], "--from", str(out), "--out", str(again)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kept = open_bundle(again).manifest
    assert kept["intensity_reference"] == m["intensity_reference"] and "intensity" not in kept["pipeline"]
    assert "replaced: intensity='landmarks'" in done.stderr  # a default that --from does not keep is said
    ref.write_text(json.dumps({"percentiles": [10, 25, 50, 75], "modalities": {"flair": marks["flair"]}}))
    bad = tmp_path / "bad"
    for args, needle in (
        ([argv[0], argv[1], "--from", str(tiny), "--intensity", "landmarks"], "--intensity landmarks needs"),
        ([*argv, "--intensity", "landmarks"], "has no landmarks for t2"),
    ):
        done = subprocess.run([*args, "--out", str(bad)], capture_output=True, text=True)
        assert done.returncode != 0 and needle in done.stderr, done.stderr
        assert not bad.exists()


def test_make_bundle_writes_a_verified_monai_style_card(tmp_path, tiny, capsys):
    """configs/metadata.json (MONAI's metadata keys) and docs/README.md are written, listed with
    their sha256 and verified like the weights; ``bundle info`` prints the card."""
    import subprocess
    import sys
    from pathlib import Path

    from AnomalyDiffusionLib import card, cli

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"demo_dice": {"value": 0.5, "data": "demo phantom", "command": "demo"}}))
    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    out = tmp_path / "carded"
    argv = [sys.executable, str(script), "--from", str(tiny), "--out", str(out), "--eval-metrics", str(metrics)]
    done = subprocess.run([*argv, "--version", "3.0.0", "--changelog", "a card"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    b = open_bundle(out)
    meta = json.loads(b.document(card.METADATA))
    monai_keys = {"version", "changelog", "authors", "copyright", "license", "references", "intended_use"}
    assert monai_keys | {"data_source", "network_data_format", "eval_metrics"} <= set(meta)
    assert meta["version"] == "3.0.0" and meta["changelog"]["3.0.0"] == "a card"
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["channel_def"] == {"0": "FLAIR", "1": "T2"} and image["value_range"] == [-1, 1]
    assert image["spatial_shape"] == [32, 32] and len(meta["references"]) == 2
    assert meta["eval_metrics"]["demo_dice"]["value"] == 0.5
    assert b.document(card.README).decode() == card.render(meta)
    # a rebuild keeps the measured figures only while the weights and the pipeline defaults are the same
    for extra, kept in (([], True), (["--calibration", "volume", "--volume-z", "9"], False)):
        again = tmp_path / f"again{len(extra)}"
        done = subprocess.run(
            [sys.executable, str(script), "--from", str(out), "--out", str(again), *extra], capture_output=True
        )
        assert done.returncode == 0, done.stderr
        got = json.loads(open_bundle(again).document(card.METADATA))
        assert ("demo_dice" in got.get("eval_metrics", {})) is kept, extra
    assert cli.main(["bundle", "info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "# tiny-test 3.0.0" in shown and "demo_dice: 0.5 (data: demo phantom" in shown
    assert "tests only; not for clinical use" in shown
    # the card is verified like the weights
    (out / card.README).write_text("# a better bundle\n")
    with pytest.raises(BundleError, match=r"docs/README\.md"):
        open_bundle(out)
    # a bundle without a card still reads; info says so and shows the manifest summary
    assert cli.main(["bundle", "info", str(tiny)]) == 0
    assert "has no card" in capsys.readouterr().out


def test_make_bundle_from_a_root_layout_bundle_moves_its_weights_under_models(tmp_path, tiny):
    """Bundles before 3.1 keep their weights at the root; they still load, and make_bundle --from
    moves the kept weights under models/ (MONAI's layout) with the same bytes and sections."""
    import subprocess
    import sys
    from pathlib import Path

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in (tiny / "models").iterdir():
        shutil.copy(f, legacy / f.name)
    text = (tiny / "manifest.json").read_text().replace('"models/', '"')
    (legacy / "manifest.json").write_text(text)
    old = open_bundle(legacy).manifest  # verifies: the root layout reads
    assert old["fpdm"]["weights"] == "fpdm.safetensors" and "models/fpdm.safetensors" not in old["files"]
    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    out = tmp_path / "moved"
    done = subprocess.run([sys.executable, str(script), "--from", str(legacy), "--out", str(out)], capture_output=True)
    assert done.returncode == 0, done.stderr
    new = open_bundle(out).manifest
    modern = open_bundle(tiny).manifest
    assert {k: v["sha256"] for k, v in new["files"].items() if "dtype" in v} == {
        k: v["sha256"] for k, v in modern["files"].items()
    }
    assert new["fpdm"] == modern["fpdm"] and new["dode"] == modern["dode"]


def test_eval_metrics_are_read_from_evaluation_outputs(tmp_path):
    """The card's eval_metrics come from what the evaluations write: eval_metrics.json files (merged
    in order, a later key wins) and a demo's summary.json (its DICE against the phantom's truth)."""
    from AnomalyDiffusionLib import card

    shift = tmp_path / "shift.json"
    shift.write_text(json.dumps({
        "shift_family_mean_dice": {"value": 0.4, "data": "held-out family", "command": "shift.py"},
        "tcga_du_7294_dice": {"value": 0.5, "data": "TCGA", "command": "shift.py"},
    }))  # fmt: skip
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"tcga_du_7294_dice": {"value": 0.6, "data": "TCGA, rerun", "command": "shift.py"}}))
    demo = tmp_path / "summary.json"
    demo.write_text(json.dumps({"demo": {"dice_vs_truth": 0.64, "phantom_seed": 11},
                                "method_details": {"fpdm": {"calibration_mode": "volume"}}}))  # fmt: skip
    got = card.read_eval_metrics([shift, again, demo])
    assert got["shift_family_mean_dice"]["value"] == 0.4 and got["tcga_du_7294_dice"]["value"] == 0.6
    assert got["demo_dice"]["value"] == 0.64 and "seed 11), volume decision" in got["demo_dice"]["data"]
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"dice": 0.9}))
    with pytest.raises(ValueError, match=r"junk\.json: not an eval_metrics\.json"):
        card.read_eval_metrics([shift, junk])
