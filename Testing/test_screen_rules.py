"""training/screen_rules.py reads choose_volume_z.py's ranked table back into rules: every rule of the
grid must come back as itself, or the screen would test another rule than the one it reports."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import choose_volume_z
import screen_rules
from conftest import make_tiny_bundle


def test_every_rule_of_the_grid_comes_back_from_the_choice_table():
    rules = choose_volume_z.RULES
    keys = [choose_volume_z.rule_key(*r) for r in rules]
    assert len(set(keys)) == len(keys)  # the grid's keys name one rule each
    # two development cases: a lesion case whose DICE ranks the rules, and an empty healthy one
    lesion = {"healthy": False, "z": {}}
    healthy = {"healthy": True, "z": {}}
    for i, key in enumerate(keys):
        lesion["z"][key] = {"dice": i / len(keys), "volume_ml": 1.0, "false_positive_ml": 0.0}
        healthy["z"][key] = {"dice": 1.0, "volume_ml": 0.0, "false_positive_ml": 0.0}
    choice = choose_volume_z.choose([lesion, healthy], healthy_ml=2.0)
    assert choice["key"] == keys[-1]  # the best mean case score
    assert len(choice["table"]) == len(rules)
    for row in choice["table"]:
        rule = screen_rules.table_rule(row)
        assert rule in rules
        assert choose_volume_z.rule_key(*rule) == row["key"]


def test_a_rule_is_decided_as_detect_decides_it_with_that_rule_as_the_bundles(tmp_path):
    """``choose_volume_z.rule_masks`` re-decides rules from one forward process; for the bundle's own
    rule it must give detect's segmentation voxel for voxel, including the refinement on the
    bias-corrected FLAIR (a bundle that corrects with N4): else development scores and the robustness
    screen would describe another pipeline than the one that ships."""
    import subprocess

    import numpy as np
    import SimpleITK as sitk

    from AnomalyDiffusionLib.bundle import open_bundle
    from AnomalyDiffusionLib.options import DetectOptions
    from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject
    from AnomalyDiffusionLib.pipeline import detect

    tiny = make_tiny_bundle(tmp_path / "tiny", methods=("fpdm",))
    out = tmp_path / "rule"
    script = Path(__file__).resolve().parents[1] / "training" / "make_bundle.py"
    argv = [sys.executable, str(script), "--from", str(tiny), "--calibration", "volume", "--volume-z", "1"]
    argv += ["--volume-components", "seeded", "--refine-flair", "0.5", "6", "--bias-correction", "n4"]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bundle = open_bundle(out)
    rule = (1.0, None, None, None, None, (0.5, 6.0, None), "seeded")
    ph = make_subject(11, PhantomOptions(spacing=2.0, n_lesions=1, modalities=("flair", "t2")))
    res = detect(ph.images, bundle, DetectOptions(device="cpu", methods=("fpdm",), slice_range=(26, 34)))
    assert res.summary["bias_correction"]["method"] == "n4" and res.summary["refinement"]["method"] == "flair"
    expected = res.case.reorientation.to_canonical(sitk.GetArrayFromImage(res.labelmap)) > 0
    assert expected.any()  # a rule that segments something, or the comparison says nothing
    fwd, cal = res.extras["fpdm_forward"], res.extras["fpdm_calibration"]
    flair = res.model_images[:, bundle.modalities.index("flair")]
    [(got_rule, mask, _, flagged)] = choose_volume_z.rule_masks(
        fwd, cal, flair, res.case, res.indices, res.fit, res.refinement_flair_z(), [rule]
    )
    assert got_rule == rule
    np.testing.assert_array_equal(mask, expected)
    assert flagged == sorted(r["slice"] for r in res.rows if r["fpdm_unhealthy_volume"])


def test_one_rule_is_scored_by_hand_and_the_only_report_rule_flag_is_checked(tmp_path):
    """A lesion case (DICE 0.6) and a healthy case with 0.5 mL segmented: the rule's development score is
    (0.6 + (1 - 0.5 / 2)) / 2 = 0.675, and ``choose`` over that rule alone ranks nothing else.
    ``--only-report-rule`` needs a ``--report-rule`` that is a rule of the grid (refused before any
    forward pass)."""
    rule = choose_volume_z.RULES[-1]
    key = choose_volume_z.rule_key(*rule)
    lesion = {"healthy": False, "z": {key: {"dice": 0.6, "volume_ml": 9.0, "false_positive_ml": 1.0}}}
    healthy = {"healthy": True, "z": {key: {"dice": 1.0, "volume_ml": 0.5, "false_positive_ml": 0.5}}}
    choice = choose_volume_z.choose([lesion, healthy], healthy_ml=2.0, rules=(rule,))
    assert choice["key"] == key and len(choice["table"]) == 1
    assert abs(choice["score"] - 0.675) < 1e-9 and choice["table"][0]["max_healthy_ml"] == 0.5
    out = tmp_path / "dev"
    assert choose_volume_z.main(["--only-report-rule", "--out", str(out)]) == 2
    assert choose_volume_z.main(["--only-report-rule", "--report-rule", "1|2|3", "--out", str(out)]) == 2
    assert not any(out.glob("*.json"))
