"""The ``dode`` section of a bundle manifest: its schema (checked when a bundle is opened for this
method), and the section written from a trained model (encoder cut, score networks, optional decoder)."""

from __future__ import annotations

from ..bundle import BundleError, check_schema, load_schema, need_file

NAME = "dode"
#: JSON Schema (draft 2020-12) of the section: types, required keys and ranges
SCHEMA = (__package__, "manifest.schema.json")


def validate(m: dict) -> None:
    """Check the ``dode`` section of a manifest whose container is already valid: its JSON Schema
    (``dode/manifest.schema.json``), then what a schema cannot say (the modality among the bundle's,
    a score network per scale with matching standardisation, weights listed under files). Raises
    :class:`~AnomalyDiffusionLib.bundle.BundleError` naming the first problem."""
    mods = m["modalities"]
    d = check_schema(m.get("dode"), load_schema(*SCHEMA), "dode")
    need_file(m, d["encoder"]["weights"], "dode.encoder.weights")
    if d["modality"] not in mods:
        raise BundleError(f"manifest: dode.modality {d['modality']!r} is not among the modalities {mods}")
    for s in d["scales"]:
        sn = d["score_networks"].get(str(s))
        if sn is None:
            raise BundleError(f"manifest: dode.score_networks lacks '{s}' (a score network per scale)")
        need_file(m, sn["weights"], f"dode.score_networks['{s}'].weights")
        c = sn["network"]["in_channels"]
        if len(sn["feature_mean"]) != c or len(sn["feature_std"]) != c:
            raise BundleError(f"manifest: feature standardisation of scale {s} does not have {c} channels")
    dec = d.get("decoder")
    if dec is not None:
        need_file(m, dec["weights"], "dode.decoder.weights")


def section(
    dode_model,
    decision_threshold: float | None,
    likelihood: dict,
    modality: str = "flair",
    decoder=None,
    decoder_scale: int | None = None,
    decoder_settings: dict | None = None,
    encoder_source: str = "",
) -> tuple[dict, dict]:
    """Manifest section and weight files for an AnoDODE model (encoder cut, score nets, optional
    decoder). Only the encoder's kept stages are stored."""
    spec = dode_model.spec
    files: dict[str, dict] = {"models/dode_encoder.safetensors": dode_model.encoder.state_dict()}
    # timm-style names so build_encoder(state=...) loads them into the full network
    sec: dict = {
        "modality": modality,
        "encoder": {
            "weights": "models/dode_encoder.safetensors",
            "timm_name": spec.name,
            "stages": spec.stages,
            "pretrained": spec.pretrained,
            "source": encoder_source,
        },
        "sde": {
            "kind": "vp",
            "beta_min": float(dode_model.nets[0].sde.beta_min),
            "beta_max": float(dode_model.nets[0].sde.beta_max),
        },
        "scales": [int(s) for s in dode_model.scales],
        "score_networks": {},
        "likelihood": likelihood,
        "decision_threshold": None if decision_threshold is None else float(decision_threshold),
        "decoder": None,
    }
    for s, net, std in zip(dode_model.scales, dode_model.nets, dode_model.standardisers, strict=True):
        name = f"models/dode_score_{s}.safetensors"
        files[name] = net.state_dict()
        sec["score_networks"][str(s)] = {
            "weights": name,
            "network": net.config.as_dict(),
            "feature_mean": [float(v) for v in std.mean],
            "feature_std": [float(v) for v in std.std],
        }
    if decoder is not None:
        if decoder_scale is None:
            raise ValueError("a decoder needs its decoder_scale")
        name = f"models/dode_decoder_{decoder_scale}.safetensors"
        files[name] = decoder.state_dict()
        sec["decoder"] = {
            "weights": name,
            "scale": int(decoder_scale),
            "config": decoder.config,
            **(decoder_settings or {}),
        }
    return sec, files
