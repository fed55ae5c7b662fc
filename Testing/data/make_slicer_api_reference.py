#!/usr/bin/env python
"""Build ``slicer_api_reference.json``: the Slicer API names the module may use, read from a Slicer
source checkout at each release tag the module supports (git objects only, nothing is imported or
built), plus the PyTorch extension's ``PyTorchUtils`` API.

  python Testing/data/make_slicer_api_reference.py /path/to/Slicer.git v5.10.0 v5.12.3 \
      --pytorch /path/to/SlicerPyTorch.git > Testing/data/slicer_api_reference.json

Per tag: public names of ``slicer.util`` (and its functions' parameters) / ``slicer.packaging``
(empty where the tag has none) / ``slicer.parameterNodeWrapper``, ``slicer.*`` top-level names
(including every vtkMRML*/vtkSlicer* class defined in a header), module names reachable as
``slicer.modules.<name>`` (Loadable and Scripted modules, lower-cased), every ``qt.*``, ``ctk.*``
and ``vtk.*`` attribute that Slicer's own Python code uses (evidence that PythonQt / VTK expose it),
every widget class used in Slicer's .ui files, the Qt/CTK/MRML widget class names from headers, the
identifiers declared in the headers of the MRML classes whose members the module calls, the
extension template's CMake version range, the ``SampleData`` module's functions and
``SampleDataLogic`` methods (with their parameters), and how ``slicer.util.getModuleLogic`` finds a
scripted module's logic (the attribute it reads on the module widget).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True).stdout


def public_names(src: str) -> list[str]:
    tree = ast.parse(src)
    names = []
    for node in tree.body:
        blocks = [node] + (node.body + getattr(node, "orelse", []) if isinstance(node, (ast.If, ast.Try)) else [])
        for n in blocks:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and not n.name.startswith("_"):
                names.append(n.name)
            elif isinstance(n, ast.Assign):
                names += [t.id for t in n.targets if isinstance(t, ast.Name) and not t.id.startswith("_")]
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                names += [
                    (a.asname or a.name).split(".")[0] for a in n.names if not (a.asname or a.name).startswith("_")
                ]
    return sorted(set(names))


def class_methods(src: str, cls: str) -> dict[str, list[str]]:
    """``{method: [parameter names]}`` of a class's public methods and its constructor in ``src``."""
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = {}
    for f in node.body:
        if isinstance(f, ast.FunctionDef) and (not f.name.startswith("_") or f.name == "__init__"):
            out[f.name] = [a.arg for a in f.args.args + f.args.kwonlyargs]
    return out


def function_parameters(src: str) -> dict[str, list[str]]:
    """``{function: [parameter names]}`` of a module's public top-level functions; ``"**"`` is listed
    when it takes arbitrary keywords."""
    out = {}
    for f in ast.parse(src).body:
        if isinstance(f, ast.FunctionDef) and not f.name.startswith("_"):
            out[f.name] = [a.arg for a in f.args.args + f.args.kwonlyargs] + (["**"] if f.args.kwarg else [])
    return out


def module_logic_attribute(util_src: str) -> str | None:
    """The attribute ``getModuleLogic`` reads on a scripted module's widget (``getModuleGui(m).X``)."""
    fn = next(n for n in ast.parse(util_src).body if isinstance(n, ast.FunctionDef) and n.name == "getModuleLogic")
    for n in ast.walk(fn):
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Name)
            and n.value.func.id == "getModuleGui"
        ):
            return n.attr
    return None


def reference(repo: str, ref: str) -> dict:
    commit = git(repo, "rev-parse", f"{ref}^{{commit}}").strip()
    files = git(repo, "ls-tree", "-r", "--name-only", commit).splitlines()
    show = lambda path: git(repo, "show", f"{commit}:{path}")  # noqa: E731
    ref_json: dict = {"source": {"repo": "Slicer/Slicer", "ref": ref, "commit": commit}}
    util_src = show("Base/Python/slicer/util.py")
    ref_json["slicer_util"] = public_names(util_src)
    ref_json["slicer_util_parameters"] = function_parameters(util_src)
    has_packaging = "Base/Python/slicer/packaging.py" in files
    ref_json["slicer_packaging"] = public_names(show("Base/Python/slicer/packaging.py")) if has_packaging else []
    ref_json["getModuleLogic_widget_attribute"] = module_logic_attribute(util_src)
    template = show("Utilities/Templates/Extensions/Default/CMakeLists.txt")
    ref_json["extension_template_cmake_minimum_required"] = re.search(
        r"cmake_minimum_required\(VERSION ([\d.]+(?:\.\.\.[\d.]+)?)", template
    ).group(1)
    sample = show("Modules/Scripted/SampleData/SampleData.py")
    ref_json["SampleData"] = public_names(sample)
    ref_json["SampleData_SampleDataLogic"] = class_methods(sample, "SampleDataLogic")
    pnw = set()
    for f in files:
        if f.startswith("Base/Python/slicer/parameterNodeWrapper/") and f.endswith(".py"):
            pnw |= set(public_names(show(f)))
    ref_json["slicer_parameterNodeWrapper"] = sorted(pnw)
    slm = show("Base/Python/slicer/ScriptedLoadableModule.py")
    ref_json["slicer_ScriptedLoadableModule"] = public_names(slm)
    classes = set()
    for f in files:
        if f.endswith(".h"):
            base = f.rsplit("/", 1)[-1][:-2]
            if re.match(r"^(vtkMRML|vtkSlicer|vtkSegment|qMRML|qSlicer|ctk)\w+$", base):
                classes.add(base)
    top = set(public_names(show("Base/Python/slicer/__init__.py")))
    top |= {
        "app",
        "mrmlScene",
        "modules",
        "util",
        "parameterNodeWrapper",
        "i18n",
        "ScriptedLoadableModule",
        "testing",
        "cli",
        "selfTests",
    }  # set up in slicer/__init__.py and slicerqt.py
    if has_packaging:
        top.add("packaging")
    ref_json["slicer_top_level"] = sorted(
        top | {c for c in classes if c.startswith(("vtkMRML", "vtkSlicer", "vtkSegment"))}
    )
    mods = set()
    for f in files:
        m = re.match(r"^Modules/(Loadable|Scripted)/(\w+)/CMakeLists.txt$", f)
        if m:
            mods.add(m.group(2).lower())
    ref_json["slicer_modules"] = sorted(mods)
    used = {"qt": set(), "ctk": set(), "vtk": set()}
    for f in files:
        if f.endswith(".py"):
            try:
                text = show(f)
            except subprocess.CalledProcessError:
                continue
            for root in used:
                used[root] |= set(re.findall(rf"\b{root}\.(\w+)", text))
    for root, names in used.items():
        ref_json[f"{root}_names_used_by_slicer_python"] = sorted(names)
    ui_classes = set()
    for f in files:
        if f.endswith(".ui"):
            ui_classes |= set(re.findall(r'<widget class="(\w+)"', show(f)))
    ref_json["ui_widget_classes_in_slicer_ui_files"] = sorted(ui_classes)
    ref_json["widget_classes_from_headers"] = sorted(c for c in classes if c.startswith(("qMRML", "qSlicer", "ctk")))
    members = {}
    for cls in (
        "vtkMRMLSliceNode",
        "vtkMRMLPlotSeriesNode",
        "vtkMRMLSubjectHierarchyNode",
        "vtkSegment",
        "vtkMRMLStorableNode",
        "vtkMRMLScalarVolumeDisplayNode",
        "vtkMRMLScene",
        "vtkMRMLNode",
        "vtkMRMLTransformNode",
    ):
        path = next(f for f in files if f.endswith(f"/{cls}.h"))
        members[cls] = sorted(set(re.findall(r"\b([A-Za-z_]\w*)\b", show(path))))
    ref_json["class_identifiers"] = members
    return ref_json


def pytorch_reference(repo: str) -> dict:
    commit = git(repo, "rev-parse", "HEAD^{commit}").strip()
    src = git(repo, "show", f"{commit}:PyTorchUtils/PyTorchUtils.py")
    return {
        "source": {"repo": "fepegar/SlicerPyTorch", "commit": commit},
        "PyTorchUtilsLogic": class_methods(src, "PyTorchUtilsLogic"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", help="Slicer git directory")
    ap.add_argument("refs", nargs="+", help="release tags, e.g. v5.10.0 v5.12.3")
    ap.add_argument("--pytorch", help="SlicerPyTorch git directory (PyTorchUtils)")
    args = ap.parse_args()
    out: dict = {"versions": {ref: reference(args.repo, ref) for ref in args.refs}}
    if args.pytorch:
        out["PyTorchUtils"] = pytorch_reference(args.pytorch)
    json.dump(out, sys.stdout, indent=0)


if __name__ == "__main__":
    main()
