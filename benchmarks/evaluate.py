"""``filmless evaluate``'s runner against what its parts allow on this machine.

Three measurements over the same synthetic chest radiographs (PA views, 12-bit, written
by ``scripts.synthetic_corpus``) and the demo chest model:

1. decoding + preprocessing alone: every image read to its model input by a process per
   core (the runner's pool), images/s;
2. bare ONNX Runtime alone: the same inputs, already in memory, in batches of ``--batch``
   on every core, images/s;
3. the runner: both together, from files to predictions in the cache (a fresh one).

The parts share the cores, so together they allow 1 / (1/decode + 1/inference) images/s
(each image costs its decoding and its inference, one after the other or side by side);
the target is the runner at 90% of that or better.

    python -m benchmarks.evaluate --images 192 --scale 0.4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.support import run_facts
from inference.evaluate.cache import PredictionCache
from inference.evaluate.images import Item, from_folder, load
from inference.evaluate.runner import ModelRef, Runner, _worker_setup
from inference.runtime import cores
from models.build import build_demo
from models.manifest import MANIFEST
from models.manifest import load as load_manifest
from models.runtime import session as open_session
from models.zoo import CHEST_XRAY
from pacs import pixels
from scripts.synthetic_corpus import Rng, _patient, chest_dx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)


def corpus(folder: Path, images: int, scale: float) -> None:
    rng = Rng(11)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(images):
        pa = chest_dx(rng, _patient(rng, n), scale, "20240301", f"A{n}")[0]
        pa.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)


def decode_rate(items: list[Item], model: ModelRef, workers: int) -> tuple[float, list[Any]]:
    """Images/s of reading and preprocessing alone, in a pool like the runner's."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_setup, initargs=(pixels.LIMITS.max_pixels,)
    ) as pool:
        list(pool.map(time.sleep, [0.05] * workers))
        began = time.perf_counter()
        loaded = list(pool.map(load, items, [model.manifest] * len(items), chunksize=4))
        seconds = time.perf_counter() - began
    return len(items) / seconds, [one.tensor for one in loaded]


def inference_rate(model: ModelRef, tensors: list[Any], batch: int) -> float:
    """Images/s of bare ONNX Runtime on inputs already in memory (after one warm-up)."""
    session = open_session(model.onnx, providers=model.providers)
    name = session.get_inputs()[0].name
    session.run(None, {name: np.stack(tensors[:batch])})
    began = time.perf_counter()
    for start in range(0, len(tensors), batch):
        session.run(None, {name: np.stack(tensors[start : start + batch])})
    return len(tensors) / (time.perf_counter() - began)


def runner_rate(
    items: list[Item], model: ModelRef, batch: int, workers: int, folder: Path
) -> float:
    cache = PredictionCache(folder / f"cache-{time.monotonic_ns()}.sqlite")
    try:
        _, spent = Runner(model, cache, batch=batch, workers=workers).run(items)
    finally:
        cache.close()
    return spent.images_per_second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--scale", type=float, default=0.4, help="of a 2500x2048 radiograph")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="each rate is the median")
    parser.add_argument("--models-dir", type=Path, help="reuse built demo models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arguments = sys.argv[1:] if argv is None else argv
    workers = cores()
    with tempfile.TemporaryDirectory(prefix="filmless-bench-evaluate-") as scratch:
        root = Path(scratch)
        models = args.models_dir or root / "models"
        if not (models / CHEST_XRAY.name / MANIFEST).is_file():
            console.print("building the demo chest model")
            build_demo(models, CHEST_XRAY)
        folder = models / CHEST_XRAY.name
        model = ModelRef(str(folder), load_manifest(folder / MANIFEST))
        console.print(f"writing {args.images} radiographs at scale {args.scale}")
        corpus(root / "images", args.images, args.scale)
        items, _ = from_folder(root / "images")
        rates: dict[str, list[float]] = {"decode": [], "inference": [], "runner": []}
        for repeat in range(args.repeats):
            console.print(f"repeat {repeat + 1} of {args.repeats}")
            decoded, tensors = decode_rate(items, model, workers)
            rates["decode"].append(decoded)
            rates["inference"].append(inference_rate(model, tensors, args.batch))
            rates["runner"].append(runner_rate(items, model, args.batch, workers, root))
        rows, columns = pixels_of(items[0])
    median = {k: statistics.median(v) for k, v in rates.items()}
    allowed = 1 / (1 / median["decode"] + 1 / median["inference"])
    result = {
        "meta": run_facts("benchmarks.evaluate", arguments)
        | {"model": model.manifest.name, "images": args.images, "image_size": [rows, columns]},
        "workers": workers,
        "batch": args.batch,
        "rates": rates,
        "median": median,
        "allowed": allowed,
        "runner_fraction_of_allowed": median["runner"] / allowed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluate.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "evaluate.md").write_text(markdown(result))
    plot(result, args.out / "evaluate.png")
    table = Table(title="filmless evaluate: images/s")
    for column in (
        "decode + preprocess",
        "bare ONNX Runtime",
        "allowed together",
        "runner",
        "of allowed",
    ):
        table.add_column(column)
    table.add_row(
        f"{median['decode']:.1f}",
        f"{median['inference']:.1f}",
        f"{allowed:.1f}",
        f"{median['runner']:.1f}",
        f"{100 * median['runner'] / allowed:.0f}%",
    )
    console.print(table)
    return 0


def pixels_of(item: Item) -> tuple[int, int]:
    import pydicom  # noqa: PLC0415

    ds = pydicom.dcmread(item.file, stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)


def markdown(result: dict[str, Any]) -> str:
    m = result["median"]
    meta = result["meta"]
    return "\n".join(
        [
            "# filmless evaluate: runner throughput",
            "",
            f"`{meta['command']}` on {meta['machine']}, {meta['date']}.",
            f"{meta['images']} chest radiographs of {meta['image_size'][0]}x"
            f"{meta['image_size'][1]} (12-bit), model {meta['model']}, batch {result['batch']}, "
            f"{result['workers']} decoding processes; medians of "
            f"{len(result['rates']['runner'])} repeats.",
            "",
            "| decode + preprocess (images/s) | bare ONNX Runtime (images/s) | allowed together "
            "| runner (images/s) | runner / allowed |",
            "|---:|---:|---:|---:|---:|",
            f"| {m['decode']:.1f} | {m['inference']:.1f} | {result['allowed']:.1f} | "
            f"{m['runner']:.1f} | {100 * result['runner_fraction_of_allowed']:.0f}% |",
            "",
            "Allowed together: 1 / (1/decode + 1/inference), the rate when every image costs "
            "both on the same cores. Target: the runner at 90% of it or better.",
            "",
        ]
    )


def plot(result: dict[str, Any], path: Path) -> None:
    m = result["median"]
    names = ["decode +\npreprocess", "bare ONNX\nRuntime", "allowed\ntogether", "runner"]
    values = [m["decode"], m["inference"], result["allowed"], m["runner"]]
    figure, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar(names, values, color=["grey", "grey", "tab:blue", "tab:orange"])
    ax.axhline(0.9 * result["allowed"], ls="--", color="black", label="90% of allowed")
    ax.set_ylabel("images/s")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
