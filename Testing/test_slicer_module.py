"""Static checks of the Slicer module (Slicer cannot run here): the module and its .ui parse, every
Slicer/Qt/CTK/VTK/SampleData/PyTorchUtils name it uses exists in Slicer's real API of every supported
release (``Testing/data/slicer_api_reference.json``, built from the Slicer source at v5.10.0 and
v5.12.3 and from SlicerPyTorch by ``make_slicer_api_reference.py``), names that only a newer release
has are used only behind a check for them, ``getModuleLogic`` finds the logic where each release
looks for it, the .ui binds the parameter node's fields, and the CMake files follow Slicer's
extension/module templates of both releases."""

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
REFERENCE = json.loads((ROOT / "Testing" / "data" / "slicer_api_reference.json").read_text())
VERSIONS = REFERENCE["versions"]
SUPPORTED = ("v5.10.0", "v5.12.3")


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE.read_text(), filename=str(MODULE))


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI).getroot()


def _chain(node: ast.AST) -> tuple[str, ...] | None:
    """``a.b().c`` -> ("a", "b", "c"): an attribute chain rooted at a bare name, through calls."""
    parts = []
    cur = node
    while isinstance(cur, (ast.Attribute, ast.Call)):
        if isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        else:
            cur = cur.func
    if isinstance(cur, ast.Name):
        return (cur.id, *reversed(parts))
    return None


def _guard(test: ast.AST) -> tuple | None:
    """What an ``if`` tests for: ``hasattr(X, "name")`` -> ("hasattr", chain of X + name);
    ``_hasSlicerPackaging()`` -> ("packaging",)."""
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Name):
        if test.func.id == "hasattr" and len(test.args) == 2 and isinstance(test.args[1], ast.Constant):
            return ("hasattr", (*_chain(test.args[0]), test.args[1].value))
        if test.func.id == "_hasSlicerPackaging":
            return ("packaging",)
    return None


def _guarded_chains(tree: ast.Module) -> list[tuple[tuple[str, ...], tuple]]:
    """Every maximal attribute chain with the guards (``if`` tests) of the code it sits in."""
    out: list = []

    def visit(node, guards):
        if isinstance(node, ast.If):
            g = _guard(node.test)
            visit(node.test, guards)
            for child in node.body:
                visit(child, (*guards, g) if g else guards)
            for child in node.orelse:
                visit(child, guards)
            return
        if isinstance(node, ast.Attribute):
            c = _chain(node)
            if c is not None:
                out.append((c, guards))
                # the inner parts are prefixes of this chain; calls' arguments are still visited
                cur = node
                while isinstance(cur, (ast.Attribute, ast.Call)):
                    if isinstance(cur, ast.Call):
                        for a in [*cur.args, *[k.value for k in cur.keywords]]:
                            visit(a, guards)
                        cur = cur.func
                    else:
                        cur = cur.value
                return
        for child in ast.iter_child_nodes(node):
            visit(child, guards)

    visit(tree, ())
    return out


def _chains(tree: ast.Module) -> set[tuple[str, ...]]:
    return {c for c, _ in _guarded_chains(tree)}


def _slicer_chain_exists(chain: tuple[str, ...], ref: dict) -> bool:
    root, rest = chain[0], chain[1:]
    if root == "slicer":
        first = rest[0]
        if first not in ref["slicer_top_level"]:
            return False
        if len(rest) > 1:
            second = rest[1]
            if first == "util":
                return second in ref["slicer_util"]
            if first == "packaging":
                return second in ref["slicer_packaging"]
            if first == "modules":
                return second in ref["slicer_modules"]
            if first in ref["class_identifiers"]:
                return second in ref["class_identifiers"][first]
        return True
    if root in ("qt", "ctk", "vtk"):
        return rest[0] in ref[f"{root}_names_used_by_slicer_python"]
    if root == "SampleData":
        if rest[0] != "SampleDataLogic":
            return rest[0] in ref["SampleData"]
        return len(rest) == 1 or rest[1] in ref["SampleData_SampleDataLogic"]
    return True


def _holds(guard: tuple, ref: dict) -> bool:
    if guard[0] == "packaging":
        return bool(ref["slicer_packaging"])
    return _slicer_chain_exists(guard[1], ref)


def test_reference_covers_both_releases():
    assert set(VERSIONS) == set(SUPPORTED)
    for tag, ref in VERSIONS.items():
        assert ref["source"]["ref"] == tag and len(ref["source"]["commit"]) == 40
    # what the version-dependent code paths are about, as read from the sources
    assert not VERSIONS["v5.10.0"]["slicer_packaging"] and "pip_ensure" in VERSIONS["v5.12.3"]["slicer_packaging"]
    assert "registerCustomSampleDataCategory" not in VERSIONS["v5.10.0"]["SampleData_SampleDataLogic"]
    assert "registerCustomSampleDataCategory" in VERSIONS["v5.12.3"]["SampleData_SampleDataLogic"]
    assert len(REFERENCE["PyTorchUtils"]["source"]["commit"]) == 40


@pytest.mark.parametrize("tag", SUPPORTED)
def test_every_slicer_qt_ctk_vtk_name_exists(tree, tag):
    """Each name against the release; code behind ``if hasattr(...)`` / ``if _hasSlicerPackaging()``
    only against the releases where the check holds (and the check must fail where the name is absent)."""
    ref = VERSIONS[tag]
    imported = {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "slicer" for a in n.names
    }
    assert imported <= set(ref["slicer_top_level"]), imported - set(ref["slicer_top_level"])
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("slicer."):
            sub = n.module.split(".", 1)[1]
            names = {"util": "slicer_util", "parameterNodeWrapper": "slicer_parameterNodeWrapper",
                     "ScriptedLoadableModule": "slicer_ScriptedLoadableModule", "i18n": None}[sub]  # fmt: skip
            if names:
                missing = {a.name for a in n.names} - set(ref[names])
                assert not missing, (n.module, missing)
    problems = []
    checked = 0
    for chain, guards in _guarded_chains(tree):
        if all(_holds(g, ref) for g in guards):
            checked += 1
            if not _slicer_chain_exists(chain, ref):
                problems.append(chain)
    assert not problems, problems
    assert checked > 100


@pytest.mark.parametrize("tag", SUPPORTED)
def test_in_slicer_script_uses_existing_names(tag):
    """``AnomalyDiffusion/Testing/Python/run_in_slicer.py`` (run by a maintainer in Slicer) too."""
    script = ROOT / "AnomalyDiffusion" / "Testing" / "Python" / "run_in_slicer.py"
    chains = _chains(ast.parse(script.read_text()))
    problems = [c for c in chains if not _slicer_chain_exists(c, VERSIONS[tag])]
    assert not problems, problems
    used = {c[:3] for c in chains if c[0] == "slicer"}
    assert {("slicer", "util", "getModuleLogic"), ("slicer", "util", "saveScene"), ("slicer", "util", "loadScene"),
            ("slicer", "util", "exit")} <= used  # fmt: skip


@pytest.mark.parametrize("tag", SUPPORTED)
def test_slicer_util_keywords_exist(tree, tag):
    """Every keyword argument passed to a ``slicer.util`` function is one it takes in that release."""
    params = VERSIONS[tag]["slicer_util_parameters"]
    checked = 0
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and n.keywords and isinstance(n.func, ast.Attribute):
            c = _chain(n.func)
            if c and c[:2] == ("slicer", "util") and len(c) == 3 and c[2] in params:
                accepted = params[c[2]]
                bad = [k.arg for k in n.keywords if k.arg not in accepted and "**" not in accepted]
                assert not bad, (c[2], bad)
                checked += 1
    assert checked >= 3


def test_newer_names_are_behind_a_check(tree):
    """The 5.12-only names the module uses sit behind a check that is false on 5.10."""
    old, new = VERSIONS["v5.10.0"], VERSIONS["v5.12.3"]
    gated = [
        (c, g) for c, g in _guarded_chains(tree) if _slicer_chain_exists(c, new) and not _slicer_chain_exists(c, old)
    ]
    names = {c[:3] for c, _ in gated}
    assert ("slicer", "packaging", "pip_ensure") in names
    assert ("SampleData", "SampleDataLogic", "registerCustomSampleDataCategory") in names
    for chain, guards in gated:
        assert guards and not all(_holds(g, old) for g in guards), chain


def test_sample_data_calls_use_known_parameters(tree):
    """Keywords of ``SampleDataLogic`` calls: its class methods (registration), its constructor
    (``logMessage``) and the methods called on a new instance (``SampleDataLogic(...).downloadFile``),
    against both releases."""
    checked = set()
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        chain = _chain(n.func)
        if chain and chain[:2] == ("SampleData", "SampleDataLogic"):
            method = chain[2] if len(chain) > 2 else "__init__"
        elif (
            isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Call)
            and _chain(n.func.value.func) == ("SampleData", "SampleDataLogic")
        ):
            method = n.func.attr  # SampleDataLogic(...).method(...)
        else:
            continue
        for tag, ref in VERSIONS.items():
            params = ref["SampleData_SampleDataLogic"].get(method)
            if params is None:
                assert method == "registerCustomSampleDataCategory", (tag, method)  # 5.12-only: gated
                continue
            assert {k.arg for k in n.keywords} <= set(params), (tag, method)
            assert len(n.args) <= len(params) - 1, (tag, method)  # positional, after self
        checked.add(method)
    assert {"__init__", "downloadFile", "registerCustomSampleDataSource"} <= checked


def test_pytorch_utils_calls_exist(tree):
    """``PyTorchUtils.PyTorchUtilsLogic()`` and the methods and keywords the module calls on it."""
    api = REFERENCE["PyTorchUtils"]["PyTorchUtilsLogic"]
    logic_names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call):
            if _chain(n.value.func) == ("PyTorchUtils", "PyTorchUtilsLogic"):
                logic_names |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    assert logic_names
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
        and n.func.value.id in logic_names
    ]  # fmt: skip
    assert {c.func.attr for c in calls} == {"torchInstalled", "installTorch"}
    for c in calls:
        assert c.func.attr in api
        assert {k.arg for k in c.keywords} <= set(api[c.func.attr]), c.func.attr


def test_get_module_logic_finds_the_widgets_logic(tree):
    """``slicer.util.getModuleLogic`` reads ``getModuleGui(module).<attr>`` in every release: the
    widget sets that attribute to the module's logic in ``__init__`` (None) and ``setup``."""
    attrs = {ref["getModuleLogic_widget_attribute"] for ref in VERSIONS.values()}
    assert attrs == {"logic"}
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AnomalyDiffusionWidget")
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    for name in ("__init__", "setup"):
        assigned = {
            ast.unparse(a.value)
            for a in ast.walk(methods[name])
            if isinstance(a, ast.Assign)
            for t in a.targets
            if ast.unparse(t) == "self.logic"
        }
        assert assigned, name
    assert "AnomalyDiffusionLogic()" in {
        ast.unparse(a.value) for a in ast.walk(methods["setup"]) if isinstance(a, ast.Assign)
        for t in a.targets if ast.unparse(t) == "self.logic"
    }  # fmt: skip


@pytest.mark.parametrize("tag", SUPPORTED)
def test_ui_widgets_exist_in_slicer(ui, tag):
    classes = {w.get("class") for w in ui.iter("widget")}
    known = set(VERSIONS[tag]["ui_widget_classes_in_slicer_ui_files"])
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
    unbound = ast.literal_eval(
        next(
            n.value for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "UNBOUND_FIELDS" for t in n.targets)
        )
    )  # fmt: skip
    assert set(bound) == set(fields) - set(unbound) and set(unbound) <= set(fields)
    for name, widget in bound.items():
        ann = ast.unparse(fields[name])
        if "Choice(" in ann:  # combo items are exactly the allowed values
            choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", ann).group(1))
            items = [i.find("property/string").text for i in widget.findall("item")]
            assert widget.get("class") == "QComboBox" and items == choices, name
        if ann == "Path":
            assert widget.get("class") in ("ctkPathLineEdit", "ctkDirectoryButton"), name  # Path connectors
        if ann == "str":
            assert widget.get("class") == "QLineEdit", name  # QLineEditToStrConnector
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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_cmake_follows_the_templates():
    """Read against Slicer v5.10.0's and v5.12.3's Utilities/Templates/Extensions/Default/CMakeLists.txt
    and Modules/Scripted/CMakeLists.txt (cmake cannot find Slicer here, so the structure is checked)."""
    top = (ROOT / "CMakeLists.txt").read_text()
    low, high = re.search(r"cmake_minimum_required\(VERSION ([\d.]+)\.\.\.([\d.]+) FATAL_ERROR\)", top).groups()
    for tag, ref in VERSIONS.items():  # the oldest CMake each template accepts is accepted here too
        t_low, t_high = ref["extension_template_cmake_minimum_required"].split("...")
        assert _version(low) <= _version(t_low), tag
        assert _version(high) >= _version(t_high), tag
    for needed in (
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
    # the icon and screenshots are files of this repository (raw URLs of its main branch)
    home = re.search(r'set\(EXTENSION_HOMEPAGE "https://github.com/([^"]+)"\)', top).group(1)
    for var in ("ICONURL", "SCREENSHOTURLS"):
        for url in re.search(rf'set\(EXTENSION_{var} "([^"]+)"\)', top).group(1).split():
            prefix = f"https://raw.githubusercontent.com/{home}/main/"
            assert url.startswith(prefix), url
            assert (ROOT / url[len(prefix) :]).is_file(), url
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


def test_spin_box_decimals_match_the_override_comparison(ui):
    """A value read back from a spin box is rounded to its decimals: the override comparison
    (``slicer_bridge.changed_settings``) compares at the same precision."""
    from AnomalyDiffusionLib.slicer_bridge import DISPLAY_DECIMALS

    boxes = {w.get("name"): w for w in ui.iter("widget")}
    for name, key in (("guidanceSpinBox", "w"), ("thresholdSpinBox", "dode_threshold")):
        decimals = boxes[name].find("property[@name='decimals']/number").text
        assert int(decimals) == DISPLAY_DECIMALS[key], name


def test_spin_box_ranges_lie_inside_the_options_schema(ui):
    """Every value the panel's spin boxes can hold is one the options schema
    (``AnomalyDiffusionLib.options``) accepts: the panel cannot start a run the CLI refuses."""
    from AnomalyDiffusionLib.options import DetectOptions, specs

    boxes = {w.get("name"): w for w in ui.iter("widget")}
    for name, key in (("guidanceSpinBox", "w"), ("strideSpinBox", "stride"), ("thresholdSpinBox", "dode_threshold")):
        box = boxes[name]
        values = []
        for bound, default in (("minimum", 0), ("maximum", 99)):  # Qt's defaults when the .ui leaves one out
            prop = box.find(f"property[@name='{bound}']/*")
            values.append(float(prop.text) if prop is not None else default)
        spec = specs()[key]
        assert spec.minimum is None or values[0] >= spec.minimum, name
        assert spec.maximum is None or values[1] <= spec.maximum, name
        for v in values:
            DetectOptions(**{key: int(v) if spec.kind == "int" else v})  # accepted, no InputError
