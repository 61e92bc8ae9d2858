"""The run folder: ``metrics.json``, ``predictions.csv``, ``manifest.json``, the plots,
and ``report.md`` / ``report.html`` that put them in front of a reader.

``metrics.json`` holds only what the inputs and seed decide (no times, no paths), with
its keys sorted and its numbers rounded, so that a re-run is byte-identical; when and
where it ran, how fast, and with which software is ``manifest.json``'s.
"""

from __future__ import annotations

import csv
import html
import json
import platform
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import onnxruntime as ort

import filmless
from inference.evaluate import analysis
from inference.evaluate import metrics as m
from inference.evaluate.images import digest
from inference.evaluate.run import Request, Result, images_digest
from inference.evaluate.units import HEADER_SUBGROUPS, Unit

MANIFEST_SCHEMA = "filmless.evaluate.manifest/1"
PANELS = 12  # labels plotted per model, those with the most positives first
FAILURES = 5  # false positives and false negatives listed per label
GRID = np.linspace(0.0, 1.0, 101)


def write(
    result: Result, request: Request, *, started: datetime, finished: datetime, command: str
) -> list[Path]:
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _text(out / "metrics.json", json.dumps(result.metrics, sort_keys=True, indent=2) + "\n"),
        _predictions(out / "predictions.csv", result),
        _text(
            out / "manifest.json",
            json.dumps(_manifest(result, request, started, finished, command), indent=2) + "\n",
        ),
    ]
    plots = _plots(out, result, request)
    written += plots
    markdown = _markdown(result, request, [p.name for p in plots])
    written.append(_text(out / "report.md", markdown))
    written.append(_text(out / "report.html", _html(markdown)))
    return written


def _text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _predictions(path: Path, result: Result) -> Path:
    """One row per unit and scorer: scores, the reference standard, subgroups, time."""
    every = list(dict.fromkeys(label for s in result.scorers for label in s.labels))
    columns = list(result.truth.subgroup_columns)
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(
            [
                "unit",
                "set",
                "model",
                "version",
                "patient",
                "StudyInstanceUID",
                "side",
                "images",
                "seconds",
                *(f"score {label}" for label in every),
                *(f"truth {label}" for label in every),
                *HEADER_SUBGROUPS,
                *columns,
            ]
        )
        for scorer in result.scorers:
            for unit in scorer.units:
                key = result.keys.get(unit.key)
                truth = result.truth.values.get(key, {}) if key else {}
                groups = result.truth.groups.get(key, {}) if key else {}
                kind = (
                    "test"
                    if unit.key in result.test
                    else "validation"
                    if unit.key in result.validation
                    else ""
                )
                writer.writerow(
                    [
                        unit.key,
                        kind,
                        scorer.name,
                        scorer.version,
                        unit.patient,
                        unit.study,
                        unit.side,
                        ";".join(unit.images),
                        f"{unit.seconds:.4f}",
                        *(_number(unit.scores.get(label)) for label in every),
                        *("" if truth.get(label) is None else truth[label] for label in every),
                        *(unit.groups.get(g, "") for g in HEADER_SUBGROUPS),
                        *(groups.get(c, "") for c in columns),
                    ]
                )
    return path


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _manifest(
    result: Result, request: Request, started: datetime, finished: datetime, command: str
) -> dict[str, Any]:
    models = []
    for model in request.models:
        spent = result.throughput.get(model.manifest.name)
        models.append(
            {
                "name": model.manifest.name,
                "version": model.manifest.version,
                "weights_sha256": model.sha256,
                "demo_weights": model.manifest.weights.demo,
                "provider": spent.provider if spent else "",
                "throughput": None if spent is None else _throughput(spent),
            }
        )
    return {
        "schema": MANIFEST_SCHEMA,
        "filmless": filmless.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "seed": request.seed,
        "resamples": request.resamples,
        "unit": request.unit,
        "input": (
            {"folder": str(request.folder)}
            if request.folder
            else {"archive_query": request.query}
            if request.query
            else {"predictions": [str(p) for p in request.predictions]}
        ),
        "models": models,
        "predictions_files": [
            {"path": str(p), "sha256": digest(str(p))} for p in request.predictions
        ],
        "labels": {"path": str(request.labels), "sha256": result.labels_sha256},
        "validation": (
            {"path": str(request.validation), "sha256": digest(str(request.validation))}
            if request.validation
            else None
        ),
        "images": {
            "count": len(result.digests),
            "sha256_of_list": images_digest(result.digests),
            "sha256": result.digests,
        },
        "skipped_files": [{"path": s.path, "reason": s.reason} for s in result.skipped],
        "excluded": {
            name: [{"unit": e.key, "reason": e.reason} for e in lost]
            for name, lost in result.excluded.items()
        },
        "unlabelled": result.matching.unlabelled,
        "labels_without_images": result.matching.missing,
    }


def _throughput(t: Any) -> dict[str, Any]:
    ran = max(t.inferred, 1)
    return {
        "images_read": t.images,
        "images_run": t.inferred,
        "images_from_cache": t.cached,
        "seconds": round(t.seconds, 3),
        "images_per_second": round(t.images_per_second, 2),
        # Per image run through the model; decoding includes the headers of the others.
        "per_image_ms": {
            "decode": round(1000 * t.decode_seconds / ran, 2),
            "preprocess": round(1000 * t.preprocess_seconds / ran, 2),
            "inference": round(1000 * t.infer_seconds / ran, 2),
        },
        "where": t.where,
        "workers": t.workers,
    }


def _plotted(result: Result) -> list[tuple[str, str, analysis.Series]]:
    """(scorer, label, cases) for the labels with both classes, most positives first."""
    found = []
    for scorer in result.scorers:
        chosen = []
        for label in scorer.labels:
            s = _series(result, scorer.name, label)
            if s is not None and 0 < s.truths.sum() < s.truths.size:
                chosen.append((int(s.truths.sum()), label, s))
        chosen.sort(key=lambda c: (-c[0], c[1]))
        found += [(scorer.name, label, s) for _, label, s in chosen[:PANELS]]
    return found


def _series(result: Result, name: str, label: str) -> analysis.Series | None:
    scorer = next(s for s in result.scorers if s.name == name)
    if label not in scorer.labels:
        return None
    test = [u for u in scorer.units if u.key in result.test]
    only = analysis.Scorer(scorer.name, scorer.version, test, scorer.points, scorer.labels)
    truth = analysis.Truth({k: v for k, v in result.truth.values.items()})
    s = analysis.series(only, label, truth, result.keys)
    return s if s.truths.size else None


def _grid(count: int) -> tuple[Any, Any]:
    columns = min(3, max(1, count))
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.8 * rows), squeeze=False, dpi=90
    )
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return figure, axes.flat


def _plots(out: Path, result: Result, request: Request) -> list[Path]:
    panels = _plotted(result)
    if not panels:
        return []
    written = []
    figure, axes = _grid(len(panels))
    for ax, (name, label, s) in zip(axes, panels, strict=False):
        fpr, tpr, _ = m.roc_curve(s.scores, s.truths)
        try:
            low, high = m.roc_band(s.scores, s.truths, s.clusters, GRID, seed=request.seed)
            ax.fill_between(GRID, low, high, alpha=0.25, label="95% band (patients)")
        except m.NotEstimable:
            pass
        ax.plot(fpr, tpr, label=f"AUROC {m.auroc(s.scores, s.truths):.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        point = next(x for x in result.scorers if x.name == name).points.get(label)
        if point is not None:
            at = m.at_threshold(s.scores, s.truths, point.threshold)
            ax.plot(1 - at.specificity.value, at.sensitivity.value, "o", label="operating point")
        ax.set(title=_title(name, label, result), xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(loc="lower right", fontsize=7)
    written.append(_save(figure, out / "roc.png"))

    figure, axes = _grid(len(panels))
    for ax, (name, label, s) in zip(axes, panels, strict=False):
        fpr, tpr, _ = m.roc_curve(s.scores, s.truths)
        positives, negatives = s.truths.sum(), s.truths.size - s.truths.sum()
        tp, fp = tpr * positives, fpr * negatives
        precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
        ap = m.average_precision(s.scores, s.truths)
        ax.plot(tpr, precision, drawstyle="steps-post", label=f"AUPRC {ap:.3f}")
        ax.axhline(positives / s.truths.size, ls=":", color="grey", label="prevalence")
        ax.set(title=_title(name, label, result), xlabel="recall", ylabel="precision")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower left", fontsize=7)
    written.append(_save(figure, out / "pr.png"))

    figure, axes = _grid(len(panels))
    for ax, (name, label, s) in zip(axes, panels, strict=False):
        _, bins = m.calibration(s.scores, s.truths)
        shown = [b for b in bins if b.observed is not None]
        x = [b.mean_probability for b in shown]
        y = [b.observed.value for b in shown if b.observed]
        lows = [b.observed.value - b.observed.low for b in shown if b.observed]
        highs = [b.observed.high - b.observed.value for b in shown if b.observed]
        ax.errorbar(x, y, yerr=[lows, highs], fmt="o-", capsize=2, label="observed (exact 95%)")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(title=_title(name, label, result), xlabel="mean predicted", ylabel="observed")
        ax.legend(loc="upper left", fontsize=7)
    written.append(_save(figure, out / "calibration.png"))

    figure, axes = _grid(len(panels))
    for ax, (name, label, s) in zip(axes, panels, strict=False):
        edges = np.linspace(0, 1, 21)
        ax.hist(s.scores[s.truths == 0], bins=edges, alpha=0.6, label="negative")
        ax.hist(s.scores[s.truths == 1], bins=edges, alpha=0.6, label="positive")
        point = next(x for x in result.scorers if x.name == name).points.get(label)
        if point is not None:
            ax.axvline(point.threshold, color="black", ls="--", label="threshold")
        ax.set(title=_title(name, label, result), xlabel="score", ylabel="units")
        ax.legend(fontsize=7)
    written.append(_save(figure, out / "histograms.png"))

    rows = _forest_rows(result)
    if rows:
        figure, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2), dpi=90)
        for n, (_, centre, below, above, small) in enumerate(rows):
            colour = "tab:orange" if small else "tab:blue"
            error = [[centre - below], [above - centre]]
            ax.errorbar(centre, n, xerr=error, fmt="o", color=colour)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0.5, ls=":", color="grey")
        ax.set(xlabel="AUROC (DeLong 95% CI); orange: small subgroup", xlim=(0, 1))
        written.append(_save(figure, out / "forest.png"))
    return written


def _title(name: str, label: str, result: Result) -> str:
    return label if len(result.scorers) == 1 else f"{name}: {label}"


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    # No timestamps or software names in the file: the same run draws the same bytes.
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path


def _forest_rows(result: Result) -> list[tuple[str, float, float, float, bool]]:
    """Per model, its first label with subgroups: one row per subgroup value."""
    rows = []
    for model in result.metrics["models"]:
        for label, found in model["labels"].items():
            auroc = found.get("auroc") or {}
            if "value" not in auroc or not found.get("subgroups"):
                continue
            whole = auroc["delong"]
            rows.append((f"{label}: all", auroc["value"], whole["low"], whole["high"], False))
            for column, values in found["subgroups"].items():
                for value, part in values.items():
                    a = part.get("auroc") or {}
                    if "value" in a:
                        text = f"  {column} = {value} (n={part['n']})"
                        rows.append((text, a["value"], a["low"], a["high"], part["small"]))
            break
    return rows


def _markdown(result: Result, request: Request, plots: Sequence[str]) -> str:
    metrics = result.metrics
    lines = [
        "# Evaluation report",
        "",
        f"Unit of analysis: **{metrics['unit']}**. Labels: `{request.labels.name}` "
        f"(sha256 `{result.labels_sha256[:16]}...`), keyed by {metrics['labels_key']}. "
        f"Seed {metrics['seed']}, {metrics['resamples']} bootstrap resamples of patients.",
        "",
    ]
    lines += _flow(result)
    for model in metrics["models"]:
        lines += _model_section(model, result)
    for comparison in metrics["comparisons"]:
        lines += _comparison(comparison)
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    lines += _failures(result, request)
    lines += _speed(result)
    lines += _checklist(result, request, plots)
    return "\n".join(lines) + "\n"


def _flow(result: Result) -> list[str]:
    ref = result.metrics["reference_standard"]
    lines = [
        "## Flow of images and units",
        "",
        f"- images read: {len(result.digests)}; files skipped: {len(result.skipped)}",
    ]
    for name, lost in result.excluded.items():
        reasons: dict[str, int] = {}
        for e in lost:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda r: -r[1])[:10]:
            lines.append(f"- {name}: {count} excluded: {reason}")
    lines += [
        f"- labelled units matched: {ref['matched']} of {ref['rows']} rows",
        f"- units without a label row: {ref['images_without_labels']}",
        f"- label rows without an image: {ref['labels_without_images']}",
    ]
    if ref["unknown_label_columns"]:
        lines.append(
            f"- columns that look like labels but name none of the model's: "
            f"{', '.join(ref['unknown_label_columns'])}"
        )
    if ref["model_labels_without_column"]:
        lines.append(f"- model labels with no column: {len(ref['model_labels_without_column'])}")
    if result.validation:
        lines.append(f"- validation units (operating points only): {len(result.validation)}")
    return [*lines, ""]


def _fmt(i: dict[str, Any] | None) -> str:
    if not i or "value" not in i or i["value"] is None:
        return "n/a"
    return f"{i['value']:.3f} ({i['low']:.3f}-{i['high']:.3f})"


def _number_or(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float | int) else "n/a"


def _model_section(model: dict[str, Any], result: Result) -> list[str]:
    lines = [
        f"## {model['name']} {model['version']}",
        "",
        "| label | n | pos | AUROC (DeLong 95% CI) | bootstrap CI | AUPRC | threshold "
        "| sensitivity | specificity | PPV | NPV | Brier | ECE |",
        "|---|---:|---:|---|---|---:|---:|---|---|---|---|---:|---:|",
    ]
    for label, f in model["labels"].items():
        auroc = f.get("auroc") or {}
        boot = auroc.get("bootstrap")
        delong = {"value": auroc.get("value"), **(auroc.get("delong") or {})}
        point = (f.get("operating_points") or [{}])[0]
        calibration = f.get("calibration") or {}
        cells = [
            label,
            str(f["n"]),
            str(f["positives"]),
            _fmt(delong),
            f"{boot['low']:.3f}-{boot['high']:.3f}" if boot else "n/a",
            _number_or(f.get("auprc")),
            str(point.get("threshold", "")),
            _fmt(point.get("sensitivity")),
            _fmt(point.get("specificity")),
            _fmt(point.get("ppv")),
            _fmt(point.get("npv")),
            _number_or(f.get("brier")),
            _number_or(calibration.get("ece")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    small = [
        f"{label}: {column} = {value} (n={part['n']})"
        for label, f in model["labels"].items()
        for column, values in (f.get("subgroups") or {}).items()
        for value, part in values.items()
        if part["small"]
    ]
    lines += [
        "### Subgroups",
        "",
        "| label | subgroup | value | n | pos | AUROC (DeLong 95% CI) | sensitivity "
        "| specificity |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for label, f in model["labels"].items():
        for column, values in (f.get("subgroups") or {}).items():
            for value, part in values.items():
                point = (part.get("operating_points") or [{}])[0]
                flag = " (small)" if part["small"] else ""
                lines.append(
                    f"| {label} | {column} | {value}{flag} | {part['n']} | {part['positives']} "
                    f"| {_fmt(part.get('auroc'))} | {_fmt(point.get('sensitivity'))} "
                    f"| {_fmt(point.get('specificity'))} |"
                )
    lines += [
        "",
        f"{len(small)} subgroup values are small (fewer than {analysis.SMALL} positives or "
        "negatives): read their intervals, not their estimates.",
        "",
    ]
    return lines


def _comparison(c: dict[str, Any]) -> list[str]:
    lines = [
        f"## {c['first']} against {c['second']}",
        "",
        "| label | n | AUROC difference (95% CI) | p (paired DeLong) | McNemar: only first right "
        "| only second right | p |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for label, f in c["labels"].items():
        d = f.get("auroc_difference") or {}
        mc = f.get("mcnemar") or {}
        lines.append(
            f"| {label} | {f['n']} | {_fmt(d.get('difference'))} | {d.get('p', 'n/a')} "
            f"| {mc.get('only_first_right', 'n/a')} | {mc.get('only_second_right', 'n/a')} "
            f"| {mc.get('p', 'n/a')} |"
        )
    return [*lines, ""]


def _failures(result: Result, request: Request) -> list[str]:
    """The most confident false positives and false negatives at each operating point."""
    lines = ["## Most confident errors", ""]
    any_listed = False
    for scorer in result.scorers:
        for label, point in scorer.points.items():
            s = _series(result, scorer.name, label)
            if s is None:
                continue
            negatives = [
                (float(score), u)
                for score, truth, u in zip(s.scores, s.truths, s.units, strict=True)
                if truth == 0 and score >= point.threshold
            ]
            positives = [
                (float(score), u)
                for score, truth, u in zip(s.scores, s.truths, s.units, strict=True)
                if truth == 1 and score < point.threshold
            ]
            negatives.sort(key=lambda c: (-c[0], c[1].key))
            positives.sort(key=lambda c: (c[0], c[1].key))
            if not negatives and not positives:
                continue
            any_listed = True
            lines.append(f"### {scorer.name}: {label} (threshold {point.threshold})")
            lines.append("")
            for kind, cases in (("false positive", negatives), ("false negative", positives)):
                for score, unit in cases[:FAILURES]:
                    lines.append(f"- {kind}, score {score:.3f}: {_link(unit, request)}")
            lines.append("")
    if not any_listed:
        lines += ["No errors at the operating points.", ""]
    return lines


def _link(unit: Unit, request: Request) -> str:
    if unit.in_archive and unit.study and request.viewer:
        url = f"{request.viewer.rstrip('/')}/viewer/viewer?StudyInstanceUIDs={unit.study}"
        return f"[{unit.key}]({url})"
    return f"`{unit.key}`"


def _speed(result: Result) -> list[str]:
    lines = ["## Throughput", ""]
    for name, t in result.throughput.items():
        shown = _throughput(t)
        ms = shown["per_image_ms"]
        lines.append(
            f"- {name}: {t.images} images read and {t.inferred} run through the model in "
            f"{t.seconds:.1f} s ({shown['images_per_second']} images/s, {t.where}, "
            f"{t.workers} workers, {t.provider}); per image run: decoding {ms['decode']} ms, "
            f"preprocessing {ms['preprocess']} ms, inference {ms['inference']} ms; "
            f"{t.cached} from the prediction cache"
        )
    return [*lines, ""]


def _checklist(result: Result, request: Request, plots: Sequence[str]) -> list[str]:
    """The items of CLAIM (2024), STARD-AI and TRIPOD+AI this run fills, and where."""
    models = result.metrics["models"]
    items = [
        ("Test set: source, selection and size", "the input, and the flow section above"),
        ("Flow of cases, with exclusions and their reasons", "flow section; manifest.json"),
        ("Reference standard and how it was matched", "labels sha256, matched and unmatched"),
        ("Model identification", "name, version and weights sha256 in manifest.json"),
        (
            "Operating points set before testing",
            ", ".join(sorted({p.source for s in result.scorers for p in s.points.values()}))
            or "none",
        ),
        ("Discrimination with 95% confidence intervals", "AUROC (DeLong, patient bootstrap)"),
        ("Classification at the operating point with 95% CIs", "sensitivity ... NPV (Wilson)"),
        ("Calibration", "Brier score, ECE, calibration plot"),
        ("Subgroup analyses (sex, age, site, device)", "subgroup tables and forest plot"),
        ("Failure analysis", "most confident errors"),
        ("Software, versions and random seed", "manifest.json"),
    ]
    if len(models) > 1:
        items.append(("Comparison of models on the same cases", "paired DeLong, McNemar"))
    lines = ["## Reporting checklist items this run fills", "", "| item | where |", "|---|---|"]
    lines += [f"| {item} | {where} |" for item, where in items]
    if not plots:
        lines += ["", "No label had both classes in the test set: nothing to plot."]
    return [*lines, ""]


def _html(markdown: str) -> str:
    """The Markdown report as a self-contained page (tables, images, links, lists)."""
    body: list[str] = []
    table: list[list[str]] = []
    listing = False

    def flush_table() -> None:
        if not table:
            return
        head, *rest = table
        body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head))
        body.append("</tr></thead><tbody>")
        for row in rest:
            body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
        body.append("</tbody></table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table.append(cells)
            continue
        flush_table()
        if listing and not line.startswith("- "):
            body.append("</ul>")
            listing = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            source = line[line.index("(") + 1 : line.rindex(")")]
            body.append(
                f'<img class="plot" src="{html.escape(source)}" alt="{html.escape(source)}">'
            )
        elif line.startswith("- "):
            if not listing:
                body.append("<ul>")
                listing = True
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    if listing:
        body.append("</ul>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
        "img.plot{max-width:49%;vertical-align:top}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Evaluation report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    """Markdown's links, bold and code within a line, the rest escaped."""
    escaped = html.escape(text)
    escaped = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
