"""AnoDODE as the pipeline runs it: per-slice likelihoods (bpd per scale and their mean, eq. 13 of
the AnoDODE paper), the bundle's decision threshold, the case-relative ``dode_z``, and the decoder
localisation of section 4.3 when no other method of the run makes a heatmap."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..method import MethodResult, SliceInputs, fraction_reliability
from ..progress import report
from ..selfcal import robust_z, slice_covariates
from ..volumes import PlaneFit
from . import manifest
from .localise import localise
from .model import DODEModel, decoder_from_bundle, dode_from_bundle, score_slices
from .sde import VPSDE

#: slices per ODE solve (the batched solver's cost hardly grows with the batch)
SCORE_BATCH = 64
#: slices per decoder localisation batch
LOCALISE_BATCH = 16


class AnoDODE:
    """Hu & Jin's AnoDODE: slice scores from the likelihood of multi-scale encoder features."""

    name: ClassVar[str] = "dode"
    title: ClassVar[str] = "AnoDODE"

    def validate(self, m: dict) -> None:
        manifest.validate(m)

    def _model(self, inp: SliceInputs) -> DODEModel:
        b, opt = inp.bundle, inp.options
        model = dode_from_bundle(b, inp.device)
        if opt.dode_scales:
            bad = [s for s in opt.dode_scales if s not in model.scales]
            if bad:
                raise InputError(f"AnoDODE scales {bad} are not in bundle '{b.name}' (it has {model.scales})")
            keep = [model.scales.index(s) for s in opt.dode_scales]
            model.scales = [model.scales[i] for i in keep]
            model.nets = [model.nets[i] for i in keep]
            model.standardisers = [model.standardisers[i] for i in keep]
        return model

    def _grey(self, inp: SliceInputs, size: int) -> np.ndarray:
        """The method's modality of the analysed slices at ``size`` × ``size`` (background −1), over the
        scanner's whole field of view as AnoDODE was trained (a brain-framed bundle frames only the
        slices of AnoFPDM, ``slice_fov_mm``)."""
        b = inp.bundle
        channel = inp.volume[b.modalities.index(b.manifest["dode"]["modality"])]
        return PlaneFit.for_case(inp.case, size).to_model(channel[inp.indices], "image", -1.0)

    def run(self, inp: SliceInputs, earlier: Mapping[str, MethodResult]) -> MethodResult:
        b, opt = inp.bundle, inp.options
        d = b.manifest["dode"]
        report(inp.progress, "dode", 0.0, "loading AnoDODE")
        model = self._model(inp)
        grey = self._grey(inp, int(d.get("slice_size", b.slice_size)))
        lk = d["likelihood"]
        rtol = float(opt.dode_rtol or lk.get("rtol", 1e-5))
        atol = float(opt.dode_rtol or lk.get("atol", 1e-5))
        n_probes = int(opt.dode_probes or lk.get("probes", 1))
        if n_probes < 1:
            raise InputError(f"AnoDODE needs at least one Hutchinson probe per slice, not {n_probes}")
        k = len(inp.indices)
        per_scale = np.zeros((k, len(model.scales)))
        for i in range(0, k, SCORE_BATCH):
            inp.check_cancel()
            per_scale[i : i + SCORE_BATCH], _ = score_slices(
                model,
                grey[i : i + SCORE_BATCH, None],
                probe=lk.get("probe", "rademacher"),
                seed=opt.seed + i,
                rtol=rtol,
                atol=atol,
                method=lk.get("method", "dopri5"),
                steps=lk.get("steps"),
                eps=float(lk.get("eps", 1e-5)),
                n_probes=n_probes,
            )
            report(inp.progress, "dode", min(1.0, (i + SCORE_BATCH) / k), "slice likelihoods")
        score = per_scale.mean(1)
        thr = opt.dode_threshold if opt.dode_threshold is not None else d.get("decision_threshold")
        flags = score >= thr if thr is not None else np.zeros(k, bool)
        # the case's own population: bpd relative to its slices of like area and position
        z = robust_z(score, slice_covariates(inp.brain_area_mm2, inp.superior_mm))
        columns = []
        for ps, s, f, zz in zip(per_scale, score, flags, z, strict=True):
            row = {f"dode_bpd_{sc}": round(float(v), 5) for sc, v in zip(model.scales, ps, strict=True)}
            row.update(dode_score=round(float(s), 5), dode_anomalous=bool(f), dode_z=round(float(zz), 3))
            columns.append(row)
        solver = lk.get("method", "dopri5")
        shortcuts = []
        if solver != "dopri5":
            shortcuts.append(f"AnoDODE fixed-grid ODE solver {solver} with {lk.get('steps')} steps")
        elif rtol > 1e-5 or atol > 1e-5:
            shortcuts.append(f"AnoDODE ODE tolerance {rtol:g} (paper/score_sde default 1e-5)")
        reliability = fraction_reliability(
            flags, self.title, "; its per-slice scores are relative at best (see dode_z in slices.csv)"
        )
        return MethodResult(
            name=self.name,
            columns=columns,
            scores=score,
            flags=flags,
            summary={
                "encoder": d["encoder"]["timm_name"],
                "encoder_pretrained": bool(d["encoder"]["pretrained"]),
                "scales": model.scales,
                "decision_threshold_bpd": thr,
                "rtol": rtol,
                "atol": atol,
                "solver": solver,
                "probes": n_probes,
                "slices_flagged": int(flags.sum()),
            },
            reliability=reliability,
            shortcuts=shortcuts,
            extras={"dode_model": model},
        )

    def localise(self, inp: SliceInputs, result: MethodResult) -> np.ndarray | None:
        """Section 4.3: perturb features to t0, PC-denoise, decode, (x − x')². None without a decoder.
        Reuses the scoring model (reloaded whole if a scale subset left out the decoder's scale)."""
        b = inp.bundle
        if not (b.manifest.get("dode") or {}).get("decoder"):
            return None
        decoder, scale, dset = decoder_from_bundle(b, inp.device)
        model = result.extras.get("dode_model") or dode_from_bundle(b, inp.device)
        if scale not in model.scales:
            model = dode_from_bundle(b, inp.device)
        if scale not in model.scales:
            raise InputError(f"the bundle's decoder works at scale {scale}, which has no score network")
        k = model.scales.index(scale)
        net = model.nets[k]
        net.sde = VPSDE(net.sde.beta_min, net.sde.beta_max, N=int(dset.get("steps", 500)))
        grey = self._grey(inp, b.slice_size)
        out = np.zeros((len(inp.indices), b.slice_size, b.slice_size), np.float32)
        g = torch.Generator().manual_seed(inp.options.seed)
        for i in range(0, len(inp.indices), LOCALISE_BATCH):
            inp.check_cancel()
            heat, _ = localise(
                model.encoder,
                scale,
                net,
                model.standardisers[k],
                decoder,
                grey[i : i + LOCALISE_BATCH, None],
                t0=float(dset.get("t0", 0.5)),
                generator=g,
            )
            out[i : i + LOCALISE_BATCH] = heat
            report(inp.progress, "dode localisation", min(1.0, (i + LOCALISE_BATCH) / len(inp.indices)), "")
        whole = PlaneFit.for_case(inp.case, b.slice_size)
        if whole != inp.fit:  # from AnoDODE's whole-field slices to the pipeline's brain-framed ones
            out = inp.fit.to_model(whole.from_model(out, "image"), "image", fill=0.0)
        return out
