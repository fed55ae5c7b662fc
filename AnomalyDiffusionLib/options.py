"""The detect options, defined once: :class:`DetectOptions`.

Each field carries its type (the annotation), its default, and in its metadata a :class:`Spec`: the
command-line flag, the kind of value, its range or choices and the help text. Everything else is
derived from that one definition:

* validation: :class:`DetectOptions` checks every value when it is made (``DetectOptions(w=nan)``
  raises :class:`~AnomalyDiffusionLib.errors.InputError` with one line naming the flag);
* the ``detect`` and ``batch`` arguments of the CLI (:func:`add_arguments`, :func:`from_namespace`);
* the command line the Slicer module runs (:meth:`DetectOptions.to_argv`);
* the ``options`` block of ``summary.json`` (:meth:`DetectOptions.as_summary`).

``None`` fields take the bundle's values. This module imports neither torch nor numpy, so the Slicer
module's bridge can use it inside Slicer's own process.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import InputError

#: forward steps of every bundle's diffusion schedule (linear, T = 1000)
MAX_STEPS = 1000
#: largest seed: numpy's and torch's generators both take it (seed + slice offsets stay in range)
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Spec:
    """How one option is given and checked.

    ``kind``: ``float`` / ``int`` (finite, within ``minimum``..``maximum``; ``above`` makes the
    minimum exclusive), ``choice`` (one of ``choices``), ``bool`` (``--x`` / ``--no-x``, None = the
    bundle's), ``flag`` (``--x`` sets True), ``methods`` (comma list of ``choices``), ``ints`` (comma
    list of positive integers), ``range`` (``START:STOP``), ``device`` (auto, cpu, cuda, cuda:N).
    """

    flag: str
    kind: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    metavar: str | None = None


def option(default: Any, flag: str, kind: str, help: str, **spec: Any) -> Any:
    """A :class:`DetectOptions` field: ``default`` plus its :class:`Spec` in the field's metadata."""
    return field(default=default, metadata={"spec": Spec(flag=flag, kind=kind, help=help, **spec)})


@dataclass
class DetectOptions:
    """What to run and how. ``None`` fields take the bundle's values; every value is checked here."""

    methods: tuple[str, ...] | None = option(
        None, "--methods", "methods", "fpdm, dode or fpdm,dode (default: all in the bundle)", choices=("fpdm", "dode")
    )
    device: str = option("auto", "--device", "device", "auto (GPU if present), cpu, cuda or cuda:N")
    w: float | None = option(
        None, "--w", "float", "AnoFPDM guidance strength (default: calibrated w*)", minimum=0.0, maximum=100.0
    )
    steps: int | None = option(
        None,
        "--steps",
        "int",
        "AnoFPDM forward steps of T = 1000 (default: the bundle's)",
        minimum=1,
        maximum=MAX_STEPS,
    )
    stride: int | None = option(
        None, "--stride", "int", "visit every N-th forward step (default: the bundle's)", minimum=1, maximum=MAX_STEPS
    )
    gap: str | None = option(
        None,
        "--gap",
        "choice",
        "DDIM with a stride: one eq. 4 step across each gap (jump), or the stride-1 unit steps with ε extrapolated "
        "from the last two visited steps (extrapolate; no extra network calls); default: the bundle's",
        choices=("jump", "extrapolate"),
    )
    mode: str | None = option(
        None, "--mode", "choice", "forward encoding (default: the bundle's)", choices=("ddim", "ddpm")
    )
    early_stop: bool | None = option(
        None, "--early-stop", "bool", "stop a slice's forward process after its M_t peak (default: the bundle's)"
    )
    gate: str | None = option(
        None,
        "--gate",
        "choice",
        "run AnoFPDM on all brain slices or only on those AnoDODE flags (± 1 neighbour); default: the bundle's",
        choices=("none", "dode"),
    )
    #: how AnoFPDM decides which slices are anomalous and sets Algorithm 1's level: "bundle" (the
    #: papers' dataset-level cosine threshold and M_max) | "volume" (the case's own slice population,
    #: see :mod:`~AnomalyDiffusionLib.selfcal`); None: the bundle's default
    calibration: str | None = option(
        None,
        "--calibration",
        "choice",
        "AnoFPDM slice decision and mask level from the bundle's dataset-level calibration (bundle) or from the "
        "case's own slices (volume); default: the bundle's",
        choices=("bundle", "volume"),
    )
    #: how each modality's intensities are scaled before the models see them: "percentile" (the
    #: papers: divide by the brain's 99th percentile) | "landmarks" (then map the case's brain
    #: percentiles onto the bundle's training data, :mod:`~AnomalyDiffusionLib.intensity`); None: the
    #: bundle's default
    intensity: str | None = option(
        None,
        "--intensity",
        "choice",
        "intensity scaling: divide by the brain's 99th percentile as the papers do (percentile), or also map the "
        "case's brain percentiles onto the bundle's training data (landmarks); default: the bundle's",
        choices=("percentile", "landmarks"),
    )
    #: N4 bias-field correction of each modality before the intensity scaling: "none" | "n4"
    #: (:mod:`~AnomalyDiffusionLib.bias`); None: the bundle's default
    bias_correction: str | None = option(
        None,
        "--bias-correction",
        "choice",
        "remove a smooth coil gain field from each modality before scaling (n4) or not (none); default: the bundle's",
        choices=("none", "n4"),
    )
    #: N4's fitting levels (:func:`~AnomalyDiffusionLib.bias.n4_field`); None: the bundle's (3 if it names none)
    bias_levels: int | None = option(
        None,
        "--bias-levels",
        "int",
        "N4 fitting levels, 1-5: the B-spline mesh doubles per level, so more levels follow shorter-range gain "
        "fields (default: the bundle's)",
        minimum=1,
        maximum=5,
    )
    #: native-resolution refinement of the segmentation (:mod:`~AnomalyDiffusionLib.refine`): "none" |
    #: "flair" (the found lesions' extent redrawn from the FLAIR at the input's resolution, within the
    #: bundle's reach of what the model found); None: the bundle's default
    refine: str | None = option(
        None,
        "--refine",
        "choice",
        "redraw the found lesions' boundary from the FLAIR at the input's resolution, near what the model found "
        "(flair), or keep the model's mask (none); default: the bundle's",
        choices=("none", "flair"),
    )
    cos_threshold: float | None = option(
        None,
        "--cos-threshold",
        "float",
        "AnoFPDM slice classifier threshold, a cosine in [-1, 1] (default: calibrated)",
        minimum=-1.0,
        maximum=1.0,
    )
    dode_threshold: float | None = option(
        None, "--dode-threshold", "float", "AnoDODE decision threshold in bpd (default: calibrated)"
    )
    dode_scales: tuple[int, ...] | None = option(
        None,
        "--dode-scales",
        "ints",
        "subset of the bundle's AnoDODE input scales, e.g. 128,192",
        minimum=1,
        maximum=4096,
        metavar="S1,S2",
    )
    dode_rtol: float | None = option(
        None,
        "--dode-tol",
        "float",
        "AnoDODE ODE rtol = atol, above 0 and at most 0.1 (default: the bundle's)",
        minimum=0.0,
        maximum=0.1,
        above=True,
    )
    dode_probes: int | None = option(
        None,
        "--dode-probes",
        "int",
        "Hutchinson probes averaged per slice for the AnoDODE bpd (default: the bundle's; more = less noise)",
        minimum=1,
        maximum=1024,
    )
    faithful: bool = option(
        False,
        "--faithful",
        "flag",
        "paper settings: every step, no early stop, no gating, no bias correction, percentile intensity scaling, "
        "no refinement",
    )
    slice_range: tuple[int | None, int | None] = option(
        (None, None), "--slices", "range", "canonical axial slice range (inferior = 0)", metavar="START:STOP"
    )
    seed: int = option(0, "--seed", "int", "noise seed (default 0)", minimum=0, maximum=MAX_SEED)
    batch_size: int | None = option(
        None,
        "--batch-size",
        "int",
        "slices per AnoFPDM network call (default: the bundle's; memory, not results)",
        minimum=1,
        maximum=4096,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check(f.name, getattr(self, f.name)))

    def as_summary(self) -> dict[str, Any]:
        """Every option as JSON values (``None``: the bundle's), for ``summary.json``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_argv(self) -> list[str]:
        """The command-line arguments that give these options (defaults are left out), in field order."""
        argv: list[str] = []
        for f in fields(self):
            value, spec = getattr(self, f.name), _spec(f.name)
            if value == f.default:
                continue
            if spec.kind == "flag":
                argv.append(spec.flag)
            elif spec.kind == "bool":
                argv.append(spec.flag if value else "--no-" + spec.flag[2:])
            else:
                argv += [spec.flag, _to_text(spec, value)]
        return argv


# ------------------------------------------------------------------------------------ checking
def _fields() -> dict[str, Any]:
    return {f.name: f for f in fields(DetectOptions)}


def _spec(name: str) -> Spec:
    return _fields()[name].metadata["spec"]


def specs() -> dict[str, Spec]:
    """Field name → :class:`Spec`, in field order."""
    return {name: f.metadata["spec"] for name, f in _fields().items()}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _range_text(spec: Spec) -> str:
    lo, hi = spec.minimum, spec.maximum
    if lo is not None and hi is not None:
        return f" above {_num(lo)} and at most {_num(hi)}" if spec.above else f" from {_num(lo)} to {_num(hi)}"
    if lo is not None:
        return f" above {_num(lo)}" if spec.above else f" of at least {_num(lo)}"
    return ""


def _number(spec: Spec, value: Any, integer: bool) -> int | float:
    what = "an integer" if integer else "a finite number"
    bad = InputError(f"{spec.flag} must be {what}{_range_text(spec)}, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise bad
        value = int(value)
    if not integer:
        value = float(value)
        if not math.isfinite(value):
            raise bad
    lo, hi = spec.minimum, spec.maximum
    if lo is not None and (value < lo or (spec.above and value == lo)):
        raise bad
    if hi is not None and value > hi:
        raise bad
    return value


def check(name: str, value: Any) -> Any:
    """``value`` for option ``name``, normalised (lists → tuples, ints → floats where floats are
    meant), or :class:`InputError` with one line naming the option's flag."""
    spec = _spec(name)
    if value is None and spec.kind not in ("flag", "device", "range"):
        return None
    if spec.kind == "float":
        return _number(spec, value, integer=False)
    if spec.kind == "int":
        return _number(spec, value, integer=True)
    if spec.kind == "choice":
        if value not in spec.choices:
            raise InputError(f"{spec.flag} must be {' or '.join(spec.choices)}, not {value!r}")
        return value
    if spec.kind in ("bool", "flag"):
        if not isinstance(value, bool):
            raise InputError(f"{spec.flag} must be true or false, not {value!r}")
        return value
    if spec.kind == "device":
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise InputError(f"{spec.flag} must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value
    if spec.kind == "methods":
        items = _sequence(spec, value)
        # names only: which methods exist is the registry's (AnomalyDiffusionLib.methods) to say, so a
        # new method needs no change here; ``choices`` documents this library's
        if (
            not items
            or any(not isinstance(m, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", m) for m in items)
            or len(set(items)) != len(items)
        ):
            raise InputError(
                f"{spec.flag} takes distinct method names such as {', '.join(spec.choices)} or "
                f"{','.join(spec.choices)}; got {value!r}"
            )
        return items
    if spec.kind == "ints":
        items = tuple(_number(spec, v, integer=True) for v in _sequence(spec, value))
        if not items or len(set(items)) != len(items):
            raise InputError(f"{spec.flag} must list distinct integers{_range_text(spec)}, not {value!r}")
        return items
    if spec.kind == "range":
        bad = InputError(
            f"{spec.flag} must be START:STOP with 0 ≤ START < STOP (either may be left out), not {value!r}"
        )
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
            raise bad
        start, stop = value
        for v in value:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise bad
        if start is not None and stop is not None and start >= stop:
            raise bad
        return (start, stop)
    raise AssertionError(f"unknown option kind {spec.kind!r}")  # pragma: no cover - a schema error


def _sequence(spec: Spec, value: Any) -> tuple:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InputError(f"{spec.flag} must be a list, not {value!r}")
    return tuple(value)


# ------------------------------------------------------------------------------- command line
def from_text(name: str, text: str) -> Any:
    """Parse the command-line text of option ``name`` and check it (:class:`InputError` if bad)."""
    spec = _spec(name)
    text = text.strip()
    try:
        if spec.kind == "float":
            return check(name, float(text))
        if spec.kind == "int":
            return check(name, int(text))
        if spec.kind == "methods":
            return check(name, tuple(m.strip() for m in text.split(",")))
        if spec.kind == "ints":
            return check(name, tuple(int(s) for s in text.split(",")))
        if spec.kind == "range":
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            return check(name, tuple(int(p) if p.strip() else None for p in parts))
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        what = {"float": "a number", "int": "an integer", "ints": "comma-separated integers"}.get(spec.kind, "valid")
        if spec.kind == "range":
            raise InputError(f"{spec.flag} must be START:STOP with integers, not '{text}'") from None
        raise InputError(f"{spec.flag} must be {what}{_range_text(spec)}, not '{text}'") from None
    return check(name, text)


def _to_text(spec: Spec, value: Any) -> str:
    if spec.kind == "float":
        return repr(float(value))
    if spec.kind in ("methods", "ints"):
        return ",".join(str(v) for v in value)
    if spec.kind == "range":
        return ":".join("" if v is None else str(v) for v in value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option to ``parser`` (``detect`` and ``batch``). Values arrive as text and are parsed
    and checked by :func:`from_namespace`, so a bad value is refused with the library's one line."""
    for name, spec in specs().items():
        if spec.kind == "flag":
            parser.add_argument(spec.flag, dest=name, action="store_true", help=spec.help)
        elif spec.kind == "bool":
            parser.add_argument(
                spec.flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=spec.help
            )
        else:
            metavar = spec.metavar or (
                "{" + ",".join(spec.choices) + "}" if spec.kind == "choice" else spec.flag[2:].upper().replace("-", "_")
            )
            parser.add_argument(spec.flag, dest=name, metavar=metavar, default=None, help=spec.help)


def from_namespace(args: argparse.Namespace) -> DetectOptions:
    """:class:`DetectOptions` from parsed arguments (see :func:`add_arguments`); :class:`InputError`
    names the first bad value."""
    values: dict[str, Any] = {}
    for name, spec in specs().items():
        raw = getattr(args, name, None)
        if raw is None:
            continue
        values[name] = from_text(name, raw) if isinstance(raw, str) and spec.kind not in ("flag", "bool") else raw
    return DetectOptions(**values)


def options_from_mapping(values: Mapping[str, Any]) -> DetectOptions:
    """:class:`DetectOptions` from a mapping of field names (unknown names are refused, one line)."""
    unknown = sorted(set(values) - set(_fields()))
    if unknown:
        raise InputError(f"unknown detect option(s): {', '.join(unknown)}")
    return DetectOptions(**dict(values))
