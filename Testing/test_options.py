"""The one options schema (issue 17 item 4): every bad value refused with one line, wherever it comes
from (CLI ``detect`` / ``batch``, the library, the Slicer bridge); the CLI, the bridge and
``summary.json`` derived from it; global options after the command name."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from AnomalyDiffusionLib import cli
from AnomalyDiffusionLib.errors import InputError
from AnomalyDiffusionLib.options import DetectOptions, from_namespace, specs
from AnomalyDiffusionLib.slicer_bridge import BatchRequest, DetectRequest, batch_command, detect_command

#: (flag, value, the exact message after "error: ") for the values issue 17 names and their kin
REFUSED = [
    ("--w", "nan", "--w must be a finite number from 0 to 100, not nan"),
    ("--w", "inf", "--w must be a finite number from 0 to 100, not inf"),
    ("--w", "-1", "--w must be a finite number from 0 to 100, not -1.0"),
    ("--w", "two", "--w must be a number from 0 to 100, not 'two'"),
    ("--stride", "0", "--stride must be an integer from 1 to 1000, not 0"),
    ("--stride", "2.5", "--stride must be an integer from 1 to 1000, not '2.5'"),
    ("--steps", "5000", "--steps must be an integer from 1 to 1000, not 5000"),
    ("--dode-tol", "-1", "--dode-tol must be a finite number above 0 and at most 0.1, not -1.0"),
    ("--dode-tol", "0", "--dode-tol must be a finite number above 0 and at most 0.1, not 0.0"),
    ("--cos-threshold", "2", "--cos-threshold must be a finite number from -1 to 1, not 2.0"),
    ("--cos-threshold", "nan", "--cos-threshold must be a finite number from -1 to 1, not nan"),
    ("--dode-threshold", "nan", "--dode-threshold must be a finite number, not nan"),
    ("--dode-probes", "0", "--dode-probes must be an integer from 1 to 1024, not 0"),
    ("--dode-scales", "0,128", "--dode-scales must be an integer from 1 to 4096, not 0"),
    ("--dode-scales", "128,128", "--dode-scales must list distinct integers from 1 to 4096, not (128, 128)"),
    ("--seed", "-1", "--seed must be an integer from 0 to 2147483647, not -1"),
    ("--batch-size", "0", "--batch-size must be an integer from 1 to 4096, not 0"),
    ("--slices", "30:10", "--slices must be START:STOP with 0 ≤ START < STOP (either may be left out), not (30, 10)"),
    ("--slices", "a:b", "--slices must be START:STOP with integers, not 'a:b'"),
    ("--methods", "Magic!", "--methods takes distinct method names such as fpdm, dode or fpdm,dode; got ('Magic!',)"),
    (
        "--methods",
        "fpdm,fpdm",
        "--methods takes distinct method names such as fpdm, dode or fpdm,dode; got ('fpdm', 'fpdm')",
    ),
    ("--device", "gpu", "--device must be auto, cpu, cuda or cuda:N, not 'gpu'"),
    ("--gap", "leap", "--gap must be jump or extrapolate, not 'leap'"),
    ("--mode", "ddxm", "--mode must be ddim or ddpm, not 'ddxm'"),
    ("--gate", "all", "--gate must be none or dode, not 'all'"),
    ("--calibration", "slice", "--calibration must be bundle or volume, not 'slice'"),
]


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code)


@pytest.mark.parametrize("command", ["detect", "batch"])
def test_bad_values_are_refused_with_one_line_before_anything_runs(command, tmp_path, capsys):
    out = tmp_path / "out"
    head = ["--flair", "f.nii.gz", "--t2", "t.nii.gz"] if command == "detect" else ["--input", "cases"]
    for flag, value, message in REFUSED:
        code = _main(["--progress", "none", command, *head, "--out", str(out), f"{flag}={value}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (flag, value)
        assert err == [f"error: {message}"], (flag, value)
        assert not out.exists()


def test_library_refuses_the_same_values():
    for kw in ({"w": math.nan}, {"stride": 0}, {"steps": 5000}, {"dode_rtol": -1.0}, {"cos_threshold": 2.0}):
        with pytest.raises(InputError, match=r"^--"):
            DetectOptions(**kw)
    with pytest.raises(InputError, match="--w must be a finite number"):
        DetectOptions(w=True)  # a bool is not a number
    with pytest.raises(InputError, match="--stride"):
        dataclasses.replace(DetectOptions(), stride=-3)  # replace() checks too
    o = DetectOptions(methods=["fpdm"], w=2, dode_scales=[128, 192], steps=600.0)
    assert o.methods == ("fpdm",) and o.w == 2.0 and isinstance(o.w, float)
    assert o.dode_scales == (128, 192) and o.steps == 600 and isinstance(o.steps, int)


def test_usage_errors_are_one_line_too(capsys):
    assert _main(["detect", "--flair", "f"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: anomaly-diffusion detect: ") and "--t2" in err[0]
    assert _main(["--progress", "loud", "info"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_global_options_after_the_command_name():
    parser = cli.build_parser()
    base = ["--flair", "f", "--t2", "t", "--out", "o"]
    args = parser.parse_args(["detect", *base, "--progress", "none", "-v"])
    assert args.progress == "none" and args.verbose is True
    args = parser.parse_args(["--progress", "jsonl", "detect", *base])
    assert args.progress == "jsonl" and args.verbose is False
    args = parser.parse_args(["batch", "--input", "i", "--out", "o"])
    assert args.progress == "bar" and args.verbose is False
    assert parser.parse_args(["info", "--progress", "none"]).progress == "none"


def test_every_option_round_trips_through_the_command_line():
    """Options with every field away from its default → ``to_argv`` → the ``detect`` parser → the
    same options: the CLI and the Slicer bridge's command lines come from the one definition."""
    full = DetectOptions(
        methods=("dode",), device="cuda:1", w=3.5, steps=500, stride=7, gap="extrapolate", mode="ddpm",
        early_stop=False, gate="dode", calibration="volume", intensity="landmarks", bias_correction="n4", bias_levels=4,
        refine="flair", cos_threshold=-0.25,
        dode_threshold=1.46, dode_scales=(128, 192), dode_rtol=1e-4, dode_probes=8, faithful=True,
        slice_range=(None, 40), seed=7, batch_size=16,
    )  # fmt: skip
    assert all(getattr(full, n) != f.default for n, f in DetectOptions.__dataclass_fields__.items())
    argv = full.to_argv()
    assert len([a for a in argv if a.startswith("--")]) == len(specs())
    args = cli.build_parser().parse_args(["detect", "--flair", "f", "--t2", "t", "--out", "o", *argv])
    assert from_namespace(args) == full
    assert DetectOptions().to_argv() == []
    summary = full.as_summary()
    assert list(summary) == list(specs()) and json.loads(json.dumps(summary)) == summary
    assert summary["slice_range"] == [None, 40] and summary["calibration"] == "volume"


def test_help_comes_from_the_schema():
    text = cli.build_parser()._subparsers._group_actions[0].choices["batch"].format_help()
    for spec in specs().values():
        assert spec.flag in text
    assert "--calibration {bundle,volume}" in text and "--shard I/N" in text


def test_slicer_bridge_commands_derive_from_the_schema():
    req = DetectRequest(
        inputs={"flair": "/d/f.nrrd", "t2": "/d/t2.nrrd"}, out_dir="/o", device="cpu",
        options={"seed": 3, "calibration": "volume"},
    )  # fmt: skip
    cmd = detect_command(req, python="py")
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd[cmd.index("--calibration") + 1] == "volume"
    assert "--methods" not in cmd and cmd[cmd.index("--device") + 1] == "cpu"  # the bundle's default methods
    both = detect_command(dataclasses.replace(req, methods=("fpdm", "dode")), python="py")
    assert both[both.index("--methods") + 1] == "fpdm,dode"
    with pytest.raises(ValueError, match=r"^--w must be a finite number"):
        detect_command(dataclasses.replace(req, w=math.nan))
    with pytest.raises(ValueError, match="unknown detect option"):
        detect_command(dataclasses.replace(req, options={"strides": 3}))
    breq = BatchRequest(input="/data/brats", out_dir="/o", options={"device": "cpu", "stride": 60}, shard=(1, 4))
    assert batch_command(breq, python="py") == [
        "py", "-m", "AnomalyDiffusionLib.cli", "--progress", "jsonl", "batch", "--input", "/data/brats",
        "--out", "/o", "--shard", "1/4", "--device", "cpu", "--stride", "60",
    ]  # fmt: skip
