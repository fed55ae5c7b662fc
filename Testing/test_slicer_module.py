"""Static checks of the Slicer module (Slicer cannot run here): the module and its .ui parse, every
Slicer/Qt/CTK/VTK name it uses exists in Slicer's real API (``Testing/data/slicer_api_reference.json``,
built from the Slicer source at v5.12.3 by ``make_slicer_api_reference.py``), the .ui binds exactly
the parameter node's fields, and the CMake files follow Slicer's extension/module templates."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "AnomalyDiffusion" / "AnomalyDiffusion.py"
UI = ROOT / "AnomalyDiffusion" / "Resources" / "UI" / "AnomalyDiffusion.ui"
REF = json.loads((ROOT / "Testing" / "data" / "slicer_api_reference.json").read_text())


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE.read_text(), filename=str(MODULE))


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI).getroot()


def _chains(tree: ast.Module) -> set[tuple[str, ...]]:
    """Every dotted attribute chain rooted at a bare name, e.g. ("slicer", "util", "loadUI")."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                out.add((cur.id, *reversed(parts)))
    # keep maximal chains only
    return {c for c in out if not any(o[: len(c)] == c and len(o) > len(c) for o in out)}


def test_reference_is_from_the_release():
    assert REF["source"]["ref"] == "v5.12.3" and len(REF["source"]["commit"]) == 40


def test_every_slicer_qt_ctk_vtk_name_exists(tree):
    imported = {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "slicer" for a in n.names
    }
    assert imported <= set(REF["slicer_top_level"]), imported - set(REF["slicer_top_level"])
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("slicer."):
            sub = n.module.split(".", 1)[1]
            names = {"util": "slicer_util", "parameterNodeWrapper": "slicer_parameterNodeWrapper",
                     "ScriptedLoadableModule": "slicer_ScriptedLoadableModule", "i18n": None}[sub]  # fmt: skip
            if names:
                missing = {a.name for a in n.names} - set(REF[names])
                assert not missing, (n.module, missing)
    problems = []
    for chain in _chains(tree):
        root, rest = chain[0], chain[1:]
        if root == "slicer":
            first = rest[0]
            if first not in REF["slicer_top_level"]:
                problems.append(chain)
            elif first == "util" and len(rest) > 1 and rest[1] not in REF["slicer_util"]:
                problems.append(chain)
            elif first == "packaging" and len(rest) > 1 and rest[1] not in REF["slicer_packaging"]:
                problems.append(chain)
            elif first == "modules" and len(rest) > 1 and rest[1] not in REF["slicer_modules"]:
                problems.append(chain)
            elif first in REF["class_identifiers"] and len(rest) > 1 and rest[1] not in REF["class_identifiers"][first]:
                problems.append(chain)
        elif root in ("qt", "ctk", "vtk") and rest[0] not in REF[f"{root}_names_used_by_slicer_python"]:
            problems.append(chain)
    assert not problems, problems


def test_ui_widgets_exist_in_slicer(ui):
    classes = {w.get("class") for w in ui.iter("widget")}
    known = set(REF["ui_widget_classes_in_slicer_ui_files"])
    assert classes <= known, classes - known
    assert ui.find("widget").get("class") == "qMRMLWidget"


def _parameter_fields(tree) -> dict[str, ast.AST]:
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AnomalyDiffusionParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in cls.decorator_list)
    return {s.target.id: s.annotation for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_ui_binds_exactly_the_parameter_node(tree, ui):
    fields = _parameter_fields(tree)
    bound = {}
    for w in ui.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w
    assert set(bound) == set(fields)
    for name, widget in bound.items():
        ann = ast.unparse(fields[name])
        if "Choice(" in ann:  # combo items are exactly the allowed values
            choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", ann).group(1))
            items = [i.find("property/string").text for i in widget.findall("item")]
            assert widget.get("class") == "QComboBox" and items == choices, name
        if ann == "Path":
            assert widget.get("class") in ("ctkPathLineEdit", "ctkDirectoryButton"), name  # Path connectors
        if "vtkMRML" in ann:
            types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert widget.get("class") == "qMRMLNodeComboBox" and ann.split("vtkMRML")[0] == "" and types == [ann]


def test_module_uses_only_widgets_the_ui_defines(tree, ui):
    names = {w.get("name") for w in ui.iter("widget")}
    used = {c[2] for c in _chains(tree) if c[:2] == ("self", "ui") and len(c) > 2}
    used |= {c[1] for c in _chains(tree) if c[0] == "ui" and len(c) > 1}
    assert used <= names, used - names
    # every qMRML widget gets the scene through the designer connection
    combos = {w.get("name") for w in ui.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.find("receiver").text for c in ui.iter("connection") if "mrmlSceneChanged" in c.find("signal").text}
    assert combos == connected


def test_module_has_the_template_classes(tree):
    classes = {n.name: [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in n.bases]
               for n in tree.body if isinstance(n, ast.ClassDef)}  # fmt: skip
    assert classes["AnomalyDiffusion"] == ["ScriptedLoadableModule"]
    assert classes["AnomalyDiffusionWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["AnomalyDiffusionLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["AnomalyDiffusionTest"] == ["ScriptedLoadableModuleTest"]
    src = MODULE.read_text()
    assert not re.search(r"^\s*import imp\b", src, re.M)  # Slicer 5.12's Python 3.12 has no imp
    # heavy imports only inside functions: importing the module must not need torch
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_imports |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not top_imports & {"torch", "timm", "AnomalyDiffusionLib", "numpy"}


def test_cmake_follows_the_templates():
    """Read against Slicer v5.12.3's Utilities/Templates/Extensions/Default/CMakeLists.txt and
    Modules/Scripted/CMakeLists.txt (cmake cannot find Slicer here, so the structure is checked)."""
    top = (ROOT / "CMakeLists.txt").read_text()
    for needed in (
        "cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)",
        "project(AnomalyDiffusion)",
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(AnomalyDiffusion)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert needed in top, needed
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{var} "[^"]+"\)', top), var
    assert top.index("find_package(Slicer") < top.index("add_subdirectory") < top.index("Slicer_EXTENSION_CPACK")
    mod = (ROOT / "AnomalyDiffusion" / "CMakeLists.txt").read_text()
    assert "set(MODULE_NAME AnomalyDiffusion)" in mod and "WITH_GENERIC_TESTS" in mod
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in mod
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", mod, re.S).group(1).split()
    for r in resources:
        assert (ROOT / "AnomalyDiffusion" / r.replace("${MODULE_NAME}", "AnomalyDiffusion")).is_file(), r
    assert "Resources/requirements.txt" in resources
    lib = (ROOT / "AnomalyDiffusionLib" / "CMakeLists.txt").read_text()
    assert "ctkMacroCompilePythonScript(" in lib and "Slicer_QTSCRIPTEDMODULES_LIB_DIR}/AnomalyDiffusionLib" in lib


def test_requirements_leave_slicer_packages_alone():
    reqs = [
        line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for line in (ROOT / "AnomalyDiffusion" / "Resources" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "timm" in reqs and not {"torch", "torchvision", "numpy", "simpleitk"} & set(reqs)
