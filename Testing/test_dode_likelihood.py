"""AnoDODE likelihood against closed forms: Gaussian data have an exact score at every t."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from AnomalyDiffusionLib.dode.likelihood import anomaly_score, bpd, likelihood_scipy, likelihood_torch
from AnomalyDiffusionLib.dode.sde import VPSDE

SDE = VPSDE()
EPS = 1e-5


class GaussianScore:
    """Data z_0 ~ N(μ, Σ): p_t = N(m μ, m² Σ + σ² I), so ∇ log p_t(z) = −(m²Σ + σ²I)⁻¹ (z − m μ)."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor) -> None:
        self.mu, self.cov, self.shape = mu.reshape(-1).double(), cov.double(), mu.shape

    def covariance(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        m, s = SDE.marginal(torch.tensor(t, dtype=torch.float64))
        return m * self.mu, m**2 * self.cov + s**2 * torch.eye(len(self.mu), dtype=torch.float64)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = []
        for zi, ti in zip(z, t, strict=True):
            mean, cov = self.covariance(float(ti))
            out.append(-torch.linalg.solve(cov, zi.reshape(-1).double() - mean).float())
        return torch.stack(out).reshape(z.shape)

    def exact_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p_T at T = 1 (not exactly N(0, I): the mean m(1)·μ survives)."""
        return torch.from_numpy(self.exact_logp(z, 1.0))

    def exact_logp(self, z: torch.Tensor, t: float = EPS) -> np.ndarray:
        """log p_ε(z): the density the ODE likelihood computes at the start time ε."""
        mean, cov = self.covariance(t)
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        return dist.log_prob(z.reshape(z.shape[0], -1).double()).numpy()


def test_vpsde_closed_forms():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    m, s = SDE.marginal(t)
    expected = torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    assert torch.allclose(m, expected) and torch.allclose(s**2 + m**2, torch.ones(3, dtype=torch.float64))
    assert float(m[2]) == pytest.approx(math.exp(-5.025))
    assert torch.allclose(SDE.beta(t), torch.tensor([0.1, 10.05, 20.0], dtype=torch.float64))
    z = torch.tensor([[3.0, 4.0]])
    assert float(VPSDE.prior_logp(z)) == pytest.approx(-math.log(2 * math.pi) - 12.5)
    score = torch.tensor([[1.0, -2.0]])
    tt = torch.tensor([0.5])
    assert torch.allclose(SDE.ode_drift(z, tt, score), -0.5 * 10.05 * (z + score))  # eq. 9
    assert torch.allclose(SDE.reverse_drift(z, tt, score), -0.5 * 10.05 * z - 10.05 * score)  # eq. 7
    betas, alphas = SDE.discrete()
    assert float(betas[0]) == pytest.approx(0.1 / 1000) and float(alphas[-1]) == pytest.approx(1 - 0.02)


def test_bpd_definition():
    assert bpd(np.array([-8 * math.log(2)]), 8)[0] == pytest.approx(1.0)
    assert anomaly_score(
        [type("L", (), {"bpd": np.array([1.0, 3.0])})(), type("L", (), {"bpd": np.array([2.0, 5.0])})()]
    ).tolist() == [1.5, 4.0]


@pytest.fixture
def diagonal():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 2, 2, generator=g)
    var = torch.rand(8, generator=g) * 1.5 + 0.2
    return GaussianScore(mu, torch.diag(var)), mu + var.sqrt().reshape(2, 2, 2) * torch.randn(3, 2, 2, 2, generator=g)


@pytest.mark.parametrize("probe", ["exact", "rademacher"])
def test_both_solvers_match_the_exact_gaussian_log_density(diagonal, probe):
    """Exact traces, and Rademacher probes (exact for a diagonal Jacobian: Σ c_i ε_i² = Σ c_i)."""
    model, z = diagonal
    exact = model.exact_logp(z)
    for res in (
        likelihood_scipy(model, z, probe=probe, prior=model.exact_prior),
        likelihood_torch(model, z, probe=probe, priors=[model.exact_prior])[0],
    ):
        assert np.allclose(res.logp, exact, atol=2e-3), (res.logp, exact)
        assert np.allclose(res.bpd, -exact / (8 * math.log(2)), atol=1e-3)


def test_standard_prior_is_exact_for_zero_mean_data():
    """With μ = 0, p_1 = N(0, m²Σ + σ²I) ≈ N(0, I) up to m(1)² ≈ 4e-5: the plain method is exact."""
    g = torch.Generator().manual_seed(4)
    model = GaussianScore(torch.zeros(2, 2, 2), torch.diag(torch.rand(8, generator=g) + 0.3))
    z = torch.randn(3, 2, 2, 2, generator=g)
    assert np.allclose(likelihood_torch(model, z)[0].logp, model.exact_logp(z), atol=2e-3)


def test_hutchinson_is_unbiased_on_a_full_covariance_gaussian():
    """Non-diagonal Jacobian: single-probe estimates scatter, their mean converges to the truth."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g) * 0.5
    model = GaussianScore(torch.zeros(6), a @ a.T + 0.3 * torch.eye(6))
    z = torch.randn(1, 6, generator=g).repeat(48, 1)  # one point, 48 independent probes
    exact = model.exact_logp(z[:1])[0]
    for probe in ("rademacher", "gaussian"):
        res = likelihood_torch(model, z, probe=probe, seed=3)[0]
        se = res.logp.std(ddof=1) / math.sqrt(len(z))
        assert res.logp.std() > 1e-3  # the estimate really is stochastic here
        assert abs(res.logp.mean() - exact) < 4 * se + 1e-3


def test_batched_solver_agrees_with_the_per_sample_baseline_on_several_scales():
    g = torch.Generator().manual_seed(2)
    m1 = GaussianScore(torch.randn(3, 2, 2, generator=g), torch.diag(torch.rand(12, generator=g) + 0.5))
    m2 = GaussianScore(torch.randn(3, 1, 1, generator=g), torch.diag(torch.rand(3, generator=g) + 0.5))
    z1 = torch.randn(4, 3, 2, 2, generator=g) * 1.2
    z2 = torch.randn(4, 3, 1, 1, generator=g) * 3.0  # far in the tail: low likelihood, high bpd
    r1, r2 = likelihood_torch([m1, m2], [z1, z2], probe="rademacher", seed=5, priors=[m1.exact_prior, m2.exact_prior])
    b1 = likelihood_scipy(m1, z1, probe="rademacher", seed=5, prior=m1.exact_prior)
    assert np.allclose(r1.logp, b1.logp, atol=2e-3)
    assert np.allclose(r1.logp, m1.exact_logp(z1), atol=2e-3) and np.allclose(r2.logp, m2.exact_logp(z2), atol=2e-3)
    assert np.allclose(anomaly_score([r1, r2]), (r1.bpd + r2.bpd) / 2)


def test_explicit_probes_make_both_solvers_estimate_the_same_trace():
    """With a full covariance the Hutchinson estimate depends on the probe; handing both solvers the
    same vectors for every scale leaves only the integration to differ (what benchmarks/dode_speed.py
    compares)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 3, generator=g)
    m1 = GaussianScore(torch.zeros(2, 1, 1), torch.diag(torch.rand(2, generator=g) + 0.5))
    m2 = GaussianScore(torch.randn(3, 1, 1, generator=g), a @ a.T + 0.1 * torch.eye(3))  # strongly correlated
    z1, z2 = torch.randn(5, 2, 1, 1, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    p1 = torch.randint(0, 2, z1.shape, generator=g).float() * 2 - 1
    p2 = torch.randint(0, 2, z2.shape, generator=g).float() * 2 - 1
    priors = [m1.exact_prior, m2.exact_prior]
    r1, r2 = likelihood_torch([m1, m2], [z1, z2], probes=[p1, p2], priors=priors)
    b1 = likelihood_scipy(m1, z1, probes=p1, prior=m1.exact_prior)
    b2 = likelihood_scipy(m2, z2, probes=p2, prior=m2.exact_prior)
    assert np.allclose(r1.logp, b1.logp, atol=2e-3) and np.allclose(r2.logp, b2.logp, atol=2e-3)
    other = likelihood_scipy(m2, z2, probes=p2.roll(1, 0), prior=m2.exact_prior)
    assert np.abs(other.logp - r2.logp).max() > 0.05  # the probes matter for this covariance
    with pytest.raises(ValueError, match="probes have shape"):
        likelihood_scipy(m2, z2, probes=p1)
    with pytest.raises(ValueError, match="probe tensor"):
        likelihood_torch([m1, m2], [z1, z2], probes=[p1])


@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_few_hundred_dimensions_within_half_a_percent_through_both_solvers(kind):
    """D = 256 (a 4×8×8 feature map), exact trace: log p within 0.5 % of the exact Gaussian density
    through the per-sample scipy RK45 and the batched torch solver."""
    g = torch.Generator().manual_seed(7)
    d = 256
    if kind == "diagonal":
        cov = torch.diag(torch.rand(d, generator=g) + 0.3)
    else:
        a = torch.randn(d, d, generator=g) / math.sqrt(d)
        cov = a @ a.T + 0.3 * torch.eye(d)
    model = GaussianScore(torch.randn(4, 8, 8, generator=g) * 0.5, cov)
    chol = torch.linalg.cholesky(cov)
    z = (model.mu + (chol @ torch.randn(d, 2, generator=g)).T).reshape(2, 4, 8, 8).float()
    exact = model.exact_logp(z)
    for res in (
        likelihood_scipy(model, z, probe="exact", prior=model.exact_prior),
        likelihood_torch(model, z, probe="exact", priors=[model.exact_prior])[0],
    ):
        assert np.all(np.abs(res.logp - exact) <= 0.005 * np.abs(exact)), (res.logp, exact)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_mean_matches_the_exact_trace_in_256_dimensions(probe):
    """∇·f̃ at one point: the mean of εᵀ(∇f̃)ε over 2,000 probes is within 4 standard errors of the
    exact trace (full covariance, so the Jacobian is not diagonal)."""
    from AnomalyDiffusionLib.dode.likelihood import drift_and_divergence, make_probe

    g = torch.Generator().manual_seed(8)
    d = 256
    a = torch.randn(d, d, generator=g) / math.sqrt(d)
    cov = a @ a.T + 0.3 * torch.eye(d)
    m, s = SDE.marginal(torch.tensor(0.3))
    prec = torch.linalg.inv(m**2 * cov + s**2 * torch.eye(d)).float()

    def score(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -(z.reshape(z.shape[0], -1) @ prec).reshape(z.shape)

    z = torch.randn(1, 4, 8, 8, generator=g).repeat(2000, 1, 1, 1)
    t = torch.full((2000,), 0.3)
    _, exact = drift_and_divergence(score, SDE, z[:1], t[:1], None)
    _, est = drift_and_divergence(score, SDE, z, t, make_probe(z.shape, probe, g))
    se = est.std() / math.sqrt(len(est))
    assert abs(float(est.mean() - exact[0])) < 4 * float(se)
    assert float(se) > 0  # a real estimate, not the exact value in disguise


def test_speed_benchmark_compares_both_solvers_on_the_same_probes(tmp_path):
    """benchmarks/dode_speed.py on the embedded bundle (one scale, two slices, loose tolerances):
    the per-sample baseline and each batched tolerance agree on bpd and are all reported."""
    import json
    import sys
    from pathlib import Path

    from AnomalyDiffusionLib.bundle import default_bundle_path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import dode_speed

    out = tmp_path / "speed.json"
    res = dode_speed.main(
        [
            "--model",
            str(default_bundle_path()),
            "--scales",
            "128",
            "--slices",
            "2",
            "--rtol",
            "1e-3",
            "--batched-rtol",
            "1e-2",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == res
    assert res["scales"] == [128] and res["slices"] == 2
    # one solve per sample and scale for the baseline, one per step for the batched solve
    assert res["network_calls_scipy"] >= 2 * 10 and res["network_calls_torch"] >= 10
    assert res["max_abs_bpd_difference"] < 5e-3  # same probes, same tolerance: only the integration differs
    assert res["max_abs_bpd_difference_rtol_0.01"] < 5e-2
    assert res["ratio"] > 0 and res["ratio_rtol_0.01"] > 0


def test_k_probes_in_one_solve_are_the_mean_of_k_single_probe_solves():
    """z(t) does not depend on the probe, so the K-probe solve (one forward, K VJPs per evaluation)
    gives exactly the mean of K one-probe solves, and its error against the exact log density falls
    like 1/√K (full covariance: every single probe is off)."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4, 4, generator=g)
    model = GaussianScore(torch.randn(4, 1, 1, generator=g), a @ a.T + 0.1 * torch.eye(4))
    z = torch.randn(3, 4, 1, 1, generator=g)
    probes = torch.randint(0, 2, (6, *z.shape), generator=g).float() * 2 - 1
    kw = {"rtol": 1e-7, "atol": 1e-7, "priors": [model.exact_prior]}
    joint = likelihood_torch(model, z, probes=[probes], **kw)[0].logp
    single = np.mean([likelihood_torch(model, z, probes=[p], **kw)[0].logp for p in probes], 0)
    assert np.allclose(joint, single, atol=1e-5)
    scipy_joint = likelihood_scipy(model, z, probes=probes, rtol=1e-7, atol=1e-7, prior=model.exact_prior).logp
    assert np.allclose(scipy_joint, joint, atol=1e-4)  # both solvers take [K, B, ...] probes

    exact = model.exact_logp(z)
    err = {k: [] for k in (1, 16)}
    for k in err:
        for s in range(8):
            est = likelihood_torch(model, z, seed=100 + s, n_probes=k, **kw)[0]
            err[k].append(est.logp - exact)
    rms1, rms16 = (float(np.sqrt(np.mean(np.square(err[k])))) for k in (1, 16))
    assert rms16 < 0.5 * rms1  # 1/√16 = 0.25 in expectation; 0.5 leaves room for 24 draws


def test_probe_count_is_validated():
    from AnomalyDiffusionLib.dode.likelihood import make_probe

    g = torch.Generator().manual_seed(0)
    assert make_probe((2, 3), "rademacher", g).shape == (2, 3)
    assert make_probe((2, 3), "gaussian", g, count=5).shape == (5, 2, 3)
    assert make_probe((2, 3), "exact", g, count=5) is None
    with pytest.raises(ValueError, match="≥ 1"):
        make_probe((2, 3), "rademacher", g, count=0)
