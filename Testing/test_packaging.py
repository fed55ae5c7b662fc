"""Packaging (issue 17, item 6): the embedded default bundle is package data of the wheel, and the
library finds it there when no checkout folder is beside the package. `.ci/wheel_check` runs the
whole demo from such an install."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import AnomalyDiffusionLib.bundle as bundle_mod

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "Resources" / "Bundles" / bundle_mod.DEFAULT_BUNDLE_NAME


def test_default_bundle_is_found_inside_an_installed_package(tmp_path, monkeypatch):
    """Installed from a wheel: no Resources/ beside the package, the copy inside it is used."""
    pkg = tmp_path / "site-packages" / "AnomalyDiffusionLib"
    inside = pkg / "Resources" / "Bundles" / bundle_mod.DEFAULT_BUNDLE_NAME
    inside.mkdir(parents=True)
    (inside / "manifest.json").write_text("{}")
    monkeypatch.delenv("ANOMALY_DIFFUSION_BUNDLE", raising=False)
    monkeypatch.setattr(bundle_mod, "__file__", str(pkg / "bundle.py"))
    assert bundle_mod.default_bundle_path() == inside
    shutil.rmtree(pkg / "Resources")
    with pytest.raises(bundle_mod.BundleError, match="ANOMALY_DIFFUSION_BUNDLE"):
        bundle_mod.default_bundle_path()


def test_checkout_bundle_is_found_beside_the_package(monkeypatch):
    """Source checkout / editable install / Slicer extension: Resources/Bundles one folder up."""
    monkeypatch.delenv("ANOMALY_DIFFUSION_BUNDLE", raising=False)
    assert bundle_mod.default_bundle_path() == SHIPPED.resolve()


@pytest.mark.slow
def test_wheel_ships_every_file_of_the_default_bundle(tmp_path):
    """The wheel built as `pip install .` builds it holds the bundle's manifest and every file it
    lists, byte for byte, under AnomalyDiffusionLib/Resources/Bundles/."""
    cfg = tmp_path / "build.cfg"  # build outside the checkout: nothing left behind, no stale files
    cfg.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n[egg_info]\negg_base = {tmp_path}\n")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(ROOT)],
        check=True,
        env={**os.environ, "DIST_EXTRA_CONFIG": str(cfg)},
    )
    (wheel,) = dist.glob("*.whl")
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    prefix = f"AnomalyDiffusionLib/Resources/Bundles/{bundle_mod.DEFAULT_BUNDLE_NAME}/"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert prefix + "manifest.json" in names
        assert zf.read(prefix + "manifest.json") == (SHIPPED / "manifest.json").read_bytes()
        for name, entry in manifest["files"].items():
            data = zf.read(prefix + name)
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert "AnomalyDiffusionLib/dode/model.py" in names  # subpackages too
        schemas = {str(f.relative_to(ROOT)) for f in (ROOT / "AnomalyDiffusionLib").rglob("*.schema.json")}
        assert len(schemas) == 3 and schemas <= names  # the manifest schemas the reader loads
        assert not any(n.startswith(("Testing/", "training/", "Resources/")) for n in names)
