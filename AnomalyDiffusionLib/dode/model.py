"""A trained AnoDODE model: frozen encoder + one score network and feature standardisation per scale.

:func:`load_dode` reads what ``training/train_dode.py`` writes, or a bundle's AnoDODE section
(:func:`dode_from_bundle`; :func:`decoder_from_bundle` for its localisation decoder);
:func:`score_slices` gives the per-scale bpd and the anomaly score S (eq. 13) of grey slices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle, BundleError, is_bundle, open_bundle
from ..errors import AnomalyDiffusionError, InputError
from ..modelio import load_state, load_weights, read_meta
from ..nets import Decoder, UNetConfig
from .features import Encoder, EncoderSpec, Standardiser, build_encoder, extract
from .likelihood import likelihood_scipy, likelihood_torch, make_probe
from .score import ScoreNet
from .sde import VPSDE


@dataclass
class DODEModel:
    encoder: Encoder
    spec: EncoderSpec
    scales: list[int]
    nets: list[ScoreNet]
    standardisers: list[Standardiser]
    #: the grey slice size the features were trained from (None: unknown, older runs used 128). Slices
    #: are made at this size from the volume and resized to each scale, so it should be ≥ max(scales).
    slice_size: int | None = None

    @property
    def input_size(self) -> int:
        """The slice size to make model inputs at: the trained one, else the largest scale (each
        scale is then a resample of the source slice, never an upsampling of a smaller one)."""
        return int(self.slice_size or max(self.scales))


def load_dode(folder: str | os.PathLike, scales: list[int] | None = None, device: str = "cpu") -> DODEModel:
    """Load ``dode_encoder.safetensors`` and ``dode_score_<scale>.safetensors`` from ``folder``
    (all scales found, or the subset ``scales``, e.g. the paper's best {128, 192}). A model bundle
    (a folder with ``manifest.json``, or its zip) gives its AnoDODE model instead."""
    f = Path(folder)
    if is_bundle(f):
        full = dode_from_bundle(open_bundle(f), device)
        use = _pick_scales(full.scales, scales, f)
        keep = [full.scales.index(s) for s in use]
        return DODEModel(
            encoder=full.encoder,
            spec=full.spec,
            scales=use,
            nets=[full.nets[i] for i in keep],
            standardisers=[full.standardisers[i] for i in keep],
            slice_size=full.slice_size,
        )
    enc_path = f / "dode_encoder.safetensors"
    meta = read_meta(enc_path)
    spec_d = dict(meta["spec"])
    spec_d["scales"] = tuple(spec_d["scales"])
    spec = EncoderSpec(**spec_d)
    encoder = build_encoder(spec, state=load_state(enc_path)).to(device)
    found = sorted((int(p.stem.rsplit("_", 1)[1]) for p in f.glob("dode_score_*.safetensors")), reverse=True)
    use = _pick_scales(found, scales, f)
    nets, stds = [], []
    slice_size = None
    for s in use:
        path = f / f"dode_score_{s}.safetensors"
        m = read_meta(path)
        slice_size = m.get("slice_size", slice_size)
        net = ScoreNet(UNetConfig.from_dict(m["config"]))
        load_weights(net, load_state(path), what=f"weights in '{path}'")
        nets.append(net.to(device).eval())
        stds.append(Standardiser(np.asarray(m["feature_mean"]), np.asarray(m["feature_std"])))
    return DODEModel(
        encoder=encoder,
        spec=spec,
        scales=use,
        nets=nets,
        standardisers=stds,
        slice_size=None if slice_size is None else int(slice_size),
    )


def _pick_scales(found: list[int], wanted: list[int] | None, where: Path) -> list[int]:
    """``wanted`` (all of ``found`` if None), refused with a message if any has no score network."""
    use = list(found) if wanted is None else [int(s) for s in wanted]
    missing = [s for s in use if s not in found]
    if missing or not use:
        raise AnomalyDiffusionError(f"no score network for scale(s) {missing or use} in '{where}' (found {found})")
    return use


def standardised_features(model: DODEModel, slices: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
    """The score networks' inputs: encoder features of grey slices [N, 1, S, S] in [-1, 1] at every
    scale of ``model``, standardised per channel; one float32 [N, C, h, w] tensor per scale."""
    x = torch.as_tensor(np.asarray(slices) if isinstance(slices, np.ndarray) else slices)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise InputError(f"AnoDODE scores grey (FLAIR) slices [N, 1, S, S]; got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError("input slices contain NaN/Inf values")
    feats = extract(model.encoder, x, model.scales)
    for s, f, net in zip(model.scales, feats, model.nets, strict=True):
        want = (net.config.in_channels, net.config.image_size, net.config.image_size)
        if tuple(f.shape[1:]) != want:
            raise AnomalyDiffusionError(
                f"features at scale {s} are {tuple(f.shape[1:])} but its score network expects {want}: "
                "the encoder or scales do not match this model"
            )
    return [std(f).float() for std, f in zip(model.standardisers, feats, strict=True)]


def score_features(
    model: DODEModel,
    z: list[torch.Tensor],
    solver: str = "torch",
    probe: str = "rademacher",
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int = 64,
    method: str = "dopri5",
    steps: int | None = None,
    eps: float = 1e-5,
    n_probes: int = 1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """bpd per scale [N, n_scales], the score (eq. 13) [N] and the number of score-network calls
    (batched or per sample, summed over scales and batches) for standardised features ``z``
    (:func:`standardised_features`).

    Each batch of ``batch_size`` samples draws its ``n_probes`` probes per sample from ``seed`` + its
    first index, the same vectors whichever ``solver`` runs, so the two solvers differ only in the
    integration. Their estimates are averaged (the per-sample bpd's probe noise falls as 1/√K)."""
    if solver not in ("torch", "scipy"):
        raise ValueError(f"solver must be 'torch' or 'scipy', not {solver!r}")
    fns = [lambda x, t, net=net: net(x, t) for net in model.nets]
    n = z[0].shape[0]
    out = np.zeros((n, len(z)))
    nfe = 0
    for i in range(0, n, batch_size):
        part = [zz[i : i + batch_size] for zz in z]
        probes: list[torch.Tensor] | None = None
        if probe != "exact":  # make_probe gives a tensor for every other kind
            gen = torch.Generator().manual_seed(seed + i)
            probes = [p for zz in part if (p := make_probe(zz.shape, probe, gen, n_probes)) is not None]
        if solver == "torch":
            res = likelihood_torch(
                fns, part, eps=eps, probe=probe, rtol=rtol, atol=atol, method=method, steps=steps, probes=probes
            )
            nfe += res[0].nfe * len(part)  # one batched call per scale per evaluation
        else:
            per_scale: list[torch.Tensor | None] = [None] * len(part) if probes is None else list(probes)
            res = [
                likelihood_scipy(fn, zz, eps=eps, probe=probe, rtol=rtol, atol=atol, probes=pr)
                for fn, zz, pr in zip(fns, part, per_scale, strict=True)
            ]
            nfe += sum(r.nfe for r in res)  # one call per sample per evaluation
        out[i : i + batch_size] = np.stack([r.bpd for r in res], 1)
    return out, out.mean(1), nfe


def score_slices(
    model: DODEModel,
    slices: np.ndarray | torch.Tensor,
    solver: str = "torch",
    probe: str = "rademacher",
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int = 64,
    method: str = "dopri5",
    steps: int | None = None,
    eps: float = 1e-5,
    n_probes: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """bpd per scale [N, n_scales] and the anomaly score S = mean over scales (eq. 13) [N] of grey
    slices [N, 1, S, S] in [-1, 1]. ``solver``: "torch" (batched, all scales at once) or "scipy"
    (the paper's per-sample RK45). ``method``/``steps``: the torch solver (see
    :func:`~AnomalyDiffusionLib.dode.likelihood.likelihood_torch`). ``eps``: the ODE's lower time limit
    (score_sde's 1e-5). ``n_probes``: Hutchinson probes averaged per slice."""
    z = standardised_features(model, slices)
    per, score, _ = score_features(
        model, z, solver, probe, seed, rtol, atol, batch_size, method, steps, eps, n_probes=n_probes
    )
    return per, score


def load_decoder(folder: str | os.PathLike, scale: int, device: str = "cpu") -> Decoder:
    """The decoder trained for ``scale`` (``dode_decoder_<scale>.safetensors``)."""
    path = Path(folder) / f"dode_decoder_{scale}.safetensors"
    meta = read_meta(path)
    cfg = meta["config"]
    dec = Decoder(cfg["in_channels"], base=cfg["base"], mults=tuple(cfg["mults"]))
    load_weights(dec, load_state(path), what=f"weights in '{path}'")
    return dec.to(device).eval()


def dode_from_bundle(b: Bundle, device: str | torch.device = "cpu") -> DODEModel:
    """The AnoDODE model of a verified bundle (encoder cut, one score network and feature
    standardisation per scale)."""
    if "dode" not in b.methods:
        raise BundleError(f"bundle '{b.name}' holds no AnoDODE model (methods: {b.methods})")
    d = b.manifest["dode"]
    e = d["encoder"]
    scales = [int(s) for s in d["scales"]]
    spec = EncoderSpec(
        name=e["timm_name"], stages=int(e["stages"]), pretrained=bool(e["pretrained"]), scales=tuple(scales)
    )
    encoder = build_encoder(spec, state=b.tensors(e["weights"])).to(device)
    sde = VPSDE(float(d["sde"].get("beta_min", 0.1)), float(d["sde"].get("beta_max", 20.0)))
    nets, stds = [], []
    for s in scales:
        sn = d["score_networks"][str(s)]
        net = ScoreNet(UNetConfig.from_dict(sn["network"]), sde)
        load_weights(net, b.tensors(sn["weights"]), what=f"'{sn['weights']}' in bundle '{b.name}'")
        nets.append(net.to(device).eval())
        stds.append(Standardiser(np.asarray(sn["feature_mean"]), np.asarray(sn["feature_std"])))
    size = d.get("slice_size")
    return DODEModel(
        encoder=encoder,
        spec=spec,
        scales=scales,
        nets=nets,
        standardisers=stds,
        slice_size=None if size is None else int(size),
    )


def decoder_from_bundle(b: Bundle, device: str | torch.device = "cpu") -> tuple[Decoder, int, dict]:
    """``(decoder, scale, settings)`` of a bundle's AnoDODE localisation decoder. The decoder is
    optional (``manifest["dode"]["decoder"]`` is null without one): a bundle without it is refused."""
    dec = (b.manifest.get("dode") or {}).get("decoder")
    if dec is None:
        raise BundleError(f"bundle '{b.name}' holds no AnoDODE localisation decoder")
    cfg = dec["config"]
    net = Decoder(int(cfg["in_channels"]), base=int(cfg["base"]), mults=tuple(cfg["mults"]))
    load_weights(net, b.tensors(dec["weights"]), what=f"'{dec['weights']}' in bundle '{b.name}'")
    return (
        net.to(device).eval(),
        int(dec["scale"]),
        {k: v for k, v in dec.items() if k not in ("weights", "config")},
    )
