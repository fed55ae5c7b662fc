"""training/screen_rules.py reads choose_volume_z.py's ranked table back into rules: every rule of the
grid must come back as itself, or the screen would test another rule than the one it reports."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import choose_volume_z
import screen_rules


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
