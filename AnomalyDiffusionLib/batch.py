"""Many cases through :func:`~AnomalyDiffusionLib.pipeline.detect`: ``anomaly-diffusion batch``.

* **Cases** (:func:`find_cases`): a folder in BraTS layout, one sub-folder per case named by its id
  (2021 names ``<id>_flair, _t2, _t1, _t1ce, _seg``; 2023 names ``<id>-t2f, -t2w, -t1n, -t1c, -seg``),
  or a CSV with columns ``id,flair,t2[,t1,t1ce,truth]`` (relative paths are relative to the CSV).
* **Outputs**: ``OUT/<id>/`` holds exactly what ``detect`` writes (the same
  :func:`~AnomalyDiffusionLib.outputs.write_result`), written into ``OUT/.partial-<id>`` and renamed
  into place; ``OUT/_batch/<id>.json`` records each case's status, error, figures, time and the
  bundle and settings it was made with. :func:`merge` turns the records into ``OUT/cases.csv`` (one row
  per case) and ``OUT/summary.json`` (counts, mean/sd/median of the figures, settings, bundle).
* **Failures**: a case that cannot be read or run is recorded ``failed`` with its one-line error and
  the batch goes on. **Resume**: a case whose record says ``ok`` with the same bundle (sha256) and
  settings and whose outputs are all present is not run again (``force`` redoes it); a case killed
  mid-way leaves at most a hidden ``.partial-<id>`` or ``.old-<id>`` folder, removed by the next run
  that reaches the case.
* **Truth masks** (``seg`` / ``truth``): DICE, lesion-slice sensitivity and false-positive volume of
  the segmentation, by :func:`~AnomalyDiffusionLib.metrics.volume_level`.
* **Scale-out**: :func:`select_shard` takes every N-th case from I (``--shard I/N``, Slurm arrays);
  under ``torchrun`` each rank takes the shard of its ``RANK`` of ``WORLD_SIZE`` and
  :func:`distributed_env` tells the CLI so.

The bundle is opened (read and verified) once per process and passed to every ``detect`` call.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AnomalyDiffusionError, Cancelled, InputError
from .options import DetectOptions
from .progress import CancelToken, ProgressCallback, report
from .volumes import volume_suffix

log = logging.getLogger(__name__)

CASES_CSV = "cases.csv"
SUMMARY_JSON = "summary.json"
#: per-case records: ``OUT/_batch/<id>.json``
RECORDS = "_batch"
#: ``cases.csv`` columns, in order
CASE_COLUMNS = (
    "id",
    "status",
    "error",
    "verdict",
    "lesion_volume_ml",
    "lesion_slice_first",
    "lesion_slice_last",
    "most_anomalous_slice",
    "time_s",
    "dice",
    "lesion_slice_sensitivity",
    "false_positive_ml",
    "truth_volume_ml",
)
#: figures ``summary.json`` aggregates over the ``ok`` cases
AGGREGATED = ("lesion_volume_ml", "time_s", "dice", "lesion_slice_sensitivity", "false_positive_ml")
#: BraTS file-name endings (before the extension) → role; 2021 and 2023 names
BRATS_NAMES = {
    "_flair": "flair",
    "_t2": "t2",
    "_t1": "t1",
    "_t1ce": "t1ce",
    "_seg": "truth",
    "-t2f": "flair",
    "-t2w": "t2",
    "-t1n": "t1",
    "-t1c": "t1ce",
    "-seg": "truth",
}
CSV_COLUMNS = ("id", "flair", "t2", "t1", "t1ce", "truth")
#: names a case id may not take (they are batch files in ``OUT``)
RESERVED = {CASES_CSV, SUMMARY_JSON, RECORDS}


@dataclass(frozen=True)
class BatchCase:
    """One case: ``inputs`` modality → path (flair, t2 [, t1, t1ce]); ``problem``: why it cannot run
    (recorded as its error) when the folder or CSV row is incomplete."""

    id: str
    inputs: dict[str, str] = field(default_factory=dict)
    truth: str | None = None
    problem: str | None = None


# ------------------------------------------------------------------------------------- cases
def _check_id(case_id: str, where: str) -> str:
    if (
        not case_id
        or case_id in RESERVED
        or case_id.startswith(".")
        or any(c in case_id for c in "/\\\0")
        or case_id.strip() != case_id
    ):
        raise InputError(f"case id {case_id!r} in {where} cannot be a folder name in the output folder")
    return case_id


def find_cases(source: str | os.PathLike) -> list[BatchCase]:
    """The cases of a BraTS-layout folder (sorted by id) or of a CSV (in its row order)."""
    path = Path(source)
    if path.is_dir():
        return _folder_cases(path)
    if path.is_file():
        return _csv_cases(path)
    raise InputError(f"batch input not found: '{path}' (a BraTS-layout folder or a CSV)")


def _folder_cases(root: Path) -> list[BatchCase]:
    cases = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        found: dict[str, list[Path]] = {}
        for f in sorted(sub.iterdir()):
            suffix = volume_suffix(f)
            if not suffix or not f.is_file():
                continue
            stem = f.name[: -len(suffix)].lower()
            role = next((r for end, r in BRATS_NAMES.items() if stem.endswith(end)), None)
            if role is not None:
                found.setdefault(role, []).append(f)
        if not found:
            continue  # not a case folder (no BraTS-named volume in it)
        case_id = _check_id(sub.name, f"folder '{root}'")
        problems = [f"{len(v)} {k.upper()} files in '{sub}'" for k, v in found.items() if len(v) > 1]
        problems += [f"no {m.upper()} file in '{sub}'" for m in ("flair", "t2") if m not in found]
        inputs = {k: str(v[0]) for k, v in found.items() if k != "truth"}
        truth = str(found["truth"][0]) if "truth" in found else None
        cases.append(BatchCase(case_id, inputs, truth, "; ".join(problems) or None))
    if not cases:
        raise InputError(f"no case folders with BraTS-named volumes (e.g. <id>_flair.nii.gz) in '{root}'")
    return cases


def _csv_cases(path: Path) -> list[BatchCase]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the cases CSV '{path}' ({exc})") from None
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown or not {"id", "flair", "t2"} <= set(header):
        raise InputError(f"the cases CSV '{path}' has columns {','.join(header)}; expected id,flair,t2[,t1,t1ce,truth]")
    cases, seen = [], set()
    for n, row in enumerate(rows, start=2):
        case_id = _check_id(row["id"], f"'{path}' line {n}")
        if case_id in seen:
            raise InputError(f"case id '{case_id}' appears twice in '{path}'")
        seen.add(case_id)

        def resolve(text: str) -> str:
            p = Path(text).expanduser()
            return str(p if p.is_absolute() else path.parent / p)

        inputs = {k: resolve(row[k]) for k in ("flair", "t2", "t1", "t1ce") if row.get(k)}
        missing = [m.upper() for m in ("flair", "t2") if not row.get(m)]
        problem = f"no {' or '.join(missing)} file given in '{path}' line {n}" if missing else None
        cases.append(BatchCase(case_id, inputs, resolve(row["truth"]) if row.get("truth") else None, problem))
    if not cases:
        raise InputError(f"the cases CSV '{path}' lists no case")
    return cases


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` → (I, N) with 0 ≤ I < N."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must be I/N (e.g. 0/4), not '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard I/N needs 0 ≤ I < N, not '{text}'")
    return i, n


def select_shard(cases: Sequence[BatchCase], index: int, count: int) -> list[BatchCase]:
    """Every ``count``-th case starting at ``index``: shards 0..count-1 together hold each case once."""
    return list(cases[index::count])


def distributed_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` when started by torchrun with more than one process, else None."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"]))
    except (KeyError, ValueError):
        raise InputError("torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers") from None


# ------------------------------------------------------------------------------------ running
def fingerprint(bundle, options: DetectOptions, fmt: str | None, overview: bool) -> dict:
    """What makes a case's outputs what they are: the bundle's sha256 and every option but the device
    (torchrun ranks each take their own GPU), the output format and whether overview.png is written."""
    settings = options.as_summary()
    settings.pop("device")
    return {"bundle_sha256": bundle.sha256, "options": settings, "format": fmt, "overview": bool(overview)}


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_record(out: Path, case_id: str) -> dict | None:
    """The record of case ``case_id`` in batch folder ``out``, or None."""
    try:
        return json.loads((out / RECORDS / f"{case_id}.json").read_text())
    except (OSError, ValueError):
        return None


def up_to_date(out: Path, case: BatchCase, fp: dict) -> bool:
    """Whether ``case`` finished ``ok`` with the same bundle and settings and all its outputs exist."""
    from .outputs import outputs_complete

    rec = read_record(out, case.id)
    return bool(rec and rec.get("status") == "ok" and rec.get("fingerprint") == fp and outputs_complete(out / case.id))


def _clean(value):
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    return value


def _evaluate(result, truth_path: str) -> dict:
    """The segmentation of ``result`` against the truth mask file (any label > 0 is lesion)."""
    import numpy as np
    import SimpleITK as sitk

    from .metrics import volume_level
    from .volumes import read_labelmap_like

    case = result.case
    truth = read_labelmap_like(truth_path, case, "truth mask") > 0
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    if result.labelmap is None:
        return {"truth_volume_ml": float(truth.sum()) * voxel_ml}
    pred = case.reorientation.to_canonical(sitk.GetArrayFromImage(result.labelmap)) > 0
    return volume_level(pred, truth, voxel_ml)


class _CaseProgress:
    """Per-case stages folded into one ``batch`` stage: (cases done + this case's share) / total."""

    def __init__(self, progress: ProgressCallback | None, done: int, total: int, case_id: str) -> None:
        from .slicer_bridge import STAGE_WEIGHTS

        self.progress, self.done, self.total, self.case_id = progress, done, total, case_id
        self.weights = STAGE_WEIGHTS
        self.within = 0.0

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if stage in self.weights:
            start = 0.0
            for name, w in self.weights.items():
                if name == stage:
                    break
                start += w
            share = (start + self.weights[stage] * fraction) / sum(self.weights.values())
            self.within = max(self.within, min(share, 1.0))
        text = f"case {self.done + 1}/{self.total} {self.case_id}: {stage}" + (f" {message}" if message else "")
        report(self.progress, "batch", (self.done + self.within) / self.total, text)


def run_case(
    case: BatchCase,
    out: Path,
    bundle,
    options: DetectOptions,
    fp: dict,
    fmt: str | None = None,
    overview: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict:
    """Run ``detect`` on one case into ``out/<id>/`` (atomically) and write its record; returns it.
    Failures become a ``failed`` record with the one-line error (and no ``out/<id>/``);
    :class:`Cancelled` propagates and leaves the case as it was before."""
    from .outputs import replace_folder, write_result
    from .pipeline import detect

    tmp, dest = out / f".partial-{case.id}", out / case.id
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    record: dict = {"id": case.id}
    try:
        if case.problem:
            raise InputError(case.problem)
        result = detect(case.inputs, bundle=bundle, options=options, progress=progress, cancel=cancel)
        evaluation = _evaluate(result, case.truth) if case.truth else {}
        write_result(result, tmp, fmt=fmt, overview=overview, options=options)
        replace_folder(tmp, dest)
        s = result.summary
        lesion = s.get("lesion_slices") or [None, None]
        record.update(
            status="ok",
            error="",
            verdict=s["verdict"],
            lesion_volume_ml=s.get("lesion_volume_ml"),
            lesion_slice_first=lesion[0],
            lesion_slice_last=lesion[1],
            most_anomalous_slice=(s.get("most_anomalous_slice") or {}).get("slice"),
            warnings=list(s.get("warnings") or []),
            **{k: _clean(v) for k, v in evaluation.items()},
        )
    except Cancelled:
        raise
    except AnomalyDiffusionError as exc:
        record.update(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except Exception as exc:  # a case must not stop the batch: record what happened, log the traceback
        log.exception("case %s failed", case.id)
        record.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if record["status"] == "failed" and dest.exists():
        shutil.rmtree(dest)  # outputs of an earlier run with other settings would contradict the record
    record["time_s"] = round(time.perf_counter() - t0, 2)
    record["fingerprint"] = fp
    _write_json(out / RECORDS / f"{case.id}.json", record)
    return record


def run_cases(
    cases: Sequence[BatchCase],
    out: str | os.PathLike,
    bundle,
    options: DetectOptions,
    fp: dict,
    fmt: str | None = None,
    overview: bool = True,
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_case: Callable[[int, int, dict, bool], None] | None = None,
) -> list[dict]:
    """Run every case not already up to date (all when ``force``); returns their records in order.
    ``on_case(i, total, record, skipped)`` is called after each (for a progress line)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, case in enumerate(cases):
        if cancel is not None:
            cancel.check()
        for leftover in (f".partial-{case.id}", f".old-{case.id}"):  # from a process killed mid-case
            shutil.rmtree(out / leftover, ignore_errors=True)
        skipped = not force and up_to_date(out, case, fp)
        if skipped:
            rec = read_record(out, case.id) or {}
            log.info("case %s is up to date (same bundle and settings); not run again", case.id)
        else:
            step = _CaseProgress(progress, i, len(cases), case.id)
            rec = run_case(case, out, bundle, options, fp, fmt, overview, step, cancel)
            log.info("case %s: %s %s", case.id, rec["status"], rec.get("error", ""))
        report(progress, "batch", (i + 1) / len(cases), f"{i + 1}/{len(cases)} cases done")
        records.append(rec)
        if on_case is not None:
            on_case(i, len(cases), rec, skipped)
    return records


# ------------------------------------------------------------------------------------ merging
def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "sd": None, "median": None}
    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), 6),
        "sd": round(statistics.stdev(values), 6) if len(values) > 1 else None,
        "median": round(statistics.median(values), 6),
    }


def merge(
    cases: Sequence[BatchCase],
    out: str | os.PathLike,
    bundle,
    options: DetectOptions,
    fp: dict,
    source: str | os.PathLike,
) -> dict:
    """Write ``out/cases.csv`` and ``out/summary.json`` from the case records of every case (whichever
    process made them); returns the aggregate. A case with no record, or one made with another
    bundle or other settings, is ``skipped``."""
    from .outputs import outputs_complete

    out = Path(out)
    rows = []
    for case in cases:
        rec = read_record(out, case.id)
        row: dict[str, Any]
        if rec is None:
            row = {"id": case.id, "status": "skipped", "error": "not run yet"}
        elif rec.get("fingerprint") != fp:
            row = {"id": case.id, "status": "skipped", "error": "made with another bundle or other settings"}
        elif rec.get("status") == "ok" and outputs_complete(out / case.id) is None:
            row = {"id": case.id, "status": "skipped", "error": f"outputs in '{out / case.id}' are incomplete"}
        else:
            row = {k: rec.get(k) for k in CASE_COLUMNS}
        rows.append(row)
    tmp = out / f".{CASES_CSV}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CASE_COLUMNS, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, out / CASES_CSV)
    counts = Counter(r["status"] for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    aggregate = {
        "input": str(source),
        "cases": len(rows),
        "ok": counts.get("ok", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
        "failed_cases": {r["id"]: r["error"] for r in rows if r["status"] == "failed"},
        "verdicts": dict(sorted(Counter(r["verdict"] for r in ok).items())),
        "statistics": {k: _stats([float(r[k]) for r in ok if r.get(k) is not None]) for k in AGGREGATED},
        "settings": {**options.as_summary(), "format": fp["format"], "overview": fp["overview"]},
        "bundle": {"name": bundle.name, "sha256": bundle.sha256, "source": str(bundle.source)},
        "files": {"cases": CASES_CSV, "records": f"{RECORDS}/<id>.json", "outputs": "<id>/"},
        "version": __version__,
    }
    _write_json(out / SUMMARY_JSON, aggregate)
    return aggregate
