"""AnoFPDM against truths: closed-form schedule, an analytically optimal ε, eq. 13, Algorithm 1."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from AnomalyDiffusionLib.diffusion import NULL, Schedule
from AnomalyDiffusionLib.errors import InputError
from AnomalyDiffusionLib.fpdm import (
    Calibration,
    FPDMSettings,
    best_cosine_threshold,
    calibration_mismatches,
    cosine_weights,
    extend_guidance_grid,
    forward_process,
    forward_process_multi,
    quantile_level,
    remove_small_components,
    segment,
    select_guidance,
    sequence_cosine,
)
from AnomalyDiffusionLib.nets import UNet, unet_config


class GaussianEps(nn.Module):
    """The exact optimal ε for data x_0 ~ N(μ_y, σ² I) given class y (Tweedie):
    ε*(x_t, t, y) = √(1−ᾱ)(x_t − √ᾱ μ_y) / (ᾱσ² + 1 − ᾱ). ``gain(t)`` optionally scales μ_h − μ_∅
    with the step (a model whose class signal peaks at a chosen noise level)."""

    def __init__(self, mu_h, mu_null, sigma=0.0, gain=None, size=8):
        super().__init__()
        self.mu_h, self.mu_null, self.sigma, self.gain = mu_h, mu_null, sigma, gain
        self.abar = Schedule().tensor()
        self.config = type("Cfg", (), {"in_channels": mu_h.shape[0], "image_size": size})()

    def forward(self, x, t, y):
        a = self.abar[t].float().reshape(-1, 1, 1, 1)
        g = 1.0 if self.gain is None else self.gain(t).reshape(-1, 1, 1, 1)
        mu = torch.where((y == NULL).reshape(-1, 1, 1, 1), self.mu_null, self.mu_null + g * (self.mu_h - self.mu_null))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.sigma**2 + 1 - a)


def test_schedule_matches_closed_form():
    s = Schedule()
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    assert np.allclose(s.betas, betas, rtol=0, atol=1e-15)
    for t in (0, 1, 299, 599, 999):
        assert s.alphas_cumprod[t] == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-12)
    assert s.alphas_cumprod[0] == pytest.approx(0.9999)
    assert s.alphas_cumprod[999] == pytest.approx(4.0358e-5, rel=1e-3)


@pytest.fixture
def means():
    g = torch.Generator().manual_seed(0)
    mu_h = torch.rand(2, 8, 8, generator=g) * 0.6 - 0.5
    mu_null = mu_h.clone()
    mu_null[:, 2:5, 3:6] += 0.8  # the "anomaly": where the unconditional mean differs
    return mu_h, mu_null


@pytest.mark.parametrize("mode", ["ddim", "ddpm"])
def test_point_mass_model_gives_hand_derived_hgp_ugp_and_m(means, mode):
    """σ = 0: x̃_0 = μ exactly whatever the noise, so HGP = (1+w)μ_h − wμ_∅ (eq. 7), UGP = μ_∅
    (eq. 10), M_t = (1+w)²·mean((μ_h − μ_∅)²) (eq. 12) at every step, H = S = (HGP − x_0)²."""
    mu_h, mu_null = means
    w = 1.5
    model = GaussianEps(mu_h, mu_null, sigma=0.0)
    x0 = (mu_null + 0.05 * torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1)))[None].repeat(3, 1, 1, 1)
    st = FPDMSettings(w=w, steps=40, stride=4, mode=mode, clip_x0=False, clip_denoised=False)
    r = forward_process(model, x0, st)
    hgp = (1 + w) * mu_h - w * mu_null
    m_expected = ((1 + w) ** 2 * ((mu_h - mu_null) ** 2).mean(dim=(-2, -1))).numpy()
    assert np.allclose(r.m, m_expected[None, None], rtol=1e-4)
    s_expected = ((hgp[None] - x0) ** 2).numpy()
    assert np.allclose(r.h, s_expected, rtol=1e-4, atol=1e-6)
    assert np.allclose(r.s_te, s_expected, rtol=1e-4, atol=1e-6)
    assert np.allclose(r.mse_h, s_expected.mean(axis=(1, 2, 3))[:, None], rtol=1e-4)
    assert np.allclose(r.mse_u, ((mu_null[None] - x0) ** 2).mean(dim=(1, 2, 3)).numpy()[:, None], rtol=1e-4)
    assert np.allclose(r.m_te, m_expected[None], rtol=1e-4)  # M_t is constant, so is its maximum
    assert r.network_calls == len(st.visited)  # one stacked call per step


@pytest.mark.parametrize("mode", ["ddim", "ddpm"])
@pytest.mark.parametrize("unguided", ["null", "healthy"])
def test_gaussian_model_m_t_closed_form(means, mode, unguided):
    """σ > 0: x̃ʰ − x̃^∅ = −(1−ᾱ)·c·(μ_∅ − μ_h)/(ᾱσ² + 1 − ᾱ) with c = 1 + w (paper) or w (code),
    independent of x_t, so M_t is known at every step in both encodings."""
    mu_h, mu_null = means
    w, sigma = 2.0, 0.5
    model = GaussianEps(mu_h, mu_null, sigma=sigma)
    x0 = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    st = FPDMSettings(w=w, steps=600, stride=50, mode=mode, unguided=unguided, clip_x0=False, clip_denoised=False)
    r = forward_process(model, x0, st)
    a = Schedule().alphas_cumprod[st.visited]
    c = (1 + w) if unguided == "null" else w
    d2 = ((mu_null - mu_h) ** 2).mean(dim=(-2, -1)).numpy()  # per channel
    expected = (c * (1 - a) / (a * sigma**2 + 1 - a))[:, None] ** 2 * d2[None]
    assert np.allclose(r.m, expected[None], rtol=1e-3)
    assert (r.t_e == st.visited[-1]).all()  # monotone in t for this model


def test_ddim_m_t_scales_with_one_plus_w_squared_and_code_form_w0_is_zero():
    """DDIM trajectory is driven by ε_∅ alone, so M_t(w) = (1 + w)² M_t(0) exactly (eq. 13, without
    the clamp of the predictions), for any network; in the reference-code form, w = 0 makes HGP = UGP
    and M_t = 0."""
    torch.manual_seed(0)
    model = UNet(unet_config("tiny"))
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)  # zero-initialised output layers would give ε ≡ 0
    x0 = torch.rand(3, 2, 32, 32) * 2 - 1
    kw = {"steps": 200, "stride": 20, "clip_denoised": False}
    base = FPDMSettings(w=0.0, **kw)
    r0 = forward_process(model, x0, base)
    for w in (0.5, 3.0):
        rw = forward_process(model, x0, FPDMSettings(w=w, **kw))
        assert np.allclose(rw.m, (1 + w) ** 2 * r0.m, rtol=1e-4, atol=1e-9)
        assert np.allclose(rw.mse_u, r0.mse_u, rtol=1e-6)  # same trajectory and UGP
    multi = forward_process_multi(model, x0, FPDMSettings(steps=200, stride=20), [0.0, 0.5, 3.0])
    for w in (0.0, 3.0):  # one pass for several w gives what separate passes give
        single = forward_process(model, x0, FPDMSettings(w=w, steps=200, stride=20))
        assert np.allclose(multi[w].h, single.h, atol=1e-7) and np.array_equal(multi[w].t_e, single.t_e)
        assert np.allclose(multi[w].cosine, single.cosine)
    assert multi[0.5].network_calls == len(FPDMSettings(steps=200, stride=20).visited)
    rc = forward_process(model, x0, FPDMSettings(w=0.0, steps=200, stride=20, unguided="healthy"))
    assert np.all(rc.m == 0) and np.allclose(rc.mse_h, rc.mse_u)
    assert r0.m.max() > 0


def test_algorithm_1_hand_values():
    # range = reverse(linspace(0.90, 0.98, 101)): index i -> 0.98 - 0.0008 i
    assert quantile_level(0.0, 2.0) == pytest.approx(0.98)
    assert quantile_level(1.0, 2.0) == pytest.approx(0.94)  # M_s = 0.5 -> index 50
    assert quantile_level(0.25, 1.0) == pytest.approx(0.98 - 0.0008 * 25)
    assert quantile_level(5.0, 2.0) == pytest.approx(0.90)  # clamped to 1
    assert quantile_level(0.5, 1.0, a=0.8, b=0.9) == pytest.approx(0.85)


def _result_with(h, m_te, cosine):
    from AnomalyDiffusionLib.fpdm import ForwardResult

    n = h.shape[0]
    return ForwardResult(
        steps=np.arange(1),
        m=np.zeros((n, 1, h.shape[1])),
        mse_h=np.zeros((n, 1)),
        mse_u=np.zeros((n, 1)),
        t_e=np.zeros((n, h.shape[1]), int),
        m_te=np.asarray(m_te, np.float32),
        h=h,
        s_te=h,
        cosine=np.asarray(cosine, np.float32),
        steps_run=np.ones(n, int),
    )


def test_segment_hand_case_threshold_and_classification():
    """H = 0..99 on a 10×10 slice; M_te/M_max = 0.5 → q = 0.94 → Q* = quantile = 93.06, so the
    six pixels 94..99 are kept. A slice with cosine above the threshold gets an empty mask."""
    h = np.arange(100, dtype=np.float32).reshape(1, 1, 10, 10).repeat(2, 0)
    cal = Calibration(w=2, cos_threshold=0.9, m_max=[2.0], median_size=1, min_component=0)
    seg = segment(_result_with(h, [[1.0], [1.0]], [0.5, 0.95]), cal)
    assert seg.thresholds[0] == pytest.approx(93.06)
    assert seg.masks[0].sum() == 6 and seg.masks[0].ravel()[94:].all()
    assert seg.unhealthy.tolist() == [True, False] and not seg.masks[1].any()
    # two channels: Q* is the mean of the per-channel quantiles, the map the channel mean
    h2 = np.concatenate([h[:1], h[:1] * 3], axis=1)
    cal2 = Calibration(w=2, cos_threshold=0.9, m_max=[2.0, 2.0], median_size=1, min_component=0)
    seg2 = segment(_result_with(h2, [[1.0, 1.0]], [0.5]), cal2)
    assert seg2.thresholds[0] == pytest.approx((93.06 + 3 * 93.06) / 2)
    assert np.allclose(seg2.maps[0], 2 * h[0, 0])


def test_post_processing_hand_cases():
    m = np.zeros((12, 12), bool)
    m[1:4, 1:4] = True  # 9 pixels
    m[8, 8] = m[9, 9] = True  # diagonal pair: one 8-connected component of 2
    m[6, 1] = True  # single pixel
    out = remove_small_components(m, 2)
    assert out[1:4, 1:4].all() and not out[8, 8] and not out[6, 1]
    out1 = remove_small_components(m, 1)
    assert out1[8, 8] and out1[9, 9] and not out1[6, 1]  # 4-connectivity would have removed the pair
    # 5×5 median removes an isolated spike before thresholding
    h = np.zeros((1, 1, 16, 16), np.float32)
    h[0, 0, 5, 5] = 100.0  # a spike inside a plateau of ones
    h[0, 0, 2:9, 2:9] += 1.0
    cal = Calibration(w=1, cos_threshold=1.0, m_max=[1.0], median_size=5, min_component=0)
    seg = segment(_result_with(h, [[1.0]], [0.0]), cal)
    assert seg.maps[0, 5, 5] == 1.0 and seg.maps[0, 0, 0] == 0.0


def test_early_stop_gives_the_same_t_e_and_mask_as_the_full_run(means):
    """A model whose class signal peaks at step 200: stopping after the peak changes nothing."""
    mu_h, mu_null = means
    gain = lambda t: torch.exp(-(((t.float() - 200.0) / 80.0) ** 2))  # noqa: E731
    model = GaussianEps(mu_h, mu_null, sigma=0.3, gain=gain)
    x0 = mu_null[None].repeat(4, 1, 1, 1) + 0.1 * torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    full = forward_process(model, x0, FPDMSettings(w=2, steps=600, stride=10, cosine_steps=300))
    fast = forward_process(
        model, x0, FPDMSettings(w=2, steps=600, stride=10, early_stop=True, patience=60, cosine_steps=300)
    )
    assert np.array_equal(full.t_e, fast.t_e) and np.allclose(full.h, fast.h) and np.allclose(full.m_te, fast.m_te)
    assert fast.steps_run.max() < full.steps_run.min()
    cal = Calibration(
        w=2, cos_threshold=1.0, m_max=[float(v) for v in full.m_te.max(0)], median_size=3, min_component=0
    )
    assert np.array_equal(segment(full, cal).masks, segment(fast, cal).masks)
    assert np.allclose(full.cosine, fast.cosine)  # the eq. 18 horizon is inside both runs


def test_results_do_not_depend_on_batching():
    torch.manual_seed(1)
    model = UNet(unet_config("tiny"))
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)
    x0 = torch.rand(5, 2, 32, 32) * 2 - 1
    for mode in ("ddim", "ddpm"):
        a = forward_process(model, x0, FPDMSettings(steps=60, stride=6, mode=mode, batch_size=5), seed=4)
        b = forward_process(model, x0, FPDMSettings(steps=60, stride=6, mode=mode, batch_size=2), seed=4)
        assert np.allclose(a.h, b.h, atol=1e-6) and np.array_equal(a.t_e, b.t_e)


def test_calibration_helpers_hand_cases():
    th, acc = best_cosine_threshold([0.2, 0.5, 0.6, 0.9, 0.95], [1, 1, 0, 0, 0])
    assert th == pytest.approx(0.55) and acc == 1.0  # midpoint between the classes
    th, acc = best_cosine_threshold([0.2, 0.7, 0.6, 0.9], [1, 1, 0, 0])
    assert acc == 0.75

    labels = np.array([1] * 100 + [0] * 100)

    def cosines(n_wrong: int) -> np.ndarray:
        c = np.where(labels == 1, 0.1, 0.9)
        c[:n_wrong] = 0.95  # unhealthy slices that look healthy: best accuracy (200 - n) / 200
        return c

    # accuracies 0.80, 0.90, 0.895 (within 99 % of 0.90), 0.85 -> w* = 2, the largest that holds up
    cos = {0.0: cosines(40), 1.0: cosines(20), 2.0: cosines(21), 4.0: cosines(30)}
    w_star, table = select_guidance(cos, labels)
    assert [table[w]["accuracy"] for w in (0.0, 1.0, 2.0, 4.0)] == pytest.approx([0.80, 0.90, 0.895, 0.85])
    assert w_star == 2.0
    cos[2.0] = cosines(23)  # 0.885 < 0.891: w* falls back to 1
    assert select_guidance(cos, labels)[0] == 1.0


def test_bad_inputs_are_refused():
    model = UNet(unet_config("tiny"))
    with pytest.raises(InputError, match="2 channel"):
        forward_process(model, torch.zeros(1, 3, 32, 32), FPDMSettings(steps=2))
    with pytest.raises(InputError, match="32×32"):
        forward_process(model, torch.zeros(1, 2, 64, 64), FPDMSettings(steps=2))
    x = torch.zeros(1, 2, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        forward_process(model, x, FPDMSettings(steps=2))
    with pytest.raises(ValueError, match="exceed"):
        forward_process(model, torch.zeros(1, 2, 32, 32), FPDMSettings(steps=2000))


def test_foreground_only_ignores_background_noise():
    """Background (outside the brain) with large map values: with foreground_only the mask falls on
    the bright spot inside the brain; without it, the quantile lands in the background."""
    h = np.zeros((1, 1, 16, 16), np.float32)
    fg = np.zeros((1, 16, 16), bool)
    fg[0, 4:12, 4:12] = True
    h[0, 0][fg[0]] = 1.0  # brain tissue
    h[0, 0][~fg[0]] = 50.0  # background noise
    h[0, 0, 6:9, 6:9] = 10.0  # the lesion inside the brain
    r = _result_with(h, [[0.0]], [0.0])  # M_te = 0 -> q = 0.98: the top 2 % (5 of 256 pixels)
    r.foreground = fg
    on = segment(r, Calibration(w=1, cos_threshold=1.0, m_max=[2.0], median_size=1, min_component=0))
    off = segment(
        r, Calibration(w=1, cos_threshold=1.0, m_max=[2.0], median_size=1, min_component=0, foreground_only=False)
    )
    assert on.masks[0].sum() == 9 and on.masks[0, 6:9, 6:9].all()
    assert not (off.masks[0] & fg[0]).any()


def test_brain_fraction_quantile_selects_the_same_share_of_brain_at_any_field_of_view():
    """Hand case: a 64-pixel brain with a ramp of map values. At q = 0.98 the paper's rule selects
    the top 2 % of the image. With brain_fraction = 64/256 the level on brain pixels is
    1 − 0.02/0.25 = 0.92, the same ~5 pixels. Put the same brain in larger images (wider fields of
    view): the paper's rule selects 2 % of the image — 21 pixels at 32², and at 64², where the brain
    is under 2 % of the image, Q* = 0 and the whole brain — while the brain-fraction rule still
    selects the same 6 of its 64 pixels."""
    for side, paper_count in ((16, 6), (32, 21), (64, 64)):
        h = np.zeros((1, 1, side, side), np.float32)
        fg = np.zeros((1, side, side), bool)
        fg[0, 4:12, 4:12] = True
        h[0, 0][fg[0]] = np.arange(1, 65, dtype=np.float32)
        r = _result_with(h, [[0.0]], [0.0])  # M_te = 0 -> q = 0.98
        r.foreground = fg
        cal = Calibration(w=1, cos_threshold=1.0, m_max=[2.0], median_size=1, min_component=0, brain_fraction=0.25)
        m = segment(r, cal).masks[0]
        # quantile(1..64, 0.92) = 58.96 -> values 59..64: 6 pixels, the brightest ones
        assert m.sum() == 6 and h[0, 0][m].min() == 59
        paper = segment(r, Calibration(w=1, cos_threshold=1.0, m_max=[2.0], median_size=1, min_component=0))
        assert paper.masks[0].sum() == paper_count


def test_settings_round_trip_through_json():
    import json

    st = FPDMSettings(
        w=3.0, steps=300, stride=5, mode="ddpm", unguided="healthy", map_channels=(0, 3), cosine_steps=100
    )
    back = FPDMSettings.from_dict(json.loads(json.dumps(st.as_dict())))
    assert back == st
    assert FPDMSettings.from_dict(st.as_dict(), batch_size=7).batch_size == 7


def test_visited_grid_always_ends_on_the_last_step():
    """Hand cases: every stride-th step from 0, and steps − 1 appended when the grid misses it."""
    assert FPDMSettings(steps=600, stride=1).visited.tolist() == list(range(600))
    assert FPDMSettings(steps=600, stride=30).visited.tolist() == [*range(0, 600, 30), 599]
    assert FPDMSettings(steps=601, stride=30).visited.tolist() == list(range(0, 601, 30))  # 600 is on the grid
    assert FPDMSettings(steps=10, stride=4).visited.tolist() == [0, 4, 8, 9]
    assert FPDMSettings(steps=1, stride=5).visited.tolist() == [0]


class AffineInTimeEps(nn.Module):
    """ε(x_t, t, y) = α_y + t·β: independent of x_t and affine in the step. Linear extrapolation of ε
    from two visited steps is then exact, so the strided "extrapolate" inversion departs from the
    stride-1 trajectory only in its first gap (where one ε is all there is), while one eq. 4 jump per
    gap departs in every gap."""

    def __init__(self, size=8):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.alpha = torch.randn(2, 2, size, size, generator=g) * 0.5  # [label, C, S, S]
        self.beta = torch.randn(2, size, size, generator=g) * 2e-2
        self.config = type("Cfg", (), {"in_channels": 2, "image_size": size})()

    def forward(self, x, t, y):
        a = self.alpha[(y == NULL).long()]
        return a + t.float().reshape(-1, 1, 1, 1) * self.beta


def test_extrapolated_gap_follows_the_stride_1_trajectory():
    """Without clipping, DDIM inversion is y_{u+1} = y_u + ε_u·(σ_{u+1} − σ_u) with y = x/√ᾱ and
    σ = √((1−ᾱ)/ᾱ). For ε affine in t the "extrapolate" path then differs from stride 1 by the first
    gap's constant offset only, and the jump path by one such offset per gap: over 25 gaps the
    extrapolated MSEʰ sequence must be over 10× closer to the stride-1 one than the jump's."""
    model = AffineInTimeEps()
    x0 = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    kw = {"w": 2.0, "steps": 101, "mode": "ddim", "clip_x0": False}
    full = forward_process(model, x0, FPDMSettings(stride=1, **kw))
    ext = forward_process(model, x0, FPDMSettings(stride=4, gap="extrapolate", **kw))
    jump = forward_process(model, x0, FPDMSettings(stride=4, gap="jump", **kw))
    grid = ext.steps  # 0, 4, ..., 100
    assert ext.network_calls == jump.network_calls == len(grid) == 26  # no extra network calls
    np.testing.assert_array_equal(ext.mse_h[:, :2], jump.mse_h[:, :2])  # same first gap
    err_ext = np.abs(ext.mse_h - full.mse_h[:, grid]).max()
    err_jump = np.abs(jump.mse_h - full.mse_h[:, grid]).max()
    assert err_jump > 1e-3
    assert err_ext < err_jump / 10  # measured: 22×
    with pytest.raises(ValueError, match="gap"):
        FPDMSettings(gap="euler")


# --------------------------------------------------------------- clamp of the predictions (issue 19.6)
@pytest.mark.parametrize("mode", ["ddim", "ddpm"])
def test_clip_denoised_clamps_both_predictions_before_m_s_and_the_mses(mode):
    """Point mass (σ = 0): x̃_0 = μ exactly, so HGP = (1+w)μ_h − wμ_∅ and UGP = μ_∅ by hand. With w = 1
    on a 4×4 slice, x_0 = 0: 4 pixels μ_h = 0.9, μ_∅ = 0.3 (HGP 1.5 → 1), 4 pixels μ_h = 0.4,
    μ_∅ = 1.6 (UGP 1.6 → 1, HGP −0.8), 8 pixels μ_h = μ_∅ = 0.2. Clamped: M_t = (4·0.7² + 4·1.8²)/16
    = 0.9325, MSEʰ = (4·1 + 4·0.64 + 8·0.04)/16 = 0.43, MSE^∅ = (4·0.09 + 4·1 + 8·0.04)/16 = 0.2925.
    Unclamped (the paper's eqs.): M_t = (1+w)²·mean((μ_h − μ_∅)²) = 1.8, MSEʰ = 0.7425, MSE^∅ = 0.6825."""
    mu_h = torch.full((1, 4, 4), 0.2)
    mu_null = mu_h.clone()
    mu_h[0, 0], mu_null[0, 0] = 0.9, 0.3
    mu_h[0, 1], mu_null[0, 1] = 0.4, 1.6
    model = GaussianEps(mu_h, mu_null, sigma=0.0, size=4)
    x0 = torch.zeros(2, 1, 4, 4)
    hgp = 2 * mu_h - mu_null
    for clip, m, mse_h, mse_u in ((True, 0.9325, 0.43, 0.2925), (False, 1.8, 0.7425, 0.6825)):
        r = forward_process(model, x0, FPDMSettings(w=1.0, steps=30, stride=5, mode=mode, clip_denoised=clip))
        assert np.allclose(r.m, m, rtol=1e-5)
        assert np.allclose(r.mse_h, mse_h, rtol=1e-5) and np.allclose(r.mse_u, mse_u, rtol=1e-5)
        s_expected = ((hgp.clamp(-1, 1) if clip else hgp) ** 2).numpy()  # eq. 19 with x_0 = 0
        assert np.allclose(r.h, s_expected[None], rtol=1e-5, atol=1e-6)
        assert np.allclose(r.s_te, s_expected[None], rtol=1e-5, atol=1e-6)


def test_stored_settings_without_the_new_fields_keep_their_old_behaviour():
    """Settings stored before clip_denoised / cosine_weighting existed were calibrated without the
    clamp and with uniform weights; new settings keep what they store."""
    old = FPDMSettings().as_dict()
    del old["clip_denoised"], old["cosine_weighting"]
    back = FPDMSettings.from_dict(old)
    assert back.clip_denoised is False and back.cosine_weighting == "uniform"
    assert FPDMSettings().clip_denoised is True and FPDMSettings().cosine_weighting == "spacing"
    assert FPDMSettings.from_dict(FPDMSettings().as_dict()) == FPDMSettings()
    with pytest.raises(ValueError, match="cosine_weighting"):
        FPDMSettings(cosine_weighting="trapezoid")


# ------------------------------------------------------------------ eq. 18 weights (issue 19.8)
def test_cosine_weights_hand_cases():
    """Visited 0, 4, 8, 9 of 10 steps: trapezoid gaps 4, 4, 1 → (2, 2+2, 2+½, ½) plus ½ at each end
    = (2.5, 4, 2.5, 1); left Riemann (4, 4, 1, 1). Both sum to the 10 unit steps; stride 1 → all 1.
    A horizon past the last visited step (8 of horizon 10) gives it the unit steps 9 and 10 − 1."""
    v = FPDMSettings(steps=10, stride=4).visited
    np.testing.assert_allclose(cosine_weights(v, 10), [2.5, 4, 2.5, 1])
    np.testing.assert_allclose(cosine_weights(v, 10, "left"), [4, 4, 1, 1])
    np.testing.assert_array_equal(cosine_weights(np.arange(600), 600), np.ones(600))
    np.testing.assert_array_equal(cosine_weights(np.arange(600), 600, "left"), np.ones(600))
    np.testing.assert_allclose(cosine_weights(np.array([0, 4, 8]), 10), [2.5, 4, 3.5])
    assert cosine_weights(FPDMSettings(steps=600, stride=30).visited, 600).sum() == 600
    assert len(cosine_weights(np.array([], int), 0)) == 0
    # the weighted cosine by hand: a = (1, 0), b = (1, 1), weights (3, 1) → 3 / √(3 · 4) = √3/2
    st = FPDMSettings(steps=2, stride=1, cosine_steps=2)
    assert sequence_cosine(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]), st)[0] == pytest.approx(2**-0.5)
    from AnomalyDiffusionLib.fpdm import _cosine

    assert _cosine(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]), np.array([3.0, 1.0]))[0] == pytest.approx(3**0.5 / 2)


def _smooth_mse(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, 600] MSE sequences that are smooth functions of the step: MSE^∅ rising as a power of t, MSEʰ
    the same plus a Gaussian bump of random place, width and height (an anomaly's signature)."""
    rng = np.random.default_rng(seed)
    t = np.arange(600.0)
    mse_u = 0.02 + rng.uniform(0.2, 1.0, (n, 1)) * (t / 600) ** rng.uniform(1.5, 3, (n, 1))
    bump = np.exp(-(((t - rng.uniform(100, 550, (n, 1))) / rng.uniform(40, 200, (n, 1))) ** 2))
    return mse_u + rng.uniform(0, 0.3, (n, 1)) * bump, mse_u


def test_spacing_weights_make_strided_cosines_approximate_stride_1_on_smooth_sequences():
    """Eq. 18 sums over all 600 steps. On smooth sequences sampled at stride 10 and 30, weighting each
    visited step by the steps it stands for (trapezoid) is much closer to the stride-1 cosine than
    weighting them alike (measured max |error| over 100 sequences: stride 10 4.4e-3 → 6.8e-5, stride 30
    1.2e-2 → 6.1e-4; left Riemann weights are hardly better than uniform, 3.6e-3 and 1.2e-2). At
    stride 1 the two weightings agree exactly."""
    mse_h, mse_u = _smooth_mse(100)
    full = FPDMSettings(steps=600, stride=1)
    ref = sequence_cosine(mse_h, mse_u, full)
    np.testing.assert_array_equal(
        ref, sequence_cosine(mse_h, mse_u, dataclasses.replace(full, cosine_weighting="uniform"))
    )
    assert ref.min() < 0.9 and ref.max() > 0.9999  # the sequences span the range the classifier sees
    for stride, ratio in ((10, 20), (30, 8)):
        st = FPDMSettings(steps=600, stride=stride)
        v = st.visited
        err = {
            wt: np.abs(
                sequence_cosine(mse_h[:, v], mse_u[:, v], dataclasses.replace(st, cosine_weighting=wt)) - ref
            ).max()
            for wt in ("uniform", "spacing")
        }
        assert err["spacing"] * ratio < err["uniform"], (stride, err)


def test_spacing_weights_through_the_forward_process_on_a_gaussian_model():
    """The same through :func:`forward_process` on the exact-ε Gaussian model (class signal peaking at
    step 250), DDIM with the stride-1-following gap ("extrapolate"): the weighted strided cosine is
    closer to the stride-1 one (measured max |error| over 16 slices: stride 10 3.0e-3 → 6.2e-4,
    stride 30 6.1e-3 → 5.2e-3). With one eq. 4 jump per gap the strided trajectory itself departs
    from stride 1 and that error dominates (stride 10: 5.5e-3 uniform, 7.7e-3 weighted). At stride 1
    the weightings agree exactly."""
    g = torch.Generator().manual_seed(0)
    mu_h = torch.rand(2, 8, 8, generator=g) * 0.6 - 0.5
    mu_null = mu_h.clone()
    mu_null[:, 2:5, 3:6] += 0.8
    model = GaussianEps(mu_h, mu_null, sigma=0.3, gain=lambda t: torch.exp(-(((t.float() - 250.0) / 150.0) ** 2)))
    x0 = (mu_h[None] + 0.3 * torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    x0[:8] = (mu_null[None] + 0.3 * torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
    base = FPDMSettings(w=2, steps=600, stride=1)
    r1 = forward_process(model, x0, base)
    uniform1 = sequence_cosine(r1.mse_h, r1.mse_u, dataclasses.replace(base, cosine_weighting="uniform"))
    np.testing.assert_array_equal(r1.cosine, uniform1.astype(np.float32))
    for stride in (10, 30):
        st = dataclasses.replace(base, stride=stride, gap="extrapolate")
        r = forward_process(model, x0, st)
        err = {
            wt: np.abs(
                sequence_cosine(r.mse_h, r.mse_u, dataclasses.replace(st, cosine_weighting=wt)) - r1.cosine
            ).max()
            for wt in ("uniform", "spacing")
        }
        assert err["spacing"] < err["uniform"], (stride, err)
        assert np.abs(r.cosine - r1.cosine).max() == pytest.approx(err["spacing"], rel=1e-5)  # the default


def test_early_stop_decides_with_the_configured_cosine(means):
    """Early stop lets slices the cosine calls healthy leave at the horizon. Threshold 0.9 lies between
    the weighted (≈ 0.896) and uniform (≈ 0.910) cosines of slices 0-3: with weighted cosines they
    stay, with uniform ones they leave after the 10 visited steps before the horizon 300."""
    mu_h, mu_null = means
    model = GaussianEps(mu_h, mu_null, sigma=0.3, gain=lambda t: torch.exp(-(((t.float() - 200.0) / 80.0) ** 2)))
    x0 = mu_null[None].repeat(8, 1, 1, 1) + 0.1 * torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    x0[4:] = mu_h[None] + 0.1 * torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    st = FPDMSettings(w=2, steps=600, stride=30, cosine_steps=300, early_stop=True, patience=200)
    for wt, leave in (("spacing", False), ("uniform", True)):
        s = dataclasses.replace(st, cosine_weighting=wt)
        full = forward_process(model, x0, dataclasses.replace(s, early_stop=False))
        assert ((full.cosine[:4] > 0.9) == leave).all() and (full.cosine[4:] < 0.9).all()
        r = forward_process(model, x0, s, cos_threshold=0.9)
        np.testing.assert_allclose(r.cosine, full.cosine)
        assert ((r.steps_run[:4] == 10) == leave).all() and (r.steps_run[4:] > 10).all()


# ------------------------------------------------------- calibration bound to inference (19.7)
def test_calibration_mismatches_hand_cases():
    st = FPDMSettings(w=2.0, steps=600, stride=30, map_channels=(0, 1))
    cal = Calibration(w=2.0, cos_threshold=0.9, m_max=[1.0, 1.0], settings=st.calibration_dict())
    assert calibration_mismatches(st, cal) == []
    assert calibration_mismatches(dataclasses.replace(st, batch_size=4, early_stop=True), cal) == []  # no effect
    assert calibration_mismatches(dataclasses.replace(st, stride=10), cal) == [
        "AnoFPDM stride 10 differs from the stride 30 the bundle was calibrated with; its cosine threshold and "
        "M_max may not hold"
    ]
    two = calibration_mismatches(dataclasses.replace(st, w=3.0, clip_denoised=False), cal)
    assert len(two) == 2 and two[0].startswith("AnoFPDM guidance w 3 differs from the guidance w 2 ")
    assert "clip_denoised (clamp of the predictions) False differs" in two[1]
    (cw,) = calibration_mismatches(dataclasses.replace(st, cosine_weighting="uniform"), cal)
    assert cw.endswith("its cosine threshold may not hold")  # M_max does not depend on it
    # the cosine horizon is compared as a horizon: None means all steps
    assert calibration_mismatches(dataclasses.replace(st, cosine_steps=600), cal) == []
    (hz,) = calibration_mismatches(dataclasses.replace(st, cosine_steps=300), cal)
    assert "cosine horizon 300 differs from the cosine horizon 600" in hz
    assert "map channels [0] differs" in calibration_mismatches(dataclasses.replace(st, map_channels=(0,)), cal)[0]
    # old calibrations know their w and, from a bundle's manifest, the stride only
    old = Calibration(w=2.0, cos_threshold=0.9, m_max=[1.0, 1.0])
    other = dataclasses.replace(st, stride=1, mode="ddpm", clip_denoised=False)
    assert calibration_mismatches(other, old) == []
    assert len(calibration_mismatches(other, old, calibrated_stride=30)) == 1
    assert "guidance w 5 differs from the guidance w 2" in calibration_mismatches(dataclasses.replace(st, w=5), old)[0]


# ------------------------------------------------------------------ w grid extension (19.9)
def test_extend_guidance_grid_hand_cases():
    def table(accs: dict[float, float]) -> dict:
        return {w: {"accuracy": a, "threshold": 0.0} for w, a in accs.items()}

    # best at the top and still rising: 1.5× the last, two per round
    assert extend_guidance_grid(table({0: 0.7, 2: 0.8, 5: 0.85})) == [7.5, 11.25]
    assert extend_guidance_grid(table({5: 0.85, 7.5: 0.86, 11.25: 0.87})) == [16.875, 25.3125]
    assert extend_guidance_grid(table({25.3125: 0.8, 30: 0.9}), cap=40) == [40.0]  # 45 capped
    assert extend_guidance_grid(table({30: 0.8, 40: 0.9}), cap=40) is None  # at the cap
    assert extend_guidance_grid(table({0: 0.5})) == [1.0, 1.5]  # after w = 0: 1, then 1.5×
    # the best inside the grid (the accuracy fell at the top): no extension; a plateau at the top has
    # not fallen yet, so the grid goes on
    assert extend_guidance_grid(table({0: 0.7, 2: 0.9, 5: 0.85})) is None
    assert extend_guidance_grid(table({0: 0.7, 2: 0.9, 5: 0.9})) == [7.5, 11.25]
    # the rule stays select_guidance's: after an extension w* is the largest within 99 % of the best
    labels = np.array([1] * 100 + [0] * 100)
    cos = {w: np.where(labels == 1, 0.1, 0.9) for w in (0.0, 2.0, 5.0, 7.5, 11.25)}
    for w, wrong in ((0.0, 40), (2.0, 20), (5.0, 10), (7.5, 4), (11.25, 5)):
        cos[w][:wrong] = 0.95
    w_star, tab = select_guidance({w: cos[w] for w in (0.0, 2.0, 5.0)}, labels)
    assert w_star == 5.0 and extend_guidance_grid(tab) == [7.5, 11.25]
    w_star, tab = select_guidance(cos, labels)
    assert w_star == 11.25 and extend_guidance_grid(tab) is None  # 0.975 ≥ 0.99 · 0.98; 7.5 is the best
