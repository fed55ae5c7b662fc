"""train_fpdm.py on CPU with the tiny config: it learns, resumes exactly, and its weights load back."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from AnomalyDiffusionLib.datasets import phantom_dataset
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.modelio import load_unet, read_meta, save_unet
from AnomalyDiffusionLib.nets import UNet, unet_config
from AnomalyDiffusionLib.phantom import PhantomOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import train_fpdm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slices") / "train"
    ds = phantom_dataset(2, seed=40, size=32, healthy_fraction=0.5, options=PhantomOptions(spacing=3.0))
    ds.save(folder)
    return folder


def run(out: Path, data: Path, iterations: int, *extra: str) -> int:
    return train_fpdm.main(
        [
            "--data",
            str(data),
            "--config",
            "tiny",
            "--batch-size",
            "4",
            "--iterations",
            str(iterations),
            "--save-every",
            "5",
            "--log-every",
            "1",
            "--ema",
            "0.9",
            "--lr",
            "1e-3",
            "--out",
            str(out),
            "--threads",
            "1",
            *extra,
        ]
    )


def test_resume_continues_exactly(data, tmp_path):
    assert run(tmp_path / "straight", data, 10) == 0
    assert run(tmp_path / "split", data, 5) == 0
    assert run(tmp_path / "split", data, 10, "--resume") == 0
    a = load_file(str(tmp_path / "straight" / "fpdm.safetensors"))
    b = load_file(str(tmp_path / "split" / "fpdm.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [list(csv.DictReader(open(tmp_path / d / "loss.csv"))) for d in ("straight", "split")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    ck = load_file(str(tmp_path / "split" / "checkpoint" / "state.safetensors"))
    assert any(k.startswith("optim.") for k in ck) and "rng.torch" in ck
    assert (tmp_path / "split" / "loss.png").stat().st_size > 1000


def test_training_lowers_the_loss_and_weights_load_back(data, tmp_path):
    assert run(tmp_path / "r", data, 60, "--seed", "3") == 0
    rows = list(csv.DictReader(open(tmp_path / "r" / "loss.csv")))
    loss = np.array([float(r["loss"]) for r in rows])
    assert loss[-15:].mean() < 0.8 * loss[:5].mean()  # ε-prediction MSE starts near 1
    model, meta = load_unet(tmp_path / "r" / "fpdm.safetensors")
    assert meta["modalities"] == ["flair", "t2"] and meta["method"] == "fpdm" and meta["schedule"]["steps"] == 1000
    assert model.config == unet_config("tiny", in_channels=2)
    with pytest.raises(AnomalyDiffusionError, match="another UNet configuration"):
        load_unet(tmp_path / "r" / "fpdm.safetensors", expect=unet_config("small"))


def test_brain_framed_training_records_its_field_of_view(data, tmp_path, capsys):
    """--fov-mm trains on brain-framed slices and says so in the weights (a bundle made from them frames
    its inputs the same way); a prepared dataset framed otherwise is refused, not silently mixed."""
    from AnomalyDiffusionLib.fpdm.model import load_unet_any

    assert run(tmp_path / "x", data, 2, "--fov-mm", "150") == 2
    assert "framed with fov_mm None, not 150.0" in capsys.readouterr().err
    framed = tmp_path / "framed" / "train"
    phantom_dataset(1, seed=41, size=32, options=PhantomOptions(spacing=3.0), fov_mm=150.0).save(framed)
    assert run(tmp_path / "f", framed, 2, "--fov-mm", "150") == 0
    assert read_meta(tmp_path / "f" / "fpdm.safetensors")["fov_mm"] == 150.0
    (tmp_path / "f" / "fpdm.safetensors").unlink()  # a run still training: its checkpoint says the same
    assert load_unet_any(tmp_path / "f")[1]["fov_mm"] == 150.0
    # a resume must see its slices framed as before (phantom slices are made on the fly: nothing else checks)
    assert run(tmp_path / "f", framed, 4, "--resume", "--fov-mm", "150") == 0
    phantom = ["--phantom", "1", "--phantom-spacing", "3", "--image-size", "32", "--resume"]
    argv = ["--config", "tiny", "--batch-size", "4", "--iterations", "6", "--out", str(tmp_path / "f"), *phantom]
    assert train_fpdm.main([*argv, "--threads", "1"]) == 2
    assert "cannot resume: checkpoint data {'fov_mm': 150.0} differs from {'fov_mm': None}" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors(data, tmp_path, capsys):
    assert run(tmp_path / "x", data, 2, "--image-size", "64") == 2
    assert "dataset slices are 32×32 but the model is 64×64" in capsys.readouterr().err
    assert run(tmp_path / "y", data, 2, "--resume") == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    # weights of one config cannot be loaded as another (a checkpoint from another config)
    save_unet(UNet(unet_config("tiny", in_channels=4)), tmp_path / "four.safetensors")
    meta = read_meta(tmp_path / "four.safetensors")
    meta["config"]["in_channels"] = 2  # a tampered/mismatched header
    from AnomalyDiffusionLib.modelio import save_weights

    save_weights(UNet(unet_config("tiny", in_channels=4)), tmp_path / "bad.safetensors", meta)
    with pytest.raises(AnomalyDiffusionError, match="do not fit this model configuration"):
        load_unet(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(AnomalyDiffusionError, match="not a readable safetensors"):
        load_unet(tmp_path / "junk.safetensors")


@pytest.mark.slow  # trains, calibrates (ddim and ddpm) and evaluates: about 50 s
def test_calibrate_then_evaluate_scripts(data, tmp_path):
    """calibrate_fpdm.py reads only the val split's image-level labels; evaluate_fpdm.py the test split."""
    import json

    import calibrate_fpdm
    import evaluate_fpdm

    root = tmp_path / "prepared"
    for split, seed in (("val", 50), ("test", 60)):
        phantom_dataset(2, seed=seed, size=32, healthy_fraction=0.5, options=PhantomOptions(spacing=3.0)).save(
            root / split
        )
    assert run(tmp_path / "m", data, 20) == 0
    model = tmp_path / "m" / "fpdm.safetensors"
    common = ["--model", str(model), "--data", str(root), "--steps", "200", "--stride", "50", "--max-slices", "40"]
    from AnomalyDiffusionLib.fpdm import FPDMSettings

    for mode in ("ddim", "ddpm"):
        args = [*common, "--mode", mode, "--w", "0,1,3", "--w-cap", "4", "--threads", "1"]
        assert calibrate_fpdm.main(args) == 0
        rep = json.loads((tmp_path / "m" / f"calibration_fpdm_{mode}.json").read_text())
        assert rep["validation"]["pixel_labels_used"] is False and rep["validation"]["slices"] == 40
        assert rep["calibration"]["w"] in (0.0, 1.0, 3.0, 4.0) and len(rep["calibration"]["m_max"]) == 2
        assert rep["settings"]["mode"] == mode and rep["settings"]["w"] == rep["calibration"]["w"]
        assert 0 < rep["calibration"]["brain_fraction"] < 1
        # the calibration records the settings it was made with, and any extension of the w grid
        assert rep["calibration"]["settings"] == FPDMSettings.from_dict(rep["settings"]).calibration_dict()
        assert rep["settings"]["clip_denoised"] is True and rep["settings"]["cosine_weighting"] == "spacing"
        ext = rep["grid_extension"]
        assert ext["extended"] == bool(ext["rounds"]) == any(v["round"] for v in rep["table"].values())
        for i, r in enumerate(ext["rounds"], 1):
            assert r["added"] == [4.0] and all(rep["table"][str(w)]["round"] == i for w in r["added"])
    # the calibration also becomes a bundle that detect can open: by default beside the report
    from AnomalyDiffusionLib.bundle import open_bundle
    from AnomalyDiffusionLib.fpdm.model import fpdm_from_bundle

    for mode in ("ddim", "ddpm"):
        made = open_bundle(tmp_path / "m" / f"bundle_fpdm_{mode}")
        assert made.methods == ["fpdm"] and made.manifest["fpdm"]["settings"]["mode"] == mode

    assert calibrate_fpdm.main([*common, "--w", "0,1", "--threads", "1", "--bundle", str(tmp_path / "bun")]) == 0
    b = open_bundle(tmp_path / "bun")
    assert b.methods == ["fpdm"] and b.manifest["fpdm"]["settings"]["stride"] == 50
    unet, _, st, cal = fpdm_from_bundle(b)
    assert cal.brain_fraction is not None and unet.config.image_size == 32
    assert cal.settings == st.calibration_dict()  # the bundle carries what its calibration holds for
    assert (
        evaluate_fpdm.main(
            [
                "--model",
                str(model),
                "--data",
                str(root),
                "--max-slices",
                "30",
                "--out",
                str(tmp_path / "eval"),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    assert methods[:4] == ["AnoFPDM (DDIM)", "AnoFPDM (DDIM S_te)", "AnoFPDM (DDPM)", "AnoFPDM (DDPM S_te)"]
    assert methods[4].startswith("FLAIR threshold")
    for r in res["rows"][:4]:
        # gating only empties masks, and an empty mask scores 0 on a lesion slice
        assert r["unhealthy_dice"] >= r["unhealthy_dice_gated"]
        assert 0 <= r["sensitivity"] <= 1 and 0 <= r["specificity"] <= 1
    for name in ("results.md", "results.csv", "m_curves.png", "grid.png"):
        assert (tmp_path / "eval" / name).is_file()


def failure(r) -> str:
    """A failed torchrun's workers' own messages (a Gloo abort prints its reason first) and its tail."""
    lines = [ln for ln in r.stderr.splitlines() if "what()" in ln or "Error" in ln or "terminate" in ln]
    return "\n".join(lines[:20]) + "\n...\n" + r.stderr[-2000:]


@pytest.mark.slow  # two torchrun processes: about 30 s
def test_ddp_two_cpu_processes_train_and_resume(data, tmp_path):
    """torchrun with 2 Gloo processes: rank 0 writes, every rank's random stream is checkpointed."""
    import json
    import subprocess

    script = str(Path(__file__).resolve().parents[1] / "training" / "train_fpdm.py")
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # rendezvous on a free local port
        script,
        "--data",
        str(data),
        "--config",
        "tiny",
        "--batch-size",
        "4",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--ema",
        "0.9",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "ddp"),
    ]
    r = subprocess.run([*base, "--iterations", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, failure(r)
    meta = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())
    states = meta["numpy_rng"]
    assert isinstance(states, list) and len(states) == 2 and states[0] != states[1]
    r = subprocess.run([*base, "--iterations", "6", "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, failure(r)
    _, meta = load_unet(tmp_path / "ddp" / "fpdm.safetensors")
    assert meta["iterations"] == 6
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "loss.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]


def test_calibrate_extends_the_w_grid_while_accuracy_rises(tmp_path, monkeypatch):
    """With validation accuracy made to rise with w (w / (w + 1)), the grid 0, 1, 2 extends by 1.5×,
    two per round, up to the cap 5: rounds [3, 4.5] and [5], one forward pass each; w* = 5 (4.5's
    0.818 < 0.99 × 0.833), and every round recorded with the reason (the library's calibrate_fpdm,
    which training/calibrate_fpdm.py runs)."""
    from conftest import make_tiny_bundle

    import AnomalyDiffusionLib.fpdm.calibrate as calibrate
    from AnomalyDiffusionLib.bundle import open_bundle
    from AnomalyDiffusionLib.datasets import load_or_make
    from AnomalyDiffusionLib.fpdm import FPDMSettings
    from AnomalyDiffusionLib.fpdm.model import fpdm_from_bundle

    root = tmp_path / "prepared"
    phantom_dataset(1, seed=50, size=32, healthy_fraction=0.0, options=PhantomOptions(spacing=3.0)).save(root / "val")
    model, *_ = fpdm_from_bundle(open_bundle(make_tiny_bundle(tmp_path / "b", methods=("fpdm",))))
    x, ds = load_or_make(root, "val", None, ["flair", "t2"], 32, max_slices=8, seed=0)
    real = calibrate.select_guidance

    def rising(cosines, labels, tolerance=0.99):
        _, table = real(cosines, labels, tolerance)
        for w in table:
            table[w]["accuracy"] = w / (w + 1)
        best = max(v["accuracy"] for v in table.values())
        return max(w for w, v in table.items() if v["accuracy"] >= tolerance * best), table

    monkeypatch.setattr(calibrate, "select_guidance", rising)
    st = FPDMSettings(w=0.0, steps=20, stride=10, map_channels=(0, 1))
    rep = calibrate.calibrate_fpdm(model, x, np.asarray(ds.labels), st, [2, 0, 1], w_cap=5)
    ext = rep["grid_extension"]
    assert ext["extended"] and [r["added"] for r in ext["rounds"]] == [[3.0, 4.5], [5.0]]
    assert "largest candidate w = 2" in ext["rounds"][0]["why"] and "w = 4.5" in ext["rounds"][1]["why"]
    assert {w: v["round"] for w, v in rep["table"].items()} == {
        "0.0": 0, "1.0": 0, "2.0": 0, "3.0": 1, "4.5": 1, "5.0": 2
    }  # fmt: skip
    assert rep["calibration"]["w"] == 5.0 and rep["settings"]["w"] == 5.0 and rep["calibration"]["settings"]["w"] == 5.0
    assert rep["network_calls"] == 3 * 3  # three passes of the 3 visited steps (0, 10, 19), one batch
    assert rep["validation"] == {"slices": 8, "unhealthy": int(np.sum(ds.labels)), "pixel_labels_used": False}
    # without a cap the grid stays as given
    plain = calibrate.calibrate_fpdm(model, x, np.asarray(ds.labels), st, [0, 1, 2], w_cap=0)
    assert list(plain["table"]) == ["0.0", "1.0", "2.0"] and not plain["grid_extension"]["extended"]


def test_calibrate_needs_both_healthy_and_unhealthy_slices():
    from AnomalyDiffusionLib.fpdm import FPDMSettings
    from AnomalyDiffusionLib.fpdm.calibrate import calibrate_fpdm

    x = np.zeros((4, 2, 32, 32), np.float32)
    for labels in (np.zeros(4), np.ones(4)):
        with pytest.raises(AnomalyDiffusionError, match="both healthy and unhealthy"):
            calibrate_fpdm(torch.nn.Identity(), x, labels, FPDMSettings(), [0.0])
