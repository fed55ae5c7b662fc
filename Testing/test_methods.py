"""The method interface (issue 17 item 1): the pipeline holds no method's maths, so a third method is
one class and one registry entry, and its masks reach the labelmap, the table and the summary.

The toy third method is the FLAIR-threshold reference of the shift benchmark in its simplest form
(brain pixels whose FLAIR is above a fixed normalised level): its expected labelmap is computed here
from the case itself, independently of the pipeline.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_tiny_bundle

from AnomalyDiffusionLib import methods
from AnomalyDiffusionLib.bundle import BundleError, open_bundle
from AnomalyDiffusionLib.errors import InputError
from AnomalyDiffusionLib.method import MethodResult, SliceInputs
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject, write_case
from AnomalyDiffusionLib.pipeline import DetectOptions, detect

LEVEL = 0.5  #: the toy method's FLAIR level in the model's [-1, 1] intensity range


class FlairLevel:
    """A toy method: mask = FLAIR above LEVEL (model space), score = masked pixel count."""

    name: ClassVar[str] = "toy"
    title: ClassVar[str] = "FLAIR level"

    def validate(self, m: dict) -> None:
        if not isinstance(m["toy"].get("level"), float):
            raise BundleError("manifest: toy.level must be a number")

    def run(self, inp: SliceInputs, earlier: Mapping[str, MethodResult]) -> MethodResult:
        flair = inp.images[:, inp.bundle.modalities.index("flair")]
        masks = flair > inp.bundle.manifest["toy"]["level"]
        area = masks.reshape(len(masks), -1).sum(1)
        return MethodResult(
            name=self.name,
            columns=[{"toy_pixels": int(a)} for a in area],
            scores=area.astype(float),
            flags=area > 0,
            maps=flair.astype(np.float32),
            masks=masks,
            summary={"level": LEVEL},
            reliability={"messages": ["toy: a message"]},
            shortcuts=["toy shortcut"],
        )

    def localise(self, inp: SliceInputs, result: MethodResult) -> np.ndarray | None:
        return result.maps


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ph = make_subject(5, PhantomOptions(spacing=3.0, n_lesions=1, modalities=("flair", "t2")))
    return write_case(ph, tmp_path_factory.mktemp("case"), "c")


@pytest.fixture
def toy_bundle(tmp_path):
    src = make_tiny_bundle(tmp_path / "tiny", methods=("fpdm",))
    out = tmp_path / "toy"
    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    m["methods"] = ["fpdm", "toy"]
    m["toy"] = {"level": LEVEL}
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_a_third_method_is_one_registry_entry(monkeypatch, toy_bundle, case):
    monkeypatch.setitem(methods.REGISTRY, "toy", FlairLevel())
    res = detect(
        {"flair": case["flair"], "t2": case["t2"]},
        bundle=toy_bundle,
        options=DetectOptions(methods=("toy",), device="cpu"),
    )
    # the truth, from the case itself: the FLAIR of each analysed slice at model size, above LEVEL
    flair = res.model_images[:, 0]
    want = (flair > LEVEL).reshape(len(flair), -1).sum(1)
    assert [r["toy_pixels"] for r in res.rows] == want.tolist()
    assert np.array_equal(res.model_masks, flair > LEVEL)
    lab = sitk.GetArrayFromImage(res.labelmap)
    assert lab.any() and res.summary["verdict"] == "anomalous"
    assert res.summary["methods"] == ["toy"] and res.summary["method_details"]["toy"] == {"level": LEVEL}
    assert "toy shortcut" in res.summary["shortcuts"]
    assert res.summary["reliability"]["toy"] == {"messages": ["toy: a message"]}
    assert res.summary["reliability"]["messages"] == ["toy: a message"]
    assert res.summary["reliability"]["fpdm"] is None  # in the registry, not run


def test_a_method_section_is_checked_by_its_method(monkeypatch, toy_bundle):
    m = json.loads((toy_bundle / "manifest.json").read_text())
    m["toy"]["level"] = "high"
    (toy_bundle / "manifest.json").write_text(json.dumps(m))
    b = open_bundle(toy_bundle)  # the container is fine; the bundle module knows no method
    methods.validate_bundle(b)  # a method this library does not know is not checked ...
    monkeypatch.setitem(methods.REGISTRY, "toy", FlairLevel())
    with pytest.raises(BundleError, match=r"toy\.level"):  # ... one it knows is
        methods.open_checked(toy_bundle)


def test_an_unknown_method_is_refused_by_name_only_when_asked_for(toy_bundle, case):
    b = methods.open_checked(toy_bundle)  # opens: the fpdm section is valid, toy is unknown here
    with pytest.raises(InputError, match="unknown method 'toy'"):
        detect({"flair": case["flair"], "t2": case["t2"]}, bundle=b, options=DetectOptions(methods=("toy",)))
    with pytest.raises(InputError, match="has no dode model"):
        detect({"flair": case["flair"], "t2": case["t2"]}, bundle=b, options=DetectOptions(methods=("dode",)))


def test_run_order_is_the_registry_order():
    assert methods.run_order(["fpdm", "dode"]) == ("dode", "fpdm")  # the gate reads AnoDODE's flags
    with pytest.raises(InputError, match="unknown method"):
        methods.run_order(["fpdm", "nope"])
