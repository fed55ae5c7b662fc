"""AnoFPDM's forward process: per-slice statistics from the forward process of a guided DDPM.

Equation numbers refer to Che et al., "AnoFPDM" (``../shared/papers/003_*.txt``). Per slice ``x_0``
and forward step ``t``:

* ``x_t``: DDPM mode, eq. 2 with fresh noise each step; DDIM mode, ``x_1`` from eq. 2 and later steps
  by the deterministic DDIM inversion of eq. 4, driven by the unconditional ε_∅ (with x̃_0 clipped
  to [-1, 1], as in the reference code). With a step ``stride`` > 1, eq. 4 jumps between the visited
  steps directly; the visited grid 0, stride, 2·stride, … always ends on the last step (steps − 1),
  because M_t often still rises at the end of the range and t_e sits there (without it a stride of
  30 would stop at 570 of 600, and a stride of 2 moved t_e by more than the stride on 28 % of the
  speed benchmark's slice channels; with it, 3 %).
* One network call per step on the stacked batch ``[x_t with label h ; x_t with label ∅]`` gives
  ε_h and ε_∅. Guided ε (eq. 6) → healthy-guided prediction x̃ʰ_{0,t} (eq. 7); ε_∅ → unguided
  prediction x̃^∅_{0,t} (eq. 10), and the same ε_∅ drives the DDIM inversion step. The reference
  code makes four separate calls per step for the same quantities.
* ``unguided="healthy"`` reproduces the authors' public code instead of eq. 10: the unguided
  prediction uses the *healthy* label with w = 0. Since x̃ʰ − x̃^∅ = −√((1−ᾱ_t)/ᾱ_t)·(1+w)(ε_h − ε_∅)
  in the paper's form but −√((1−ᾱ_t)/ᾱ_t)·w(ε_h − ε_∅) in the code's, M_t scales with w² instead
  of (1 + w)² (M_t = 0 at w = 0), MSE^∅ becomes the healthy-label error, and the cosine classifier
  changes; calibrate with the same form you infer with.
* ``clip_denoised`` (default on, as the reference code: ``calc_pred_xstart_loop(clip_denoised=True)``
  → ``process_xstart`` → ``clamp(-1, 1)``) clamps both predictions x̃ʰ_{0,t} and x̃^∅_{0,t} to
  [-1, 1] before anything below uses them; off, they follow the paper's eqs. 7 and 10 unbounded.
  Bundles stored before the setting existed were calibrated without the clamp and are read with
  it off (:meth:`FPDMSettings.from_dict`).
* Divergence M_t = ‖x̃ʰ − x̃^∅‖²/d per modality channel (eq. 12), sub-anomaly map
  S_t = (x̃ʰ_{0,t} − x_0)² (eq. 19), t_e = argmax_t M_t per channel (eq. 21), aggregated map
  H = mean of S_t over the steps up to t_e (eq. 20), and the S_{t_e}-only variant. M_t scales with
  (1 + w)² (eq. 13; exactly without the clamp), so M_max must be calibrated at the w used for inference.
* MSE sequences MSEʰ_t = ‖x̃ʰ − x_0‖²/d and MSE^∅_t = ‖x̃^∅ − x_0‖²/d and their cosine similarity
  (eq. 18) classify the slice (unhealthy if the cosine ≤ the calibrated threshold). Eq. 18 sums over
  every step; with a stride the visited steps stand for the steps between them, so by default
  (``cosine_weighting="spacing"``) each term is weighted by the unit steps it stands for
  (:func:`cosine_weights`); "uniform" weights every visited step alike (the behaviour before, and
  that of stored bundles without the setting). The weights remove the quadrature error of the
  strided sum (shipped phantom model, its stride-1 sequences taken at every 10th step: max cosine
  error 5.9e-3 → 5.2e-4), but a strided DDIM run's trajectory departs from the stride-1 one by more
  than that (max errors 0.02-0.11 at stride 10-30 there, not reduced by the weights), so the cosine
  threshold holds only at the stride it was calibrated at (:func:`calibration_mismatches`).

What is decided from these statistics (slice classes, Algorithm 1's level, masks, calibration) is
:mod:`~AnomalyDiffusionLib.fpdm.decision`; a calibration holds the settings it was made with and
:func:`~AnomalyDiffusionLib.fpdm.decision.calibration_mismatches` names every inference setting
that differs from them (the pipeline reports these as warnings).

Streaming: only running sums are kept (Σ S_t, the sum at the running argmax of M_t, S at that step),
so memory does not grow with the number of steps; the per-step scalars (M_t, MSEs) are kept for the
classifier and for plots. Optional early stop: once a slice's M_t has fallen below ``drop`` × its
peak for ``patience`` steps (and the cosine horizon is passed), the slice leaves the batch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..diffusion import HEALTHY, NULL, Schedule, predict_x0, q_sample
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, report

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FPDMSettings:
    """How the forward process runs. Steps are 0-based indices into the T-step schedule."""

    w: float = 2.0  #: guidance strength (BraTS w* = 2 in the paper)
    steps: int = 600  #: forward steps run (reference code: 600 of T = 1000 for BraTS)
    stride: int = 1  #: visit every ``stride``-th step
    mode: str = "ddim"  #: "ddim" (deterministic encoding, eq. 4) or "ddpm" (stochastic, eq. 2)
    unguided: str = "null"  #: "null" = paper eq. 10; "healthy" = reference code (healthy label, w = 0)
    map_channels: tuple[int, ...] | None = None  #: channels used for M_t and maps (None: all)
    clip_x0: bool = True  #: clip x̃_0 to [-1, 1] inside the DDIM inversion (reference code)
    early_stop: bool = False
    patience: int = 60  #: early stop: steps (in schedule units) past the running M_t peak ...
    drop: float = 0.5  #: ... with M_t below ``drop`` × that peak on every map channel
    cosine_steps: int | None = None  #: horizon of the eq. 18 sequences (None: all ``steps``)
    #: eq. 18 terms weighted by the unit steps each visited step stands for ("spacing", see
    #: :func:`cosine_weights`) or all alike ("uniform", the behaviour before this setting existed)
    cosine_weighting: str = "spacing"
    #: clamp x̃ʰ_{0,t} and x̃^∅_{0,t} to [-1, 1] before M_t, S_t and the MSEs (reference code); off
    #: follows the paper's eqs. 7 and 10 unbounded (and bundles stored before this setting existed)
    clip_denoised: bool = True
    batch_size: int = 32  #: slices per batch (each network call sees twice as many inputs)
    #: DDIM with stride > 1: "jump" applies eq. 4 once across the gap between visited steps;
    #: "extrapolate" takes the stride-1 inversion's unit steps across the gap instead, with ε_∅ at the
    #: unvisited steps extrapolated linearly from the last two visited ε_∅ (no extra network calls).
    #: It follows the reference's stride-1 trajectory to second order in the stride rather than first.
    gap: str = "jump"

    def __post_init__(self) -> None:
        if self.mode not in ("ddim", "ddpm"):
            raise ValueError(f"mode must be 'ddim' or 'ddpm', not {self.mode!r}")
        if self.unguided not in ("null", "healthy"):
            raise ValueError(
                f"unguided must be 'null' (paper eq. 10) or 'healthy' (reference code), not {self.unguided!r}"
            )
        if self.gap not in ("jump", "extrapolate"):
            raise ValueError(f"gap must be 'jump' or 'extrapolate', not {self.gap!r}")
        if self.cosine_weighting not in ("spacing", "uniform"):
            raise ValueError(f"cosine_weighting must be 'spacing' or 'uniform', not {self.cosine_weighting!r}")
        if self.steps < 1 or self.stride < 1:
            raise ValueError("steps and stride must be positive")

    @property
    def visited(self) -> np.ndarray:
        """Visited steps: every ``stride``-th from 0, plus the last step (steps − 1)."""
        grid = np.arange(0, self.steps, self.stride)
        return grid if grid[-1] == self.steps - 1 else np.append(grid, self.steps - 1)

    @property
    def horizon(self) -> int:
        return self.steps if self.cosine_steps is None else min(self.cosine_steps, self.steps)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["map_channels"] = None if self.map_channels is None else list(self.map_channels)
        return d

    def calibration_dict(self) -> dict:
        """The fields the calibrated cosine threshold and M_max depend on (:data:`CALIBRATION_FIELDS`),
        JSON-ready, as stored in :attr:`~AnomalyDiffusionLib.fpdm.decision.Calibration.settings`."""
        d = self.as_dict()
        return {k: d[k] for k in CALIBRATION_FIELDS}

    @staticmethod
    def from_dict(d: dict, **overrides) -> FPDMSettings:
        """Inverse of :meth:`as_dict` (JSON lists back to tuples); ``overrides`` replace fields.

        A field missing from ``d`` (settings stored before the field existed) takes its value from
        :data:`STORED_DEFAULTS` where the code that wrote ``d`` behaved differently from today's
        default, so stored bundles and calibration files keep the behaviour they were calibrated with.
        """
        d = {**STORED_DEFAULTS, **d, **overrides}
        if d.get("map_channels") is not None:
            d["map_channels"] = tuple(d["map_channels"])
        return FPDMSettings(**d)


#: settings whose value changes the cosine (eq. 18) or M_t (eq. 12) statistics a calibration is made of
CALIBRATION_FIELDS = (
    "w",
    "steps",
    "stride",
    "mode",
    "unguided",
    "map_channels",
    "clip_x0",
    "clip_denoised",
    "gap",
    "cosine_steps",
    "cosine_weighting",
)
#: the value of a setting absent from stored settings: what the code did before the setting existed
STORED_DEFAULTS = {"clip_denoised": False, "cosine_weighting": "uniform"}


@dataclass
class ForwardResult:
    """Per-slice outputs of the forward process (numpy, float32 unless noted).

    ``m`` [N, K, C'] M_t at the K visited steps (NaN after a slice stopped early); ``mse_h``/``mse_u``
    [N, K]; ``t_e`` [N, C'] (int step index); ``m_te`` [N, C']; ``h`` [N, C', S, S] aggregated map
    (eq. 20); ``s_te`` [N, C', S, S]; ``cosine`` [N] (eq. 18 over the horizon); ``steps_run`` [N].
    """

    steps: np.ndarray
    m: np.ndarray
    mse_h: np.ndarray
    mse_u: np.ndarray
    t_e: np.ndarray
    m_te: np.ndarray
    h: np.ndarray
    s_te: np.ndarray
    cosine: np.ndarray
    steps_run: np.ndarray
    network_calls: int = 0
    foreground: np.ndarray | None = None  #: [N, S, S] bool, x_0 > −0.95 in any map channel


# ------------------------------------------------------------------------------ forward process
def check_input(x0: torch.Tensor | np.ndarray, in_channels: int, image_size: int) -> torch.Tensor:
    """Validate slices for a model: ``[N, in_channels, image_size, image_size]``, finite."""
    x = torch.as_tensor(np.asarray(x0) if isinstance(x0, np.ndarray) else x0)
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise InputError(f"the model expects {in_channels} channel(s) per slice, got input of shape {tuple(x.shape)}")
    if x.shape[-2:] != (image_size, image_size):
        raise InputError(f"the model expects {image_size}×{image_size} slices, got {tuple(x.shape[-2:])}")
    if not torch.isfinite(x).all():
        raise InputError("input slices contain NaN/Inf values")
    return x.float()


def channel_indices(model_modalities: list[str], names: str | list[str]) -> tuple[int, ...]:
    """Indices of ``names`` (e.g. "flair,t2") among the model's input modalities, for ``map_channels``."""
    wanted = [m.strip() for m in names.split(",")] if isinstance(names, str) else list(names)
    missing = [m for m in wanted if m not in model_modalities]
    if missing:
        raise InputError(f"map modalities {missing} are not among the model's {list(model_modalities)}")
    return tuple(model_modalities.index(m) for m in wanted)


def cosine_weights(steps: np.ndarray, horizon: int, rule: str = "trapezoid") -> np.ndarray:
    """Quadrature weights [K] for eq. 18's sums over the unit steps 0 … horizon − 1, from the visited
    ``steps`` [K] (increasing, all < ``horizon``). Each weight is the number of unit steps its visited
    step stands for; the weights sum to ``horizon − steps[0]``, and on the stride-1 grid they are all 1.

    ``"trapezoid"``: the trapezoid rule on the visited grid plus ½ at each end (Euler–Maclaurin's
    first correction, which turns an integral into a sum over unit steps), with the unit steps past the
    last visited one given to it. ``"left"``: left Riemann sum, each visited step standing for the
    steps up to the next. Trapezoid is second-order in the stride for smooth sequences, left first-order.
    """
    t = np.asarray(steps, np.float64)
    k = len(t)
    if k == 0:
        return np.zeros(0)
    if rule == "trapezoid":
        wts = np.zeros(k)
        gaps = np.diff(t)
        wts[:-1] += gaps / 2
        wts[1:] += gaps / 2
        wts[0] += 0.5
        wts[-1] += 0.5 + (horizon - 1 - t[-1])
        return wts
    if rule == "left":
        return np.append(np.diff(t), horizon - t[-1])
    raise ValueError(f"rule must be 'trapezoid' or 'left', not {rule!r}")


def _cosine(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Row-wise cosine similarity of two [N, K] arrays (eq. 18); with ``weights`` [K] the weighted
    form Σ w_k a_k b_k / √(Σ w_k a_k² · Σ w_k b_k²)."""
    if weights is not None:
        root = np.sqrt(np.asarray(weights, np.float64)).astype(a.dtype)  # unit weights change nothing
        a, b = a * root, b * root
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide(num, den, out=np.ones_like(num), where=den > 0)


def sequence_cosine(mse_h: np.ndarray, mse_u: np.ndarray, settings: FPDMSettings) -> np.ndarray:
    """Eq. 18 for the [N, K] MSE sequences at ``settings.visited``: over the visited steps before the
    horizon, weighted as ``settings.cosine_weighting`` says (NaN, a step a slice did not run, counts 0).
    Returns [N]."""
    hz = settings.visited < settings.horizon
    a = np.nan_to_num(np.asarray(mse_h)[:, hz])
    b = np.nan_to_num(np.asarray(mse_u)[:, hz])
    weights = None
    if settings.cosine_weighting == "spacing":
        weights = cosine_weights(settings.visited[hz], settings.horizon)
    return _cosine(a, b, weights)


@torch.no_grad()
def forward_process(
    model: nn.Module,
    x0: torch.Tensor | np.ndarray,
    settings: FPDMSettings,
    schedule: Schedule | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cos_threshold: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ForwardResult:
    """Run the guided and unguided forward processes on slices ``x0`` [N, C, S, S] in [-1, 1].

    ``cos_threshold``: with early stop, slices whose cosine at the horizon says "healthy" leave the
    batch there (their mask is empty anyway). ``seed`` fixes the noise (per slice, independent of
    batching).
    """
    return forward_process_multi(
        model, x0, settings, [settings.w], schedule, seed, device, cos_threshold, progress, cancel
    )[settings.w]


@torch.no_grad()
def forward_process_multi(
    model: nn.Module,
    x0: torch.Tensor | np.ndarray,
    settings: FPDMSettings,
    ws: list[float],
    schedule: Schedule | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cos_threshold: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[float, ForwardResult]:
    """:func:`forward_process` for several guidance strengths from the *same* network calls.

    x_t and the two ε do not depend on w (DDIM: the trajectory is driven by ε_∅; DDPM: the noise is
    seeded), only the guided combination (eq. 6) does, so calibrating K candidate w costs one pass.
    Early stop applies only to a single w.
    """
    cfg = getattr(model, "config", None)
    x0 = check_input(x0, cfg.in_channels, cfg.image_size) if cfg is not None else torch.as_tensor(x0).float()
    schedule = schedule or Schedule()
    if settings.steps > schedule.steps:
        raise ValueError(f"{settings.steps} forward steps exceed the schedule's T = {schedule.steps}")
    ws = [float(w) for w in ws]
    if len(ws) > 1 and settings.early_stop:
        raise ValueError("early stop works with one guidance strength at a time")
    n = x0.shape[0]
    chans = list(settings.map_channels) if settings.map_channels is not None else list(range(x0.shape[1]))
    k_steps = len(settings.visited)
    outs: list[dict[str, np.ndarray]] = [
        {
            "m": np.full((n, k_steps, len(chans)), np.nan, np.float32),
            "mse_h": np.full((n, k_steps), np.nan, np.float32),
            "mse_u": np.full((n, k_steps), np.nan, np.float32),
            "t_e": np.zeros((n, len(chans)), np.int64),
            "m_te": np.zeros((n, len(chans)), np.float32),
            "h": np.zeros((n, len(chans), *x0.shape[-2:]), np.float32),
            "s_te": np.zeros((n, len(chans), *x0.shape[-2:]), np.float32),
            "steps_run": np.zeros(n, np.int64),
        }
        for _ in ws
    ]
    calls = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, settings.batch_size):
            sl = slice(start, min(n, start + settings.batch_size))
            calls += _run_batch(
                model, x0[sl], settings, ws, schedule, seed, chans, device, cos_threshold, outs, sl, progress, cancel, n
            )
    finally:
        model.train(was_training)
    fg = (x0[:, chans] > -0.95).any(1).cpu().numpy()
    results = {}
    for w, out in zip(ws, outs, strict=True):
        cos = sequence_cosine(out["mse_h"], out["mse_u"], settings)
        results[w] = ForwardResult(
            steps=settings.visited, cosine=cos.astype(np.float32), network_calls=calls, foreground=fg, **out
        )
    return results


def _run_batch(
    model, x0, st: FPDMSettings, ws, schedule, seed, chans, device, cos_threshold, outs, sl, progress, cancel, n_total
) -> int:
    dev = torch.device(device)
    abar = schedule.tensor(dev)
    x0 = x0.to(dev)
    b = x0.shape[0]
    gens = [torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + sl.start + i) for i in range(b)]

    def noise(rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x0.shape[1:], generator=gens[int(r)]) for r in rows]).to(dev)

    nw = len(ws)
    c_idx = torch.tensor(chans, device=dev)
    run_sum = torch.zeros(nw, b, len(chans), *x0.shape[-2:], device=dev)  # Σ S_t so far (eq. 20)
    h_best = torch.zeros_like(run_sum)  # H at the running argmax of M_t
    s_best = torch.zeros_like(run_sum)  # S at the running argmax of M_t
    m_best = torch.full((nw, b, len(chans)), -1.0, device=dev)
    t_e = torch.zeros(nw, b, len(chans), dtype=torch.long, device=dev)
    count = torch.zeros(b, device=dev)
    active = torch.arange(b, device=dev)  # rows still running, in state order
    x_prev: torch.Tensor | None = None
    eps_prev: torch.Tensor | None = None
    eps_prev2: torch.Tensor | None = None
    t_prev = t_prev2 = 0
    calls = 0
    visited = st.visited
    for k, t in enumerate(visited):
        if cancel is not None:
            cancel.check()
        if len(active) == 0:
            break
        xa = x0[active]
        tt = torch.full((len(active),), int(t), dtype=torch.long, device=dev)
        if st.mode == "ddpm" or k == 0:
            x_t = q_sample(xa, tt, noise(active), abar)  # eq. 2
        elif st.gap == "jump" or eps_prev2 is None:
            assert x_prev is not None and eps_prev is not None  # set by the previous visited step
            x_t = _ddim_invert(x_prev, eps_prev, t_prev, int(t), abar, st.clip_x0)  # eq. 4 across the gap
        else:  # eq. 4 in unit steps, ε_∅ linearly extrapolated from the last two visited steps
            assert x_prev is not None and eps_prev is not None
            slope = (eps_prev - eps_prev2) / float(t_prev - t_prev2)
            x_t = x_prev
            for u in range(t_prev, int(t)):
                x_t = _ddim_invert(x_t, eps_prev + (u - t_prev) * slope, u, u + 1, abar, st.clip_x0)
        m = len(active)
        labels = torch.cat([torch.full((m,), HEALTHY, device=dev), torch.full((m,), NULL, device=dev)]).long()
        eps = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), labels)  # one stacked call per step
        calls += 1
        eps_h, eps_n = eps[:m], eps[m:]
        ugp = predict_x0(x_t, tt, eps_n if st.unguided == "null" else eps_h, abar)  # eq. 10 / reference code
        if st.clip_denoised:
            ugp = ugp.clamp(-1, 1)  # reference code: process_xstart → clamp(-1, 1)
        ug, xg = ugp[:, c_idx], xa[:, c_idx]
        mse_u = ((ug - xg) ** 2).mean(dim=(1, 2, 3)).cpu().numpy()
        count[active] += 1
        rows_np = (active + sl.start).cpu().numpy()
        for wi, w in enumerate(ws):
            hgp = predict_x0(x_t, tt, (1 + w) * eps_h - w * eps_n, abar)  # eqs. 6-7
            if st.clip_denoised:
                hgp = hgp.clamp(-1, 1)
            hg = hgp[:, c_idx]
            m_t = ((hg - ug) ** 2).mean(dim=(-2, -1))  # eq. 12, per channel
            s_t = (hg - xg) ** 2  # eq. 19
            run_sum[wi, active] += s_t
            better = m_t > m_best[wi, active]  # [m, C']
            m_best[wi, active] = torch.where(better, m_t, m_best[wi, active])
            t_e[wi, active] = torch.where(better, torch.full_like(t_e[wi, active], int(t)), t_e[wi, active])
            r, c = better.nonzero(as_tuple=True)
            avg = run_sum[wi, active[r], c] / count[active[r]][:, None, None]  # eq. 20 up to this step
            h_best[wi, active[r], c] = avg
            s_best[wi, active[r], c] = s_t[r, c]
            out = outs[wi]
            out["m"][rows_np, k] = m_t.cpu().numpy()
            out["mse_h"][rows_np, k] = s_t.mean(dim=(1, 2, 3)).cpu().numpy()
            out["mse_u"][rows_np, k] = mse_u
            out["steps_run"][rows_np] += 1
        if st.mode == "ddim" and st.gap == "extrapolate":
            eps_prev2, t_prev2 = eps_prev, t_prev
        x_prev, eps_prev, t_prev = x_t, eps_n, int(t)
        report(progress, "fpdm", (sl.start + b * (k + 1) / len(visited)) / n_total, f"step {t + 1}/{st.steps}")

        if st.early_stop and t + st.stride >= st.horizon:
            keep = torch.ones(m, dtype=torch.bool, device=dev)
            if cos_threshold is not None and t < st.horizon <= t + st.stride:
                cos = sequence_cosine(outs[0]["mse_h"][rows_np], outs[0]["mse_u"][rows_np], st)
                keep &= torch.as_tensor(cos <= cos_threshold, device=dev)  # healthy slices stop here
            past = (int(t) - t_e[0, active] >= st.patience) & (m_t < st.drop * m_best[0, active])
            keep &= ~past.all(dim=1)
            if not keep.all():
                active, x_prev, eps_prev = active[keep], x_prev[keep], eps_prev[keep]
                eps_prev2 = None if eps_prev2 is None else eps_prev2[keep]
    for wi, out in enumerate(outs):
        out["t_e"][sl] = t_e[wi].cpu().numpy()
        out["m_te"][sl] = m_best[wi].clamp(min=0).cpu().numpy()
        out["h"][sl] = h_best[wi].cpu().numpy()
        out["s_te"][sl] = s_best[wi].cpu().numpy()
    return calls


def _ddim_invert(x_p: torch.Tensor, eps: torch.Tensor, t_p: int, t: int, abar: torch.Tensor, clip: bool):
    """Eq. 4 run forwards (DDIM inversion) from step ``t_p`` to ``t`` with noise estimate ``eps``:
    x_t = √ᾱ_t x̃_0 + √(1 − ᾱ_t) ε̂, where x̃_0 is predicted from x_{t_p} (clipped to [-1, 1] as in the
    reference code) and ε̂ = (x_{t_p} − √ᾱ_{t_p} x̃_0)/√(1 − ᾱ_{t_p}) is the noise consistent with it."""
    a_p, a_t = abar[int(t_p)].float(), abar[int(t)].float()
    x0_tilde = (x_p - (1 - a_p).sqrt() * eps) / a_p.sqrt()
    if clip:
        x0_tilde = x0_tilde.clamp(-1, 1)
    return a_t.sqrt() * x0_tilde + (1 - a_t).sqrt() * (x_p - a_p.sqrt() * x0_tilde) / (1 - a_p).sqrt()


# ---------------------------------------------------------------------------- segmentation steps
