"""``filmless evaluate``: installed models (or scores made elsewhere) against labels.

Reads images from a folder or the archive, runs each model as screening does (the
prediction cache skips what was run before), and writes the run folder
(:mod:`inference.evaluate.writeup`). Exit status 2 for a request that cannot be run,
with the reason.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from filmless.settings import Settings
from filmless.wiring import build_archive
from models.manifest import MANIFEST, ManifestError, load
from models.store import ModelStore

if TYPE_CHECKING:
    from inference.evaluate.runner import ModelRef, Throughput

# inference.evaluate.units.UNITS; spelled out so that the command line (and every
# `filmless serve`) does not import the evaluation, and with it torch, to parse it.
UNITS = ("image", "study", "eye", "breast")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = commands.add_parser(
        "evaluate", help="accuracy of models on labelled images: metrics, plots, report"
    )
    ev.add_argument(
        "--model",
        action="append",
        default=[],
        help="an installed model's name, or a folder with manifest.toml (twice: compare)",
    )
    ev.add_argument(
        "--predictions",
        action="append",
        type=Path,
        default=[],
        help="a CSV of scores made elsewhere: a key column and one column per label",
    )
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--folder", type=Path, help="DICOM files and/or PNG/JPEG pictures")
    source.add_argument(
        "--archive", metavar="QUERY", help="instances of the archive, as QIDO-RS: 'Modality=DX'"
    )
    ev.add_argument("--labels", type=Path, required=True, help="the reference standard (CSV)")
    ev.add_argument("--key", help="the labels' key column (default: the first UID column found)")
    ev.add_argument("--unit", choices=UNITS, default="image", help="unit of analysis")
    ev.add_argument("--thresholds", type=Path, help="operating points: JSON/TOML/CSV by label")
    ev.add_argument(
        "--derive",
        help="operating points from --validation: youden, sensitivity>=0.9, specificity>=0.9",
    )
    ev.add_argument("--validation", type=Path, help="labels of the validation images")
    ev.add_argument("--out", type=Path, required=True, help="the run folder")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    ev.add_argument("--batch", type=int, default=8, help="images per ONNX Runtime pass")
    ev.add_argument("--workers", type=int, default=0, help="decoding processes (0: one per core)")
    ev.add_argument("--cluster", help="a Dask scheduler, e.g. tcp://scheduler:8786")
    ev.add_argument("--cache", type=Path, help="prediction cache (default: data_dir/...)")
    ev.add_argument("--viewer-url", help="base URL for links to the viewer (default: this server)")


def _model(name: str, store: ModelStore) -> ModelRef:
    from inference.evaluate.runner import ModelRef  # noqa: PLC0415 (torch, only here)

    folder = Path(name)
    if (folder / MANIFEST).is_file():
        return ModelRef(str(folder.resolve()), load(folder / MANIFEST))
    installed = store.get(name)
    return ModelRef(str(installed.folder.resolve()), installed.manifest)


def run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    # Imported here: the evaluation needs torch (MONAI's transforms), serving never does.
    from inference.evaluate.run import EvaluationError, Request, evaluate  # noqa: PLC0415

    store = ModelStore(settings.models_dir)
    try:
        models = [_model(name, store) for name in args.model]
    except (ManifestError, KeyError, FileNotFoundError, LookupError) as exc:
        console.print(f"[red]no such model:[/red] {exc}")
        return 2
    if args.resamples < 100 or args.batch < 1:
        console.print("[red]--resamples must be at least 100 and --batch at least 1[/red]")
        return 2
    archive = build_archive(settings, create_schema=False) if args.archive else None
    request = Request(
        labels=args.labels,
        out=args.out,
        models=models,
        predictions=list(args.predictions),
        folder=args.folder,
        query=args.archive,
        archive=archive,
        key=args.key,
        unit=args.unit,
        thresholds=args.thresholds,
        derive=args.derive,
        validation=args.validation,
        seed=args.seed,
        resamples=args.resamples,
        batch=args.batch,
        workers=args.workers,
        cluster=args.cluster,
        cache=args.cache or settings.data_dir / "evaluation-cache.sqlite",
        viewer=args.viewer_url or f"http://127.0.0.1:{settings.http_port}",
        max_pixels=settings.max_pixels,
    )
    started = datetime.now(UTC)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console) as progress:

            def bar(what: str, total: int) -> Callable[[int], None]:
                task = progress.add_task(what, total=total)
                return lambda n: progress.advance(task, n)

            result = evaluate(request, bar)
            finishing = progress.add_task("metrics, plots and report", total=None)
            from inference.evaluate.writeup import write  # noqa: PLC0415 (matplotlib)

            written = write(
                result,
                request,
                started=started,
                finished=datetime.now(UTC),
                command=shlex.join(["filmless", *sys.argv[1:]]),
            )
            progress.update(finishing, total=1, completed=1)
    except EvaluationError as exc:
        console.print(f"[red]cannot evaluate:[/red] {exc}")
        return 2
    finally:
        if archive is not None:
            archive.index.dispose()
    _summary(console, result.metrics, result.throughput, request.out, len(written))
    return 0


def _summary(
    console: Console, metrics: dict[str, Any], throughput: dict[str, Throughput], out: Path, n: int
) -> None:
    for model in metrics["models"]:
        table = Table(title=f"{model['name']} {model['version']}: {metrics['unit']}s")
        for column in ("label", "n", "positives", "AUROC (95% CI)", "sensitivity", "specificity"):
            table.add_column(column)
        for label, found in model["labels"].items():
            auroc = found.get("auroc") or {}
            point = (found.get("operating_points") or [{}])[0]
            table.add_row(
                label,
                str(found["n"]),
                str(found["positives"]),
                _ci(auroc.get("value"), auroc.get("delong")),
                _ci_of(point.get("sensitivity")),
                _ci_of(point.get("specificity")),
            )
        console.print(table)
        spent = throughput.get(model["name"])
        if spent is not None:
            console.print(
                f"{model['name']}: {spent.images} images read, {spent.inferred} run through "
                f"the model at {spent.images_per_second:.1f}/s; {spent.cached} from the cache"
            )
    console.print(f"{n} files written to {out}; open {out / 'report.html'}")


def _ci(value: object, interval: object) -> str:
    if not isinstance(value, float) or not isinstance(interval, dict):
        return "n/a"
    return f"{value:.3f} ({interval['low']:.3f}-{interval['high']:.3f})"


def _ci_of(found: object) -> str:
    if not isinstance(found, dict) or "value" not in found:
        return "n/a"
    return _ci(found["value"], found)
