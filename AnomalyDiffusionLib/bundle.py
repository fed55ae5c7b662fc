"""Model bundles: a folder (or a zip of one) holding ``manifest.json`` and ``*.safetensors`` files.

A bundle is everything ``detect`` needs besides the volumes: which methods it holds, the modalities
and their order, the slice size, the diffusion schedule, each network's configuration, the encoder
(timm name, pretrained or not), the calibration (AnoFPDM: w*, cosine threshold, M_max, a, b, median
size, minimum component size; AnoDODE: scales, feature standardisation, decision threshold) and the
sha256 of every weight file.

Opening a bundle (:func:`open_bundle`) checks, before any tensor is built:

* the manifest's schema (required keys and their types) and its major format version (a bundle of
  an unknown major version is refused; a newer minor version is read with a warning);
* for a zip, that no member escapes the bundle (absolute names, ``..`` parts, links) — the zip is
  read in memory and never extracted;
* the sha256 and size of every listed file; files not listed are ignored.

Weights are read with safetensors (never pickle); weight files may be stored as float16 to keep the
embedded bundle small and are cast back to float32 when read (``"dtype"`` per file in the manifest).
This module reads, verifies and writes bytes and the container's schema only, and imports no method.
Each method owns its manifest section (the section named after it: ``fpdm``, ``dode``): it checks it
(``<method>.manifest.validate``, run for every listed method by
:func:`AnomalyDiffusionLib.methods.validate_bundle`), writes it (``<method>.manifest.section``) and
rebuilds its networks from it (``<method>.model``). A bundle listing a method this library does not
know opens; running that method is refused by name.

:func:`write_bundle` is the only writer; training and packaging scripts assemble a manifest from
the method sections and call it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import itertools
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import jsonschema
import torch

from . import __version__
from .errors import AnomalyDiffusionError

log = logging.getLogger(__name__)

FORMAT = "anomaly-diffusion-bundle"
#: 1.1: pipeline.volume_seed_*, volume_flair_bias_px; 1.2: intensity_reference, pipeline.intensity;
#: 1.3: pipeline.refine, refine_flair_z, refine_reach_mm, refine_keep_flair_z, volume_components
#: 1.4: slice_fov_mm (AnoFPDM's slices framed on the brain; a 1.3 reader warns and ignores it)
FORMAT_VERSION = "1.4"
#: the embedded default bundle: Resources/Bundles/<name> beside the package, or inside it in a wheel
DEFAULT_BUNDLE_NAME = "phantom-small"


class BundleError(AnomalyDiffusionError):
    """A model bundle is missing, malformed, tampered with, or of an unsupported version."""


# ------------------------------------------------------------------------------------ schema
#: JSON Schema (draft 2020-12) of the manifest's container; each method's section has its own
#: beside that method's ``manifest.py``
BUNDLE_SCHEMA = ("AnomalyDiffusionLib", "schemas/bundle.schema.json")


@functools.cache
def load_schema(package: str, name: str) -> dict:
    """A JSON Schema shipped as package data (read once; works from a wheel)."""
    return json.loads(importlib.resources.files(package).joinpath(name).read_text(encoding="utf-8"))


def _where(base: str, path: Iterable) -> str:
    """``fpdm.calibration.m_max[0]``, ``dode.score_networks['128']``: where a problem is."""
    out = base
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.isidentifier():
            out += f"['{part}']"
        else:
            out += f".{part}" if out else part
    return out


def _non_finite(x: object, path: tuple) -> tuple[tuple, float] | None:
    """The path and value of the first NaN or infinity in a JSON document (Python's json reads them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return path, x
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        found = _non_finite(v, (*path, k))
        if found is not None:
            return found
    return None


def check_schema(instance: object, schema: dict, where: str) -> dict:
    """``instance`` itself once it is valid against a JSON Schema whose top level is an object;
    raises :class:`BundleError` naming the first problem as a manifest path
    (``manifest: fpdm.calibration.cos_threshold: 2 is greater than the maximum of 1``)."""
    bad = _non_finite(instance, ())
    if bad is not None:  # JSON Schema's ranges let NaN through (every comparison with it is false)
        raise BundleError(f"manifest: {_where(where, bad[0])}: {bad[1]} is not a finite number")
    validator = jsonschema.Draft202012Validator(schema)
    err = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if err is None:
        if not isinstance(instance, dict):
            raise BundleError(f"manifest: {where or 'top level'} must be an object")
        return instance
    at = _where(where, err.absolute_path) or "top level"
    if err.validator == "required":
        have = err.instance if isinstance(err.instance, dict) else {}
        missing = next((k for k in err.validator_value if k not in have), "?")
        raise BundleError(f"manifest: {at} lacks '{missing}'")
    if err.validator == "type":
        got = "null" if err.instance is None else type(err.instance).__name__
        if err.validator_value == "object":
            raise BundleError(f"manifest: {at} must be an object")
        raise BundleError(f"manifest: {at} has the wrong type ({got}; expected {err.validator_value})")
    raise BundleError(f"manifest: {at}: {err.message}")


def validate_manifest(m: object) -> dict:
    """Check a manifest's container (``schemas/bundle.schema.json``) and format version; returns it.
    Each method checks its own section (:func:`AnomalyDiffusionLib.methods.validate_manifest_sections`).
    Raises :class:`BundleError` naming the first problem."""
    if not isinstance(m, dict):
        raise BundleError("manifest: top level must be an object")
    if "format" in m and m["format"] != FORMAT:
        raise BundleError(f"not an AnomalyDiffusion bundle (format {m['format']!r}, expected {FORMAT!r})")
    version = m.get("format_version")
    if isinstance(version, str):
        try:
            major, minor = (int(p) for p in version.split("."))
        except ValueError:
            raise BundleError(f"manifest: unreadable format_version {version!r}") from None
        my_major, my_minor = (int(p) for p in FORMAT_VERSION.split("."))
        if major != my_major:
            raise BundleError(
                f"bundle format version {version} is not supported (this library reads {my_major}.x); "
                "use a matching AnomalyDiffusion version"
            )
        if minor > my_minor:
            log.warning(
                "bundle format %s is newer than this library's %s; unknown fields are ignored", version, FORMAT_VERSION
            )
    check_schema(m, load_schema(*BUNDLE_SCHEMA), "")
    for name in m["methods"]:
        if not isinstance(m.get(name), dict):
            raise BundleError(f"manifest: method '{name}' has no '{name}' section")
    pipe = m.get("pipeline") or {}
    top = pipe.get("volume_z", float("inf"))  # without it the library default applies (checked at run time)
    if "volume_grow_z" in pipe and pipe["volume_grow_z"] > top:
        raise BundleError("manifest: pipeline.volume_grow_z must not exceed pipeline.volume_z")
    if "volume_seed_map_z" in pipe and not pipe["volume_grow_z"] <= pipe["volume_seed_map_z"] <= top:
        raise BundleError("manifest: pipeline.volume_seed_map_z must lie between pipeline.volume_grow_z and volume_z")
    if pipe.get("refine") == "flair" and "refine_flair_z" not in pipe:
        raise BundleError("manifest: pipeline.refine 'flair' needs pipeline.refine_flair_z and refine_reach_mm")
    if pipe.get("intensity") == "landmarks" and "intensity_reference" not in m:
        raise BundleError("manifest: pipeline.intensity 'landmarks' needs an intensity_reference")
    if "intensity_reference" in m:
        ref = m["intensity_reference"]
        missing = [x for x in m["modalities"] if x not in ref["modalities"]]
        if missing:
            raise BundleError(f"manifest: intensity_reference has no landmarks for {', '.join(missing)}")
        # the schema bounds each number; the piecewise-linear map also needs them in increasing order
        # (AnomalyDiffusionLib.intensity, which the method side imports: this module reads bytes and schema)
        for what, seq in [("percentiles", ref["percentiles"]), *ref["modalities"].items()]:
            n = len(ref["percentiles"])
            if (what != "percentiles" and len(seq) != n) or any(b <= a for a, b in itertools.pairwise(seq)):
                raise BundleError(f"manifest: intensity_reference: {what} must be {n} increasing values")
    for name in m["files"]:
        _safe_member(name)
    return m


def need_file(m: dict, name: str, where: str) -> None:
    if name not in m["files"]:
        raise BundleError(f"manifest: {where} names '{name}', which is not listed under files")


def _safe_member(name: str) -> PurePosixPath:
    """A bundle-relative file name that cannot escape the bundle folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise BundleError(f"bundle member '{name}' points outside the bundle; refusing it")
    return p


# -------------------------------------------------------------------------------------- reading
@dataclass
class Bundle:
    """A verified bundle in memory: its manifest, file bytes and identity.

    ``sha256`` is the hash of ``manifest.json``: the manifest lists every file's hash, so it names
    the bundle's whole content.
    """

    manifest: dict
    source: Path
    sha256: str
    files: dict[str, bytes] = field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def methods(self) -> list[str]:
        return list(self.manifest["methods"])

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    @property
    def slice_size(self) -> int:
        return int(self.manifest["slice_size"])

    @property
    def slice_fov_mm(self) -> float | None:
        """Physical side (mm) of the model slice, framed on the brain (:meth:`PlaneFit.for_brain`);
        None: the scanner's whole field of view (every bundle before 3.6)."""
        v = self.manifest.get("slice_fov_mm")
        return None if v is None else float(v)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one weight file, floating point cast to float32."""
        from safetensors.torch import load

        if name not in self.files:
            raise BundleError(f"bundle '{self.name}' has no file '{name}'")
        try:
            state = load(self.files[name])
        except Exception as exc:  # safetensors' own error types
            raise BundleError(f"bundle file '{name}' is not a readable safetensors file ({exc})") from None
        return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}

    def document(self, name: str) -> bytes | None:
        """A verified non-weight file (e.g. ``configs/metadata.json``), None when the bundle has none."""
        entry = self.manifest["files"].get(name)
        if entry is None or entry.get("kind") != "document":
            return None
        return self.files[name]

    def info(self) -> dict:
        """A short, JSON-ready description (for ``bundle info`` and outputs)."""
        m = self.manifest
        out = {
            "name": m["name"],
            "sha256": self.sha256,
            "source": str(self.source),
            "format_version": m["format_version"],
            "version": m.get("version"),
            "changelog": m.get("changelog", []),
            "description": m["description"],
            "training_data": m["training_data"],
            "intended_use": m["intended_use"],
            "methods": m["methods"],
            "modalities": m["modalities"],
            "slice_size": m["slice_size"],
            "pipeline": m.get("pipeline", {}),  # default methods (and why), gate, calibration
            "files": {k: v["bytes"] for k, v in m["files"].items()},
            "total_bytes": sum(v["bytes"] for v in m["files"].values()),
        }
        for name in m["methods"]:  # each method's section, long per-channel lists summarised
            out[name] = _brief(m[name])
        return out


def _brief(value: object, limit: int = 16) -> object:
    """A manifest section for people: lists longer than ``limit`` become "[N values]"."""
    if isinstance(value, dict):
        return {k: _brief(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return f"[{len(value)} values]" if len(value) > limit else [_brief(v, limit) for v in value]
    return value


def _read_folder(path: Path) -> tuple[bytes, dict[str, bytes]]:
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"'{path}' is not a model bundle (no manifest.json)")
    manifest_bytes = mpath.read_bytes()
    manifest = _parse(manifest_bytes, path)
    files = {}
    root = path.resolve()
    for name in manifest.get("files", {}):
        rel = _safe_member(name)
        fp = path / rel
        if fp.is_symlink() or not fp.resolve().is_relative_to(root):
            raise BundleError(f"bundle member '{name}' points outside the bundle; refusing it")
        if not fp.is_file():
            raise BundleError(f"bundle '{path}' lacks the file '{name}' listed in its manifest")
        files[name] = fp.read_bytes()
    return manifest_bytes, files


def _read_zip(path: Path) -> tuple[bytes, dict[str, bytes]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"'{path}' is not a readable zip file ({exc})") from None
    with zf:
        infos = zf.infolist()
        for info in infos:  # refuse the whole archive if any member could escape on extraction
            _safe_member(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"bundle member '{info.filename}' is a link; refusing it")
        names = {i.filename: i for i in infos if not i.is_dir()}
        # a zip of the folder itself ("bundle/manifest.json") or of its contents ("manifest.json")
        prefix = ""
        if "manifest.json" not in names:
            tops = [n for n in names if n.endswith("/manifest.json") and n.count("/") == 1]
            if len(tops) != 1:
                raise BundleError(f"'{path}' is not a model bundle (no manifest.json in the zip)")
            prefix = tops[0][: -len("manifest.json")]
        manifest_bytes = zf.read(prefix + "manifest.json")
        manifest = _parse(manifest_bytes, path)
        files = {}
        for name in manifest.get("files", {}):
            _safe_member(name)
            key = prefix + name
            if key not in names:
                raise BundleError(f"bundle '{path}' lacks the file '{name}' listed in its manifest")
            files[name] = zf.read(key)
    return manifest_bytes, files


def _parse(manifest_bytes: bytes, where: Path) -> dict:
    try:
        m = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest.json in '{where}' is not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise BundleError(f"manifest.json in '{where}' is not a JSON object")
    return m


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a model bundle (a folder with ``manifest.json``, or a zip file);
    :func:`open_bundle` then verifies it."""
    p = Path(path)
    return (p / "manifest.json").is_file() or (p.is_file() and zipfile.is_zipfile(p))


def open_bundle(path: str | os.PathLike | None = None) -> Bundle:
    """Read and verify a bundle folder or zip (``None``: the embedded default bundle).

    Raises :class:`BundleError` for a missing path, a malformed or unsupported manifest, an unsafe zip
    member, or any file whose size or sha256 differs from the manifest.
    """
    p = default_bundle_path() if path is None else Path(path)
    if not p.exists():
        raise BundleError(f"model bundle not found: '{p}'")
    if p.is_dir():
        manifest_bytes, files = _read_folder(p)
    elif zipfile.is_zipfile(p):
        manifest_bytes, files = _read_zip(p)
    else:
        raise BundleError(f"'{p}' is neither a bundle folder nor a zip file")
    manifest = validate_manifest(_parse(manifest_bytes, p))
    for name, entry in manifest["files"].items():
        data = files[name]
        if len(data) != entry["bytes"]:
            raise BundleError(
                f"bundle file '{name}' has {len(data)} bytes, the manifest says {entry['bytes']}: "
                "the bundle was modified or is incomplete"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(
                f"bundle file '{name}' does not match its sha256 in the manifest: the bundle was modified"
            )
    return Bundle(manifest=manifest, source=p, sha256=hashlib.sha256(manifest_bytes).hexdigest(), files=files)


def default_bundle_path() -> Path:
    """The embedded default bundle: ``$ANOMALY_DIFFUSION_BUNDLE`` if set, else
    ``Resources/Bundles/phantom-small`` beside the package (a source checkout, an editable install,
    the Slicer extension), else inside it (``AnomalyDiffusionLib/Resources/Bundles``: the package data
    of a built wheel, copied there by ``setup.py``)."""
    env = os.environ.get("ANOMALY_DIFFUSION_BUNDLE")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for base in (here.parent / "Resources" / "Bundles", here / "Resources" / "Bundles"):
        cand = base / DEFAULT_BUNDLE_NAME
        if cand.exists():
            return cand
    raise BundleError(
        "the embedded default bundle was not found (expected Resources/Bundles/phantom-small beside or "
        "inside the package); pass --bundle PATH or set ANOMALY_DIFFUSION_BUNDLE"
    )


# -------------------------------------------------------------------------------------- writing
def _tensor_bytes(tensors: Mapping[str, torch.Tensor], dtype: str) -> bytes:
    from safetensors.torch import save

    want = {"float32": torch.float32, "float16": torch.float16}[dtype]
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            if dtype == "float16" and v.abs().max() > 6.0e4:
                raise BundleError(f"tensor '{k}' exceeds the float16 range; write the bundle as float32")
            v = v.to(want)
        out[k] = v.contiguous()
    return save(out)


def write_bundle(
    out: str | os.PathLike,
    manifest: dict,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    dtype: str = "float32",
    as_zip: bool = False,
    validate: Callable[[dict], object] = validate_manifest,
    documents: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a bundle atomically: ``manifest`` (without ``files``) plus ``weights`` (file name →
    state dict). Fills ``format``, ``format_version``, ``created``, ``library_version`` and ``files``
    (sha256, bytes, dtype), validates the result with ``validate`` (the container's schema here;
    :func:`AnomalyDiffusionLib.methods.validate_manifest_sections` checks the method sections too)
    and moves it into place only when complete. ``documents`` (bundle path → bytes, e.g. the card of
    :mod:`~AnomalyDiffusionLib.card`) are stored and listed with their sha256 like the weights."""
    if dtype not in ("float32", "float16"):
        raise ValueError("dtype must be 'float32' or 'float16'")
    blobs = {name: _tensor_bytes(t, dtype) for name, t in weights.items()}
    docs = dict(documents or {})
    if set(docs) & set(blobs):
        raise ValueError(f"documents and weights share names: {sorted(set(docs) & set(blobs))}")
    m = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "library_version": __version__,
        **{k: v for k, v in manifest.items() if k != "files"},
        "files": {
            **{
                name: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b), "dtype": dtype}
                for name, b in blobs.items()
            },
            **{
                name: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b), "kind": "document"}
                for name, b in docs.items()
            },
        },
    }
    blobs.update(docs)
    validate(json.loads(json.dumps(m)))  # what a reader will see
    text = json.dumps(m, indent=1).encode()
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr("manifest.json", text)
                for name, b in blobs.items():
                    zf.writestr(name, b)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name, b in blobs.items():
            fp = tmpdir / _safe_member(name)
            fp.parent.mkdir(parents=True, exist_ok=True)
            fp.write_bytes(b)
        (tmpdir / "manifest.json").write_bytes(text)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{int(time.time() * 1000)}")
            dest.rename(old)
            tmpdir.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmpdir.rename(dest)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return dest
