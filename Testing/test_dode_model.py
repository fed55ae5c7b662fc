"""AnoDODE end to end on CPU: DSM learns a density (margin), train_dode.py writes a loadable model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from AnomalyDiffusionLib.dode.likelihood import likelihood_torch
from AnomalyDiffusionLib.dode.model import dode_from_bundle, load_dode, score_slices
from AnomalyDiffusionLib.dode.score import ScoreNet, dsm_loss, score_config
from AnomalyDiffusionLib.errors import AnomalyDiffusionError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import train_dode


@pytest.mark.slow  # DSM training: about 15 s
def test_dsm_trained_score_separates_in_and_out_of_distribution():
    """Score matching on N(μ, 0.3² I) features for 300 steps. The likelihood then ranks held-out
    samples above samples shifted by 2.5 (≈ 8 data SDs): AUROC ≥ 0.9 against the trivial 0.5 of an
    uninformed score, with a mean gap of at least 1 bpd (a trained-model margin)."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 2, 2, generator=g)
    sample = lambda n, shift=0.0: mu + shift + 0.3 * torch.randn(n, 4, 2, 2, generator=g)  # noqa: E731
    net = ScoreNet(score_config("tiny", 4, 2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        loss = dsm_loss(net, sample(64), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    z_in, z_out = sample(12), sample(12, shift=2.5)
    # exact trace (16 dims): the test measures the learned density, not Hutchinson noise
    r_in, r_out = (
        likelihood_torch(lambda z, t: net(z, t), z, probe="exact", rtol=1e-3, atol=1e-3)[0] for z in (z_in, z_out)
    )
    auroc = roc_auc_score([0] * 12 + [1] * 12, np.concatenate([r_in.bpd, r_out.bpd]))
    assert auroc >= 0.9, auroc
    assert r_out.bpd.mean() > r_in.bpd.mean() + 1.0


def _train_on_standard_normal(skip: bool, channels: int = 32, size: int = 4, steps: int = 150) -> ScoreNet:
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    net = ScoreNet(score_config("tiny", channels, size, gaussian_skip=skip))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = dsm_loss(net, torch.randn(64, channels, size, size, generator=g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _eps_mse(net: ScoreNet, t: float, n: int = 256) -> float:
    g = torch.Generator().manual_seed(2)
    c, s = net.config.in_channels, net.config.image_size
    z0 = torch.randn(n, c, s, s, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    tt = torch.full((n,), t)
    with torch.no_grad():
        return float(((net.eps(net.sde.perturb(z0, tt, noise), tt) - noise) ** 2).mean())


@pytest.mark.slow  # DSM training: about 30 s
def test_gaussian_skip_represents_every_feature_direction():
    """Issue 19 point 1. Standard-normal features with twice as many channels (32) as the UNet's base
    width (16): the optimal ε̂ is σ(t)·z_t, whose MSE at t = 1 is m(1)² ≈ 4e-5. With the Gaussian skip
    the trained network reaches it; without it the 3×3 16 → 32 output convolution can express ε̂ in
    at most half of the directions and the MSE stays near ½ or above."""
    skip, plain = _train_on_standard_normal(True), _train_on_standard_normal(False)
    for t in (0.6, 1.0):
        m, _ = skip.sde.marginal(torch.tensor(t))
        optimum = float(m) ** 2  # E‖ε − σ z_t‖²/D = m² for unit-variance data
        assert _eps_mse(skip, t) < optimum + 0.02, (t, _eps_mse(skip, t))
        assert _eps_mse(plain, t) > 0.3, (t, _eps_mse(plain, t))


@pytest.mark.slow  # DSM training to a closed form: about 40 s
def test_gaussian_skip_learns_the_closed_form_density_of_gaussian_data():
    """The learned log density of N(0, I) features (24 channels, more than the base width 16) equals
    the closed form Σ −½(log 2π + z²), exact trace so no probe noise: within 0.05 bpd per sample after
    150 DSM steps (measured 0.005-0.02). The same training without the skip is off by 5.2-5.7 bpd
    (measured; not run here, 90 s)."""
    net = _train_on_standard_normal(True, channels=24, size=2)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 24, 2, 2, generator=g)
    res = likelihood_torch(lambda x, t: net(x, t), z, probe="exact", rtol=1e-5, atol=1e-5)[0]
    closed = (-0.5 * (np.log(2 * np.pi) + z.double().reshape(4, -1).numpy() ** 2)).sum(1)
    assert np.abs(res.bpd - closed / (-96 * np.log(2))).max() < 0.05


def test_train_dode_script_writes_a_loadable_model(tmp_path):
    out = tmp_path / "dode"
    args = [
        "--phantom",
        "1",
        "--config",
        "tiny",
        "--scales",
        "128,64",
        "--iterations",
        "4",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--save-every",
        "2",
        "--out",
        str(out),
    ]
    assert train_dode.main(args) == 0
    for name in ("dode_encoder.safetensors", "dode_score_128.safetensors", "dode_score_64.safetensors"):
        assert (out / name).is_file()
    # training ends with an AnoDODE-only bundle holding the same networks
    from AnomalyDiffusionLib.bundle import open_bundle
    from AnomalyDiffusionLib.dode.model import dode_from_bundle

    made = open_bundle(out / "bundle")
    assert made.methods == ["dode"] and made.manifest["dode"]["decision_threshold"] is None
    assert dode_from_bundle(made).scales == [128, 64]
    model = load_dode(out)
    assert model.scales == [128, 64] and model.spec.name == "tf_efficientnet_lite0" and model.spec.pretrained
    x = torch.rand(2, 1, 128, 128) * 2 - 1
    per_a, s_a = score_slices(model, x, rtol=1e-4, atol=1e-4)
    per_b, _ = score_slices(model, x, solver="scipy", rtol=1e-4, atol=1e-4)
    assert per_a.shape == (2, 2) and np.allclose(s_a, per_a.mean(1))
    assert np.allclose(per_a, per_b, atol=1e-4)  # same probes at every scale: only the integration differs
    assert load_dode(out, scales=[64]).scales == [64]
    with pytest.raises(AnomalyDiffusionError, match="no score network for scale"):
        load_dode(out, scales=[192])
    assert train_dode.main([*args[:-2], "--out", str(out), "--iterations", "6", "--resume"]) == 0
    from AnomalyDiffusionLib.modelio import read_meta

    flipped = tmp_path / "dode_hflip"
    assert (
        train_dode.main(
            [*args[:-2], "--scales", "64", "--iterations", "2", "--hflip", "--dropout", "0.1", "--out", str(flipped)]
        )
        == 0
    )
    plain_meta = read_meta(out / "dode_score_64.safetensors")
    flip_meta = read_meta(flipped / "dode_score_64.safetensors")
    assert (plain_meta["augmentation"], flip_meta["augmentation"]) == ("none", "hflip")
    assert flip_meta["healthy_slices"] == 2 * plain_meta["healthy_slices"]  # every healthy slice and its mirror
    assert (plain_meta["config"]["dropout"], flip_meta["config"]["dropout"]) == (0.0, 0.1)

    # bad input: wrong channel count, NaN, features that do not fit a scale, another config's weights
    from AnomalyDiffusionLib.errors import InputError
    from AnomalyDiffusionLib.modelio import save_weights

    with pytest.raises(InputError, match="grey"):
        score_slices(model, torch.zeros(1, 2, 128, 128))
    bad = x.clone()
    bad[0, 0, 5, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        score_slices(model, bad)
    model.scales[0] = 96  # features 3×3 for a network trained on 4×4
    with pytest.raises(AnomalyDiffusionError, match="features at scale 96"):
        score_slices(model, x)
    meta = read_meta(out / "dode_score_64.safetensors")
    meta["config"]["model_channels"] = 32
    net = load_dode(out, scales=[64]).nets[0]
    save_weights(net, out / "dode_score_64.safetensors", meta)  # header says another configuration
    with pytest.raises(AnomalyDiffusionError, match="do not fit this model configuration"):
        load_dode(out, scales=[64])


@pytest.mark.slow  # trains AnoDODE and a decoder, runs evaluate_dode: about 10 s
def test_decoder_training_and_localisation_smoke(tmp_path):
    """train_dode.py + train_decoder.py (a few iterations), then a heatmap per slice at slice size."""
    import train_decoder

    from AnomalyDiffusionLib.dode.localise import localise
    from AnomalyDiffusionLib.dode.model import load_decoder

    out = tmp_path / "dode"
    assert (
        train_dode.main(
            [
                "--phantom",
                "1",
                "--config",
                "tiny",
                "--scales",
                "64",
                "--iterations",
                "2",
                "--batch-size",
                "4",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        train_decoder.main(
            [
                "--model",
                str(out),
                "--phantom",
                "1",
                "--scale",
                "64",
                "--base",
                "8",
                "--iterations",
                "2",
                "--batch-size",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    model = load_dode(out)
    dec = load_decoder(out, 64)
    x = torch.rand(2, 1, 128, 128) * 2 - 1
    heat, rec = localise(
        model.encoder,
        64,
        model.nets[0],
        model.standardisers[0],
        dec,
        x,
        t0=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    assert heat.shape == (2, 128, 128) and rec.shape == (2, 128, 128)
    assert np.allclose(heat, (x[:, 0].numpy() - rec) ** 2, atol=1e-6)

    import json

    import evaluate_dode

    assert (
        evaluate_dode.main(
            [
                "--model",
                str(out),
                "--phantom",
                "1",
                "--split",
                "val",
                "--max-slices",
                "12",
                "--rtol",
                "1e-3",
                "--threads",
                "1",
                "--t0",
                "0.5,0.9",
                "--pc-steps",
                "20",
                "--slice-size",
                "128",
                "--slices",
                "10:70",
                "--out",
                str(tmp_path / "val"),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "val" / "results.json").read_text())
    assert rep["table2"][0]["scales"] == [64] and 0 <= rep["table1"]["auroc"] <= 1
    assert set(rep["references"]) == {"brain area", "FLAIR p99.9"}
    assert rep["axial_range"] == "10:70"
    loc = rep["localisation"]  # the decoder beside the model is found and scored on the lesion slices
    assert loc["scale"] == 64 and [r["t0"] for r in loc["t0"]] == [0.5, 0.9] and loc["slices"] >= 1
    assert all(0 <= r["auroc"] <= 1 and 0 < r["auprc"] <= 1 for r in [*loc["t0"], loc["intensity"]])
    assert (tmp_path / "val" / "localisation_t0.png").is_file()
    assert json.loads((out / "dode_threshold.json").read_text())["scales"] == [64]
    assert (tmp_path / "val" / "roc_scores.png").is_file()


def test_bundle_is_read_as_a_model_folder_and_never_written_to(tmp_path):
    """load_dode on a bundle gives its AnoDODE model (a subset of scales on request); train_decoder
    refuses to write into a bundle without --out."""
    import train_decoder

    from AnomalyDiffusionLib.bundle import default_bundle_path, open_bundle

    full = dode_from_bundle(open_bundle(None))
    one = load_dode(default_bundle_path(), scales=[128])
    assert one.scales == [128] and one.spec.name == full.spec.name
    k = full.scales.index(128)
    for a, b in zip(one.nets[0].state_dict().values(), full.nets[k].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(one.standardisers[0].mean, full.standardisers[k].mean)
    with pytest.raises(AnomalyDiffusionError, match="scale"):
        load_dode(default_bundle_path(), scales=[96])
    assert train_decoder.main(["--model", str(default_bundle_path()), "--phantom", "1"]) == 2
