"""One evaluation from request to run folder: images, predictions, units, the reference
standard, operating points, metrics, and what is written (:mod:`.writeup`)."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.evaluate import analysis, labels, points, units
from inference.evaluate.analysis import SCHEMA, Scorer, Truth
from inference.evaluate.cache import PredictionCache
from inference.evaluate.images import (
    InputError,
    Item,
    Skipped,
    digest,
    from_archive,
    from_folder,
)
from inference.evaluate.runner import ModelRef, Runner, Throughput
from inference.evaluate.units import HEADER_SUBGROUPS, Unit, UnitKind
from pacs.archive import Archive

Progress = Callable[[str, int], Callable[[int], None]]  # (what, total) -> advance


class EvaluationError(ValueError):
    """The evaluation cannot be run as asked; the message says why."""


@dataclass
class Request:
    labels: Path
    out: Path
    models: list[ModelRef] = field(default_factory=list)
    predictions: list[Path] = field(default_factory=list)
    folder: Path | None = None
    query: str | None = None
    archive: Archive | None = None
    key: str | None = None
    unit: UnitKind = "image"
    thresholds: Path | None = None
    derive: str | None = None
    validation: Path | None = None
    seed: int = 0
    resamples: int = 2000
    batch: int = 8
    workers: int = 0
    cluster: str | None = None
    cache: Path = Path("evaluation-cache.sqlite")
    viewer: str | None = None
    max_pixels: int = 0


@dataclass
class Result:
    metrics: dict[str, Any]
    scorers: list[Scorer]
    truth: Truth
    keys: dict[str, str]  # unit key -> its key in the labels file
    test: set[str]  # unit keys of the test set
    items: list[Item]
    skipped: list[Skipped]
    excluded: dict[str, list[units.Excluded]]
    throughput: dict[str, Throughput]
    matching: labels.Matching
    labels_sha256: str
    validation: set[str] = field(default_factory=set)
    digests: list[str] = field(default_factory=list)  # the images', in order


def evaluate(request: Request, progress: Progress) -> Result:
    if not request.models and not request.predictions:
        raise EvaluationError("nothing to evaluate: give --model or --predictions")
    if request.models and (request.folder is None) == (request.query is None):
        raise EvaluationError("models read images: give one of --folder or --archive")
    if request.derive and request.thresholds:
        raise EvaluationError("--derive and --thresholds both set the operating points")
    if request.derive and request.validation is None:
        raise EvaluationError("--derive needs --validation: a labels file of other images")
    if request.derive:
        try:
            points.check_rule(request.derive)
        except points.PointsError as exc:
            raise EvaluationError(str(exc)) from exc
    for model in request.models:
        try:
            units.check_unit(model.manifest, request.unit)
        except units.UnitError as exc:
            raise EvaluationError(str(exc)) from exc
    elsewhere = [read_predictions(path, request.key) for path in request.predictions]
    every_label = list(
        dict.fromkeys(
            [label for m in request.models for label in units.label_names(m.manifest)]
            + [label for s in elsewhere for label in s.labels]
        )
    )
    sided = request.unit in ("eye", "breast")
    # The reference standard is read first: a bad file fails before any model runs.
    try:
        truth_file = labels.read(request.labels, every_label, key=request.key, sided=sided)
        check = (
            labels.read(request.validation, every_label, key=truth_file.key, sided=sided)
            if request.validation
            else None
        )
    except labels.LabelsError as exc:
        raise EvaluationError(str(exc)) from exc
    validation_keys = set(check.values) if check else set()
    both = validation_keys & set(truth_file.values)
    if both:
        raise EvaluationError(
            f"{len(both)} units are in both the labels and the validation file, e.g. "
            f"{sorted(both)[0]}: operating points are never tuned on the test set"
        )
    items, skipped = _items(request)
    scorers: list[Scorer] = []
    excluded: dict[str, list[units.Excluded]] = {}
    throughput: dict[str, Throughput] = {}
    digests: list[str] = []
    for model in request.models:
        scorer, lost, spent, digests = _run_model(request, model, items, progress)
        scorers.append(scorer)
        excluded[scorer.name] = lost
        throughput[scorer.name] = spent
    scorers += elsewhere
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise EvaluationError(f"two scorers share a name: {names}")
    keys = _label_keys(scorers, truth_file.key, sided)
    all_units = list(dict.fromkeys(k for s in scorers for k in (u.key for u in s.units)))
    label_of = [keys[k] for k in all_units if k in keys]
    test_labels = [k for k in label_of if k not in validation_keys]
    matching = labels.match(truth_file, test_labels, every_label)
    test = {u for u in all_units if u in keys and keys[u] in truth_file.values}
    validation = {u for u in all_units if u in keys and keys[u] in validation_keys}
    # Images of a folder carry no PatientID: the labels files' column stands for it.
    for given in (truth_file, check):
        if given is not None:
            _patients_from_labels(scorers, given, keys)
    _patients_apart(scorers, test, validation)
    truth = Truth(
        dict(truth_file.values),
        dict(truth_file.groups),
        truth_file.subgroups,
        truth_file.label_like,
    )
    if check is not None:
        truth.values.update(check.values)
    for scorer in scorers:
        scorer.points = _points(request, scorer, truth, keys, validation)
    metrics = _metrics(
        request,
        scorers,
        truth=truth,
        keys=keys,
        test=test,
        matching=matching,
        excluded=excluded,
        truth_file=truth_file,
    )
    return Result(
        metrics,
        scorers,
        truth,
        keys,
        test,
        items,
        skipped,
        excluded,
        throughput,
        matching,
        _sha256(request.labels),
        validation,
        digests,
    )


def _items(request: Request) -> tuple[list[Item], list[Skipped]]:
    if not request.models:
        return [], []
    try:
        if request.folder is not None:
            return from_folder(request.folder)
        assert request.archive is not None
        assert request.query is not None
        return from_archive(request.archive, request.query), []
    except InputError as exc:
        raise EvaluationError(str(exc)) from exc


def _run_model(
    request: Request, model: ModelRef, items: Sequence[Item], progress: Progress
) -> tuple[Scorer, list[units.Excluded], Throughput, list[str]]:
    manifest = model.manifest
    cache = PredictionCache(request.cache)
    try:
        extra = {"max_pixels": request.max_pixels} if request.max_pixels else {}
        runner = Runner(
            model,
            cache,
            batch=request.batch,
            workers=request.workers,
            cluster=request.cluster,
            **extra,
        )
        predictions, spent = runner.run(items, progress(f"{manifest.name}", len(items)))
    finally:
        cache.close()
    try:
        built = units.build(manifest, predictions, request.unit, [i.in_archive for i in items])
    except units.UnitError as exc:
        raise EvaluationError(str(exc)) from exc
    names = units.label_names(manifest)
    return (
        Scorer(manifest.name, manifest.version, built.units, {}, names),
        built.excluded,
        spent,
        [p.digest for p in predictions],
    )


def read_predictions(path: Path, key: str | None) -> Scorer:
    """Scores made elsewhere: a CSV with a key column (as the labels') and one column
    of scores per label; a ``PatientID`` column, when the key is another, groups the
    bootstrap."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"{path}: {exc}") from exc
    if not rows:
        raise EvaluationError(f"{path}: no predictions")
    header = list(rows[0])
    column = key or next((k for k in labels.KEYS if k in header), None)
    if column is None or column not in header:
        raise EvaluationError(f"{path}: no key column; one of {', '.join(labels.KEYS)}")
    label_columns = [c for c in header if c not in (column, "PatientID", "model", "version")]
    found = []
    for line, row in enumerate(rows, start=2):
        try:
            scores = {c: float(row[c]) for c in label_columns if (row.get(c) or "").strip()}
        except ValueError as exc:
            raise EvaluationError(f"{path}:{line}: {exc}") from exc
        unit = row[column].strip()
        patient = (row.get("PatientID") or "").strip() or unit
        keys = {column: unit}
        found.append(Unit(unit, keys, patient, scores, {}, [unit]))
    version = (rows[0].get("version") or "").strip() or _sha256(path)[:12]
    name = (rows[0].get("model") or "").strip() or path.stem
    return Scorer(name, version, found, {}, label_columns)


def _label_keys(scorers: Sequence[Scorer], key: str, sided: bool) -> dict[str, str]:
    """Each unit's key in the labels file (its value of the labels' key column, with
    its side for eyes and breasts)."""
    found: dict[str, str] = {}
    for scorer in scorers:
        for unit in scorer.units:
            value = unit.keys.get(key)
            if value is None:
                if key in ("SOPInstanceUID", "SeriesInstanceUID", "path") and unit.keys:
                    raise EvaluationError(
                        f"the labels are keyed by {key}, which names images; "
                        f"{scorer.name}'s units are not images"
                    )
                continue
            found[unit.key] = f"{value}/{unit.side}" if sided else value
    return found


def _patients_apart(scorers: Sequence[Scorer], test: set[str], validation: set[str]) -> None:
    if not validation:
        return
    for scorer in scorers:
        seen = {u.patient for u in scorer.units if u.key in validation}
        shared = sorted({u.patient for u in scorer.units if u.key in test} & seen)
        if shared:
            raise EvaluationError(
                f"{len(shared)} patients have units in both the test and the validation "
                f"set (e.g. {shared[0]}): the sets must be independent"
            )


def _patients_from_labels(
    scorers: Sequence[Scorer], truth_file: labels.Labels, keys: dict[str, str]
) -> None:
    if "PatientID" not in truth_file.subgroups:
        return
    for scorer in scorers:
        for unit in scorer.units:
            if "PatientID" not in unit.keys and unit.key in keys:
                given = truth_file.groups.get(keys[unit.key], {}).get("PatientID")
                if given:
                    unit.patient = given


def _points(
    request: Request, scorer: Scorer, truth: Truth, keys: dict[str, str], validation: set[str]
) -> dict[str, points.Point]:
    try:
        if request.thresholds is not None:
            return points.from_file(request.thresholds, scorer.labels)
        if request.derive:
            given: dict[str, tuple[list[float], list[int]]] = {}
            for label in scorer.labels:
                cases = [
                    (u.scores[label], value)
                    for u in scorer.units
                    if u.key in validation
                    and label in u.scores
                    and (value := truth.values[keys[u.key]].get(label)) is not None
                ]
                if cases:
                    given[label] = ([c[0] for c in cases], [c[1] for c in cases])
            derived, _problems = points.derive(request.derive, given)
            return derived
    except points.PointsError as exc:
        raise EvaluationError(str(exc)) from exc
    manifest = next((m.manifest for m in request.models if m.manifest.name == scorer.name), None)
    return points.from_manifest(manifest) if manifest is not None else {}


def _metrics(
    request: Request,
    scorers: Sequence[Scorer],
    *,
    truth: Truth,
    keys: dict[str, str],
    test: set[str],
    matching: labels.Matching,
    excluded: dict[str, list[units.Excluded]],
    truth_file: labels.Labels,
) -> dict[str, Any]:
    test_truth = Truth(
        {k: v for k, v in truth.values.items() if k in truth_file.values},
        truth.groups,
        truth.subgroup_columns,
        truth.label_like,
    )
    models: list[dict[str, Any]] = []
    kept: dict[tuple[str, str], analysis.Series] = {}
    for scorer in scorers:
        per_label: dict[str, Any] = {}
        for label in scorer.labels:
            if label not in truth_file.names:
                continue
            mine = [u for u in scorer.units if u.key in test]
            s = analysis.series(
                Scorer(scorer.name, scorer.version, mine, scorer.points, scorer.labels),
                label,
                test_truth,
                keys,
            )
            kept[(scorer.name, label)] = s
            point = [scorer.points[label]] if label in scorer.points else []
            one = analysis.label_metrics(s, point, seed=request.seed, resamples=request.resamples)
            one["subgroups"] = analysis.subgroup_metrics(s, _groups(s, truth, keys), point)
            per_label[label] = one
        models.append(
            {
                "name": scorer.name,
                "version": scorer.version,
                "units": len(scorer.units),
                "test_units": sum(1 for u in scorer.units if u.key in test),
                "excluded": _reasons(excluded.get(scorer.name, [])),
                "labels": per_label,
                "no_operating_point": sorted(set(per_label) - set(scorer.points)),
            }
        )
    comparisons = []
    for n, first in enumerate(scorers):
        for second in scorers[n + 1 :]:
            shared = [label for label in first.labels if label in second.labels]
            by_label = {
                label: analysis.compare(
                    kept[(first.name, label)],
                    kept[(second.name, label)],
                    first.points.get(label),
                    second.points.get(label),
                )
                for label in shared
                if (first.name, label) in kept and (second.name, label) in kept
            }
            comparisons.append({"first": first.name, "second": second.name, "labels": by_label})
    found: dict[str, Any] = analysis.rounded(
        {
            "schema": SCHEMA,
            "unit": request.unit,
            "seed": request.seed,
            "resamples": request.resamples,
            "confidence_level": 0.95,
            "small_subgroup": f"fewer than {analysis.SMALL} positives or negatives",
            "labels_key": truth_file.key,
            "reference_standard": {
                "rows": len(truth_file.values),
                "matched": len(matching.matched),
                "images_without_labels": len(matching.unlabelled),
                "labels_without_images": len(matching.missing),
                "unknown_label_columns": matching.unknown_columns,
                "model_labels_without_column": matching.absent_labels,
                "repeated_keys": len(truth_file.repeated),
            },
            "models": models,
            "comparisons": comparisons,
        }
    )
    return found


def _groups(s: analysis.Series, truth: Truth, keys: dict[str, str]) -> dict[str, list[str]]:
    """Each case's subgroup values: the header's, then the labels file's columns."""
    found: dict[str, list[str]] = {}
    for name in HEADER_SUBGROUPS:
        values = [u.groups.get(name, "unknown") for u in s.units]
        if any(v != "unknown" for v in values):
            found[name] = values
    for column in truth.subgroup_columns:
        if column == "PatientID" or column in truth.label_like:
            continue
        values = [truth.groups.get(keys[u.key], {}).get(column) or "unknown" for u in s.units]
        found[column] = values
    return found


def _reasons(excluded: Sequence[units.Excluded]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for e in excluded:
        kind = e.reason.split(":")[0]
        counted[kind] = counted.get(kind, 0) + 1
    return dict(sorted(counted.items()))


def _sha256(path: Path) -> str:
    return digest(str(path))


def images_digest(digests: Sequence[str]) -> str:
    """One hash of the images' hashes, in order: which images a run read."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()
