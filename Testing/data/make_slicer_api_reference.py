#!/usr/bin/env python
"""Build ``slicer_api_reference.json``: the Slicer API names the module may use, read from a Slicer
source checkout at one release tag (git objects only, nothing is imported or built).

  python Testing/data/make_slicer_api_reference.py /path/to/Slicer.git v5.12.3

Lists: public names of ``slicer.util`` / ``slicer.packaging`` / ``slicer.parameterNodeWrapper``,
``slicer.*`` top-level names (including every vtkMRML*/vtkSlicer* class defined in a header),
module names reachable as ``slicer.modules.<name>`` (Loadable and Scripted modules, lower-cased),
every ``qt.*``, ``ctk.*`` and ``vtk.*`` attribute that Slicer's own Python code uses (evidence that
PythonQt / VTK expose it), every widget class used in Slicer's .ui files, the Qt/CTK/MRML widget
class names from headers, and the identifiers declared in the headers of the MRML classes whose
static members the module calls.
"""

from __future__ import annotations

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


def main(repo: str, ref: str) -> None:
    commit = git(repo, "rev-parse", f"{ref}^{{commit}}").strip()
    files = git(repo, "ls-tree", "-r", "--name-only", commit).splitlines()
    show = lambda path: git(repo, "show", f"{commit}:{path}")  # noqa: E731
    ref_json: dict = {"source": {"repo": "Slicer/Slicer", "ref": ref, "commit": commit}}
    ref_json["slicer_util"] = public_names(show("Base/Python/slicer/util.py"))
    ref_json["slicer_packaging"] = public_names(show("Base/Python/slicer/packaging.py"))
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
        "packaging",
        "parameterNodeWrapper",
        "i18n",
        "ScriptedLoadableModule",
        "testing",
        "cli",
        "selfTests",
    }  # set up in slicer/__init__.py and slicerqt.py
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
    for cls in ("vtkMRMLSliceNode", "vtkMRMLPlotSeriesNode", "vtkMRMLSubjectHierarchyNode", "vtkSegment"):
        path = next(f for f in files if f.endswith(f"/{cls}.h"))
        members[cls] = sorted(set(re.findall(r"\b([A-Za-z_]\w*)\b", show(path))))
    ref_json["class_identifiers"] = members
    json.dump(ref_json, sys.stdout, indent=0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
