"""Inference throughput of the zoo's models: ONNX Runtime against torch eager, on this CPU.

For each demo model (built, or reused from ``--models-dir``): images/s at batch 1, 2, 4
and 8, with 1 and 2 threads, for ONNX Runtime (graph optimisation ALL) and for the same
network in torch eager mode (``inference_mode``). Next to it: the model's GFLOPs per
image (counted by torch) and the fraction of the machine's own fp32 matmul rate it
reaches, measured here with a 2048x2048 matrix product per thread count.

    python -m benchmarks.inference --seconds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import onnxruntime
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.support import run_facts
from models.architectures import Screening, backbone, demo_weights
from models.build import build_demo
from models.runtime import reference_sample, session
from models.store import ModelStore
from models.zoo import TASKS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 2, 4, 8)
console = Console(stderr=True)


@dataclass
class Throughput:
    model: str
    engine: str
    threads: int
    batch: int
    images_per_s: float
    gflops_per_image: float
    machine_gflops: float

    @property
    def fraction_of_matmul(self) -> float:
        return self.images_per_s * self.gflops_per_image / self.machine_gflops


def matmul_gflops(threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def rate(run: Callable[[], object], batch: int, seconds: float) -> float:
    """Images per second: a warm-up run, then as many runs as fit in ``seconds`` (>= 3)."""
    run()
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        run()
        count += 1
    return batch * count / (time.perf_counter() - start)


def gflops(module: torch.nn.Module, sample: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(sample)
    return counter.get_total_flops() / 1e9


def measure(models_dir: Path, seconds: float, threads_list: list[int]) -> list[Throughput]:
    machine = {t: matmul_gflops(t) for t in threads_list}
    for threads, value in machine.items():
        console.print(f"fp32 matmul, {threads} thread(s): {value:.1f} GFLOP/s")
    results = []
    for task in TASKS.values():
        with console.status(f"building {task.name}"):
            build_demo(models_dir, task)
        model = ModelStore(models_dir).get(task.name)
        module = Screening(task, backbone(task))
        demo_weights(module, task, task.seed)
        one = torch.from_numpy(reference_sample(task.input, task.preprocessing, batch=1))
        per_image = gflops(module, one)
        for threads in threads_list:
            runtime = session(model.onnx, threads=threads)
            torch.set_num_threads(threads)
            for batch in BATCHES:
                data = reference_sample(task.input, task.preprocessing, batch=batch)
                runs = {
                    "onnxruntime": partial(runtime.run, None, {task.input.name: data}),
                    "torch eager": partial(run_eager, module, torch.from_numpy(data)),
                }
                for engine, run in runs.items():
                    with console.status(f"{task.name} {engine} threads={threads} batch={batch}"):
                        value = rate(run, batch, seconds)
                    results.append(
                        Throughput(
                            task.name, engine, threads, batch, value, per_image, machine[threads]
                        )
                    )
    return results


def run_eager(module: torch.nn.Module, tensor: torch.Tensor) -> object:
    with torch.inference_mode():
        return module(tensor)


def _best(results: list[Throughput], model: str, engine: str, threads: int) -> Throughput:
    return max(
        (r for r in results if (r.model, r.engine, r.threads) == (model, engine, threads)),
        key=lambda r: r.images_per_s,
    )


def summary(results: list[Throughput]) -> list[dict[str, Any]]:
    rows = []
    for model in dict.fromkeys(r.model for r in results):
        for threads in sorted({r.threads for r in results}):
            pick = {
                (r.engine, r.batch): r for r in results if r.model == model and r.threads == threads
            }
            ort1, torch1 = pick[("onnxruntime", 1)], pick[("torch eager", 1)]
            ort_best = _best(results, model, "onnxruntime", threads)
            torch_best = _best(results, model, "torch eager", threads)
            rows.append(
                {
                    "model": model,
                    "threads": threads,
                    "gflops_per_image": ort1.gflops_per_image,
                    "ort_batch1": ort1.images_per_s,
                    "ort_batch1_per_core": ort1.images_per_s / threads,
                    "ort_best": ort_best.images_per_s,
                    "ort_best_batch": ort_best.batch,
                    "torch_batch1": torch1.images_per_s,
                    "torch_best": torch_best.images_per_s,
                    "speedup_batch1": ort1.images_per_s / torch1.images_per_s,
                    "speedup_best": ort_best.images_per_s / torch_best.images_per_s,
                    "fraction_of_matmul": ort_best.fraction_of_matmul,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], results: list[Throughput], meta: dict[str, Any]) -> str:
    machine = sorted({(r.threads, r.machine_gflops) for r in results})
    lines = [
        "# Inference throughput (CPU)",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; onnxruntime "
        f"{meta['onnxruntime']}, torch {meta['torch']}.",
        "",
        "Machine fp32 matmul: "
        + ", ".join(f"{t} thread(s) {g:.1f} GFLOP/s" for t, g in machine)
        + ".",
        "",
        "| model | threads | GFLOPs/img | ORT b1 img/s | ORT b1 per core | ORT best (batch) "
        "| torch b1 | torch best | ORT/torch b1 | ORT/torch best | of matmul peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['gflops_per_image']:.2f} "
            f"| {r['ort_batch1']:.1f} | {r['ort_batch1_per_core']:.1f} "
            f"| {r['ort_best']:.1f} ({r['ort_best_batch']}) | {r['torch_batch1']:.1f} "
            f"| {r['torch_best']:.1f} | {r['speedup_batch1']:.2f}x | {r['speedup_best']:.2f}x "
            f"| {100 * r['fraction_of_matmul']:.0f}% |"
        )
    lines += [
        "",
        "Every configuration (images/s):",
        "",
        "| model | engine | threads | batch | img/s |",
        "|---|---|---:|---:|---:|",
    ]
    for t in results:
        lines.append(f"| {t.model} | {t.engine} | {t.threads} | {t.batch} | {t.images_per_s:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Throughput], path: Path) -> None:
    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4))
    for axis, model in zip(np.atleast_1d(axes), models, strict=True):
        for engine, style in (("onnxruntime", "-"), ("torch eager", "--")):
            for threads in sorted({r.threads for r in results}):
                points = [
                    r for r in results if (r.model, r.engine, r.threads) == (model, engine, threads)
                ]
                axis.plot(
                    [p.batch for p in points],
                    [p.images_per_s for p in points],
                    style,
                    marker="o",
                    label=f"{engine}, {threads} thr",
                )
        axis.set_title(model, fontsize=9)
        axis.set_xlabel("batch")
        axis.set_ylabel("images/s")
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models-dir", type=Path, help="reuse models built here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="filmless-inference-") as scratch:
        models_dir = args.models_dir or Path(scratch)
        results = measure(models_dir, args.seconds, args.threads)
    meta = run_facts("benchmarks.inference", arguments) | {
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }
    rows = summary(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": rows,
                "results": [
                    asdict(r) | {"fraction_of_matmul": r.fraction_of_matmul} for r in results
                ],
            },
            indent=2,
        )
    )
    (args.out / "inference.md").write_text(markdown(rows, results, meta))
    plot(results, args.out / "inference.png")
    table = Table(title="inference (images/s)")
    for column in ("model", "thr", "ORT b1", "ORT best", "torch b1", "ORT/torch b1", "of peak"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["model"],
            str(r["threads"]),
            f"{r['ort_batch1']:.1f}",
            f"{r['ort_best']:.1f} (b{r['ort_best_batch']})",
            f"{r['torch_batch1']:.1f}",
            f"{r['speedup_batch1']:.2f}x",
            f"{100 * r['fraction_of_matmul']:.0f}%",
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
