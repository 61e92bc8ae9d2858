"""``filmless models ...``: build, import, add, list, verify and derive variants.

torch is imported only by ``build`` and ``import``; the other commands run where only
ONNX Runtime is installed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from filmless.settings import Settings
from models.manifest import ManifestError
from models.store import ModelStore, cached_demo
from models.zoo import TASKS


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = commands.add_parser("models", help="the model zoo: build, import, add, list, verify")
    sub = models.add_subparsers(dest="models_command", required=True)
    build = sub.add_parser("build", help="make the demo models (seeded weights; cached)")
    build.add_argument("--task", choices=sorted(TASKS), action="append", help="only these")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    imp = sub.add_parser("import", help="convert a checkpoint (state dict) to ONNX + manifest")
    imp.add_argument("checkpoint", type=Path)
    imp.add_argument("--task", choices=sorted(TASKS), required=True)
    imp.add_argument(
        "--layout",
        choices=["torchxrayvision", "filmless"],
        default="filmless",
        help="torchxrayvision: a TorchXRayVision DenseNet-121 state dict",
    )
    imp.add_argument("--name", required=True, help="model name (lower case, digits, . -)")
    imp.add_argument("--version", required=True)
    imp.add_argument("--variant", help="EfficientNet size: efficientnet-b0 or efficientnet-b3")
    add = sub.add_parser("add", help="install any ONNX file with its manifest (validated)")
    add.add_argument("onnx", type=Path)
    add.add_argument("manifest", type=Path)
    sub.add_parser("list", help="installed models")
    verify = sub.add_parser("verify", help="re-hash and re-run the reference sample")
    verify.add_argument("names", nargs="*", help="default: every installed model")
    fp16 = sub.add_parser("fp16", help="derive a float16 variant (for GPUs)")
    fp16.add_argument("name")
    int8 = sub.add_parser("int8", help="derive a calibrated int8 variant (for CPUs)")
    int8.add_argument("name")
    int8.add_argument(
        "--calibration", type=Path, required=True, help="folder of preprocessed .npy inputs"
    )
    int8.add_argument(
        "--max-difference",
        type=float,
        default=0.1,
        help="refuse the variant if a probability moves more than this on the reference",
    )


def run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    store = ModelStore(settings.models_dir)
    try:
        if args.models_command == "build":
            return _build(store, args.task or sorted(TASKS), args.force, console)
        if args.models_command == "import":
            from models.build import import_checkpoint
            from models.checkpoints import CheckpointError

            try:
                manifest = import_checkpoint(
                    store.root,
                    args.checkpoint,
                    task=args.task,
                    layout=args.layout,
                    name=args.name,
                    version=args.version,
                    variant=args.variant,
                )
            except (CheckpointError, ValueError) as exc:
                console.print(f"[red]import refused:[/red] {exc}")
                return 1
            console.print(f"imported {manifest.name} {manifest.version} into {store.root}")
            return 0
        if args.models_command == "add":
            installed = store.add(args.onnx, args.manifest)
            console.print(f"added {installed.manifest.name} to {store.root}")
            return 0
        if args.models_command == "list":
            _list(store, console)
            return 0
        if args.models_command == "verify":
            return _verify(store, args.names, console)
        if args.models_command in ("fp16", "int8"):
            from models.variants import make_fp16, make_int8

            if args.models_command == "fp16":
                made = make_fp16(store, args.name)
            else:
                made = make_int8(
                    store, args.name, args.calibration, max_difference=args.max_difference
                )
                console.print(
                    "[yellow]int8 changes the scores: measure its accuracy (AUC) on labelled "
                    "data before switching to it; it is not the default.[/yellow]"
                )
            console.print(f"made {made.manifest.name}: {made.manifest.provenance.source}")
            return 0
    except (ManifestError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    raise AssertionError(args.models_command)


def _build(store: ModelStore, tasks: list[str], force: bool, console: Console) -> int:
    table = Table(title=f"demo models in {store.root}")
    for column in ("model", "task", "outcome", "seconds"):
        table.add_column(column)
    for name in tasks:
        start = time.perf_counter()
        existing = None if force else cached_demo(store, TASKS[name])
        if existing is not None:
            table.add_row(existing.name, name, "cached", f"{time.perf_counter() - start:.1f}")
            continue
        from models.build import build_demo

        with console.status(f"building the {name} demo model"):
            built = build_demo(store.root, TASKS[name], force=True)
        table.add_row(built.manifest.name, name, "built, parity checked", f"{built.seconds:.1f}")
    console.print(table)
    return 0


def _list(store: ModelStore, console: Console) -> None:
    table = Table(title=f"models in {store.root}")
    for column in ("name", "version", "task", "variant", "default", "weights", "clinical use"):
        table.add_column(column)
    for model in store.installed():
        m = model.manifest
        table.add_row(
            m.name,
            m.version,
            m.task,
            m.variant,
            "yes" if m.default else "no",
            "demo" if m.weights.demo else m.weights.sha256[:12],
            "yes" if m.clinical_use else "no",
        )
    console.print(table)


def _verify(store: ModelStore, names: list[str], console: Console) -> int:
    names = names or [m.manifest.name for m in store.installed()]
    if not names:
        console.print(f"no models in {store.root}; run `filmless models build`")
        return 1
    failed = 0
    for name in names:
        result = store.verify(name)
        if result.ok:
            console.print(f"[green]ok[/green] {name}: sha256 matches, parity {result.parity:.1e}")
        else:
            failed += 1
            console.print(f"[red]FAILED[/red] {name}: {'; '.join(result.problems)}")
    return 1 if failed else 0
