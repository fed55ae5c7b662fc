"""The shape every method has, as :func:`~AnomalyDiffusionLib.pipeline.detect` runs it.

The pipeline prepares one case (:class:`SliceInputs`: the brain slices the models see, and where
they came from), runs each selected method on it in the registry's order
(:mod:`~AnomalyDiffusionLib.methods`), and turns the :class:`MethodResult` of each into volumes,
table columns and the summary. A method owns its maths, its bundle section
(``<package>.manifest``), its model loading (``<package>.model``) and its reliability figures; the
pipeline owns none of them. A method may read the results of methods that ran before it (AnoFPDM's
``gate="dode"`` reads AnoDODE's slice flags).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from .bundle import Bundle
    from .options import DetectOptions
    from .progress import CancelToken, ProgressCallback
    from .volumes import Case, PlaneFit

#: a method flagging more than this share of a case's brain slices says nothing about where the lesion is
UNINFORMATIVE_FRACTION = 0.6


@dataclass
class SliceInputs:
    """One case as every method sees it. Arrays are indexed by analysed slice k = 0..K−1."""

    bundle: Bundle
    case: Case
    volume: np.ndarray  #: [C, z, y, x] the case normalised per modality, in ``bundle.modalities`` order
    indices: np.ndarray  #: [K] canonical axial indices of the analysed (brain) slices
    images: np.ndarray  #: [K, C, S, S] those slices fitted to the bundle's slice size S (background −1)
    fit: PlaneFit  #: the plane mapping between the case grid and the model's S × S slices
    brain_area_mm2: np.ndarray  #: [K]
    superior_mm: np.ndarray  #: [K] physical superior position of each slice
    options: DetectOptions
    device: torch.device
    progress: ProgressCallback | None = None
    cancel: CancelToken | None = None

    def check_cancel(self) -> None:
        if self.cancel is not None:
            self.cancel.check()


@dataclass
class MethodResult:
    """What one method found on one case; the same type for every method.

    ``columns`` holds one dict per analysed slice, the method's columns of ``slices.csv`` (prefixed
    with the method's name). ``scores`` (higher = more anomalous) and ``flags`` are per slice;
    ``maps`` (anomaly heatmap) and ``masks`` (segmentation) are per pixel in model space [K, S, S].
    ``summary`` goes to ``summary.json["method_details"][name]``, ``reliability`` to
    ``summary.json["reliability"][name]`` (with a ``messages`` list of warnings for the user).
    ``shortcuts`` name every approximation taken for speed; ``warnings`` are one sentence each.
    ``extras`` carry in-memory objects for evaluation scripts (never serialised)."""

    name: str
    columns: list[dict]
    scores: np.ndarray | None = None
    flags: np.ndarray | None = None
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    summary: dict = field(default_factory=dict)
    reliability: dict | None = None
    shortcuts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)


class Method(Protocol):
    """A detection method. ``name`` is its bundle section and registry key; ``title`` its name for
    people."""

    name: ClassVar[str]
    title: ClassVar[str]

    def validate(self, manifest: dict) -> None:
        """Check this method's section of a bundle manifest (raise ``BundleError``)."""
        ...

    def run(self, inputs: SliceInputs, earlier: Mapping[str, MethodResult]) -> MethodResult:
        """Score/segment the case's slices; ``earlier`` holds the results of the methods run before."""
        ...

    def localise(self, inputs: SliceInputs, result: MethodResult) -> np.ndarray | None:
        """A heatmap [K, S, S] when no method of the run made one (None: this method has none)."""
        ...


def fraction_reliability(flags: np.ndarray, title: str, hint: str = "") -> dict:
    """The share of slices a method flags, and whether that is too many to mean anything
    (:data:`UNINFORMATIVE_FRACTION`); ``hint`` ends the warning (what the user can still use)."""
    frac = float(np.mean(flags)) if len(flags) else 0.0
    out: dict = {"fraction_flagged": round(frac, 3), "informative": bool(frac <= UNINFORMATIVE_FRACTION)}
    out["messages"] = (
        []
        if out["informative"]
        else [
            f"{title} flags {frac:.0%} of the brain slices at the bundle's threshold, which says nothing about "
            f"where an anomaly is{hint}"
        ]
    )
    return out
