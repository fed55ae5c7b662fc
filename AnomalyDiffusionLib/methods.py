"""The registry of methods: name → implementation, in the order the pipeline runs them.

Adding a method is one new package (its maths, ``manifest``, ``model`` and a class with the
:class:`~AnomalyDiffusionLib.method.Method` shape) and one line here. Order matters only where a
method reads an earlier one's result (AnoFPDM's ``gate="dode"`` reads AnoDODE's slice flags).
"""

from __future__ import annotations

import os

from .bundle import Bundle, BundleError, open_bundle, validate_manifest
from .dode.method import AnoDODE
from .errors import InputError
from .fpdm.method import AnoFPDM
from .method import Method

REGISTRY: dict[str, Method] = {m.name: m for m in (AnoDODE(), AnoFPDM())}


def get(name: str) -> Method:
    """The method called ``name``; an :class:`~AnomalyDiffusionLib.errors.InputError` naming the
    known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown method {name!r} for --methods (this library knows {', '.join(REGISTRY)})") from None


def run_order(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``names`` in the registry's order (unknown names refused)."""
    for n in names:
        get(n)
    return tuple(n for n in REGISTRY if n in names)


def validate_manifest_sections(m: dict) -> dict:
    """A whole manifest: the container (:func:`~AnomalyDiffusionLib.bundle.validate_manifest`) and
    the section of every listed method this library knows; returns it."""
    m = validate_manifest(m)
    for name in m["methods"]:
        if name in REGISTRY:
            REGISTRY[name].validate(m)
    return m


def validate_bundle(b: Bundle, methods: tuple[str, ...] | list[str] | None = None) -> None:
    """Check the sections of ``methods`` (default: all the bundle lists) of an opened bundle;
    a listed method this library does not know is refused only when asked for."""
    for name in b.methods if methods is None else methods:
        if name not in b.methods:
            raise BundleError(f"bundle '{b.name}' has no {name} model (it has {', '.join(b.methods)})")
        if name in REGISTRY:
            REGISTRY[name].validate(b.manifest)
        elif methods is not None:
            get(name)


def open_checked(path: str | os.PathLike | None = None) -> Bundle:
    """:func:`~AnomalyDiffusionLib.bundle.open_bundle` (bytes, hashes, container schema), then the
    section of every listed method this library knows: what the CLI opens before any work starts."""
    b = open_bundle(path)
    validate_bundle(b)
    return b
