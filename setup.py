"""Build hook: the wheel carries the embedded default model bundle(s) as package data.

The bundles live in ``Resources/Bundles/`` at the top of the repository, where the Slicer extension
(CMakeLists.txt) and a source checkout or editable install find them (``bundle.default_bundle_path``
looks one folder above the package first). A built wheel has no such folder beside the package, so
``build_py`` copies every bundle folder (a folder with ``manifest.json``) into
``AnomalyDiffusionLib/Resources/Bundles/`` inside the wheel, the second place
``default_bundle_path`` looks. Editable installs skip the copy: they use the checkout's folder.
Everything else (metadata, dependencies, packages) is in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUNDLES = HERE / "Resources" / "Bundles"
PACKAGED = Path("AnomalyDiffusionLib") / "Resources" / "Bundles"


def bundle_folders(root: Path = BUNDLES) -> list[Path]:
    """The complete bundle folders under ``root`` (hidden ones, e.g. a bundle being written, skipped)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "manifest.json").is_file())


class BuildPyWithBundles(build_py):
    """``build_py`` that also copies the model bundles into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest_root = Path(self.build_lib) / PACKAGED
        if dest_root.exists():
            shutil.rmtree(dest_root)  # no stale files from an earlier build
        for src in bundle_folders():
            for f in src.rglob("*"):
                rel = f.relative_to(src)
                if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                out = dest_root / src.name / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)


setup(cmdclass={"build_py": BuildPyWithBundles})
