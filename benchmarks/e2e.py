"""End to end: C-STORE of a chest X-ray to its SR in QIDO-RS, and screening throughput.

Runs ``filmless serve`` (demo models, SQLite, local files) in its own process and
measures, from a modality's side over loopback:

- latency: from the C-STORE response of a frontal chest X-ray to the first QIDO-RS
  answer that lists its SR, idle (one study at a time) and at steady arrival rates;
- sustained: studies sent back to back per modality (chest X-ray, fundus pairs,
  four-view mammograms), from the first C-STORE to the last SR, in studies per minute;
  receiving the images shares the cores with screening them. Fundus pairs are measured
  twice: screened for diabetic retinopathy and glaucoma (two reports a study, one
  decode a photograph), and for DR alone;
- pipeline: the same studies archived first with screening paused (jobs queued), then
  screened by a server started on that archive: images per second over the middle 80%
  of the jobs (read, decode, preprocess, infer, write and store the report, record the
  job), by the server's own job times. It is compared with bare ONNX
  Runtime on ready tensors: one session on every core at its best batch, and one
  single-thread pass per core at a time;
- plain PyTorch eager on the same inputs.

    python -m benchmarks.e2e --scale 1.0 --latency 40 --rates 0 1 2 \\
        --studies chest-xray=200 fundus=60 mammography=30

Results: ``benchmarks/results/e2e.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import numpy as np
import onnxruntime
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, select

from benchmarks.inference import BATCHES, rate, run_eager
from benchmarks.ingest import FilmlessServer
from benchmarks.support import free_port, run_facts
from inference.runtime import cores
from models.architectures import Screening, backbone, demo_weights
from models.build import build_demo
from models.runtime import reference_sample, session
from models.store import ModelStore
from models.zoo import TASKS
from pacs.dimse.reactor import MendedAE
from pacs.index import job
from pacs.jobs import JobState
from pacs.part10 import read_file_meta
from scripts.synthetic_corpus import Patient, Rng, chest_dx, fundus_op, mammography

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)
POLL_SECONDS = 0.01
STUDIES = ("chest-xray", "fundus", "mammography")  # kinds of study sent (fundus: DR and glaucoma)


@dataclass
class Latency:
    rate_per_s: float  # 0 = idle: the next study is sent once the previous SR is there
    studies: int
    p50_s: float
    p95_s: float
    max_s: float
    values_s: list[float] = field(repr=False)


@dataclass
class Throughput:
    task: str
    model: str
    studies: int
    images: int
    seconds: float
    sending_s: float  # first C-STORE to the last C-STORE response
    studies_per_min: float
    images_per_s: float  # sustained, receiving included
    pipeline_images_per_s: float  # backlog: middle 80% of the jobs, by the job times
    ort_batch1: float
    ort_best: float
    ort_best_batch: int
    ort_parallel: float  # one single-thread pass per core at a time, batch 1
    torch_batch1: float
    torch_best: float

    @property
    def of_bare_ort(self) -> float:
        return self.pipeline_images_per_s / self.ort_best

    @property
    def of_parallel_ort(self) -> float:
        return self.pipeline_images_per_s / self.ort_parallel


def _patient() -> Patient:
    return Patient("E2EBENCH", "Bench^Screening", "ISO_IR 192", "19600101", "F")


def templates(scale: float) -> dict[str, list[Dataset]]:
    """One study per task at ``scale`` of the usual detector size (1.0: 2500x2048 chest,
    2048x2048 fundus, 3328x2560 mammograms)."""
    patient = _patient()
    frontal, _lateral = chest_dx(Rng(1), patient, scale, "20260401", "B1")
    return {
        "chest-xray": [frontal],
        "fundus": fundus_op(Rng(2), patient, scale, "20260401", "B2"),
        "mammography": mammography(Rng(3), patient, scale, "20260401", "B3"),
    }


def clone(study: list[Dataset], folder: Path, number: int) -> tuple[str, list[Path]]:
    """The same images as a new study (new UIDs), written as Part 10 files to send."""
    uid = generate_uid()
    series: dict[str, str] = {}
    paths = []
    for n, source in enumerate(study):
        ds = copy.copy(source)  # shallow: the pixel data is shared, only UIDs change
        ds.StudyInstanceUID = uid
        ds.SeriesInstanceUID = series.setdefault(source.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.AccessionNumber = f"B{number}"
        path = folder / f"{number:05d}-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return uid, paths


def store(port: int, paths: list[Path]) -> float:
    """One association per study, as a modality does; the time of the last response."""
    ae = MendedAE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    contexts = set()
    for path in paths:
        with path.open("rb") as stream:
            meta = read_file_meta(stream)
        contexts.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
    if not assoc.is_established:
        raise RuntimeError("the server refused the association")
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0:
                raise RuntimeError(f"C-STORE of {path.name} failed: {status}")
        return time.perf_counter()
    finally:
        assoc.release()


def reports(client: httpx.Client, base: str, study: str | None = None) -> int:
    """How many SR instances QIDO-RS lists (in one study, or in all)."""
    url = f"{base}/studies/{study}/instances" if study else f"{base}/instances"
    response = client.get(url, params={"Modality": "SR"})
    response.raise_for_status()
    return len(response.json()) if response.content else 0


def measure_latency(
    port: int, base: str, studies: list[tuple[str, list[Path]]], rate_per_s: float
) -> Latency:
    """C-STORE response to SR listed; arrivals every 1/rate s (or one at a time)."""
    stored: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set() or len(seen) < len(stored):
                for uid, at in list(stored.items()):
                    if uid not in seen and reports(client, base, uid):
                        seen[uid] = time.perf_counter() - at
                time.sleep(POLL_SECONDS)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    for n, (uid, paths) in enumerate(studies):
        if rate_per_s > 0:
            time.sleep(max(0.0, start + n / rate_per_s - time.perf_counter()))
        stored[uid] = store(port, paths)
        if rate_per_s == 0:
            while uid not in seen:
                time.sleep(POLL_SECONDS)
            time.sleep(0.2)  # idle between studies
    done.set()
    poller.join(timeout=600)
    values = [seen[uid] for uid, _ in studies]
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else 0
    return Latency(
        rate_per_s, len(values), statistics.median(values), p95 or max(values), max(values), values
    )


def measure_throughput(
    port: int, base: str, studies: list[tuple[str, list[Path]]], expected: int
) -> tuple[float, float]:
    """Seconds from the first C-STORE to the last SR listed, and to the last response."""
    start = time.perf_counter()
    sent = 0.0
    for _uid, paths in studies:
        sent = store(port, paths)
    with httpx.Client(timeout=30) as client:
        while reports(client, base) < expected:
            time.sleep(0.05)
    return time.perf_counter() - start, sent - start


def measure_backlog(
    models_dir: Path,
    settings: dict[str, str],
    folder: Path,
    studies: list[tuple[str, list[Path]]],
    jobs: int,
) -> tuple[int, float]:
    """Archive ``studies`` with screening paused (their jobs wait in the index), then
    start a server with workers on that archive and wait until every job is done.

    Returns jobs and seconds over the middle 80% of the jobs by the times the server
    recorded them done: the first ones include loading the model, and at either end
    several workers hold jobs begun earlier, which with few long (study-level) jobs
    would count work twice or not at all.
    """
    paused = FilmlessServer(models_dir=str(models_dir), **(settings | {"inference_workers": "0"}))
    port = free_port()
    with paused.running(folder, port):
        for _uid, paths in studies:
            store(port, paths)
    working = FilmlessServer(models_dir=str(models_dir), **settings)
    with working.running(folder, free_port()):
        while len(finished := job_times(folder)) < jobs:
            time.sleep(0.2)
    first, last = len(finished) // 10, len(finished) - 1 - len(finished) // 10
    return last - first, (finished[last] - finished[first]).total_seconds()


def job_times(folder: Path) -> list[datetime]:
    """When each done screening job was recorded as done, in order."""
    engine = create_engine(f"sqlite:///{folder / 'index.sqlite'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(job.c.updated_at).where(job.c.state == JobState.DONE))
            return sorted(row.updated_at for row in rows)
    finally:
        engine.dispose()


def parallel_rate(model: Path, feed: dict[str, np.ndarray], runs: int, seconds: float) -> float:
    """Images/s of ``runs`` single-thread passes at a time on one session (batch 1)."""
    runtime = session(model, threads=1)
    runtime.run(None, feed)
    counts = [0] * runs
    stop = time.perf_counter() + seconds

    def loop(n: int) -> None:
        while time.perf_counter() < stop:
            runtime.run(None, feed)
            counts[n] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(n,)) for n in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def bare_engines(models_dir: Path, task_name: str, seconds: float) -> dict[str, float | int]:
    """Images/s of the model outside the server: ONNX Runtime and torch eager, every core."""
    task = TASKS[task_name]
    model = ModelStore(models_dir).get(task.name)
    single = reference_sample(task.input, task.preprocessing, batch=1)
    parallel = parallel_rate(model.onnx, {task.input.name: single}, cores(), seconds)
    runtime = session(model.onnx, threads=0)
    module = Screening(task, backbone(task))
    demo_weights(module, task, task.seed)
    module.eval()
    ort: dict[int, float] = {}
    eager: dict[int, float] = {}
    for batch in BATCHES:
        data = reference_sample(task.input, task.preprocessing, batch=batch)
        ort[batch] = rate(partial(runtime.run, None, {task.input.name: data}), batch, seconds)
        eager[batch] = rate(partial(run_eager, module, torch.from_numpy(data)), batch, seconds)
    best = max(ort, key=lambda b: ort[b])
    return {
        "ort_batch1": ort[1],
        "ort_best": ort[best],
        "ort_best_batch": best,
        "ort_parallel": parallel,
        "torch_batch1": eager[1],
        "torch_best": max(eager.values()),
    }


def run(args: argparse.Namespace, work: Path) -> tuple[list[Latency], list[Throughput]]:
    models_dir = args.models_dir or work / "models"
    for task in TASKS.values():
        with console.status(f"building {task.name}"):
            build_demo(models_dir, task)
    with console.status("generating images"):
        studies = templates(args.scale)
    settings = {
        "study_stable_seconds": str(args.stable_seconds),
        "inference_workers": str(args.inference_workers),
        "dimse_workers": "1",
    }
    latencies = []
    for rate_per_s in args.rates:
        folder = work / f"latency-{rate_per_s}"
        folder.mkdir()
        sent = [clone(studies["chest-xray"], folder, n) for n in range(args.latency)]
        server, port = FilmlessServer(models_dir=str(models_dir), **settings), free_port()
        with server.running(work / f"data-latency-{rate_per_s}", port):
            base = f"http://127.0.0.1:{server.http_port}/dicom-web"
            warm = clone(studies["chest-xray"], folder, 99999)
            measure_latency(port, base, [warm], 0)  # model loaded, caches warm
            with console.status(f"latency at {rate_per_s or 'idle'} study/s"):
                result = measure_latency(port, base, sent, rate_per_s)
        latencies.append(result)
        console.print(
            f"latency {rate_per_s or 'idle'}: p50 {result.p50_s:.3f} s, p95 {result.p95_s:.3f} s"
        )
    throughputs = []
    # Fundus studies are screened for diabetic retinopathy and glaucoma: measured with
    # both models and with DR alone (every model but glaucoma), to see what the second
    # model costs.
    dr_alone = work / "models-dr-alone"
    for task in TASKS.values():
        if task.task != "glaucoma":
            shutil.copytree(models_dir / task.name, dr_alone / task.name)
    runs = []
    for name, count in args.studies.items():
        runs.append((name, name, count, models_dir))
        if name == "fundus":
            runs[-1] = (name, "fundus+glaucoma", count, models_dir)
            runs.append((name, "fundus", count, dr_alone))
    for name, label, count, models in runs:
        task = TASKS[name]
        folder = work / f"throughput-{label}"
        folder.mkdir()
        sent = [clone(studies[name], folder, n) for n in range(count)]
        # Reports per study: one per image (chest), else one per model of the exam.
        models_of_exam = 2 if label == "fundus+glaucoma" else 1
        per_study = models_of_exam if task.routing.level == "study" else len(studies[name])
        server, port = FilmlessServer(models_dir=str(models), **settings), free_port()
        with server.running(work / f"data-{label}", port):
            base = f"http://127.0.0.1:{server.http_port}/dicom-web"
            warm = clone(studies[name], folder, 99999)
            store(port, warm[1])
            with httpx.Client() as client:
                while reports(client, base) < per_study:
                    time.sleep(0.05)
            with console.status(f"throughput {label}: {count} studies"):
                seconds, sending = measure_throughput(port, base, sent, per_study * (count + 1))
        with console.status(f"pipeline {label}: a backlog of {count} studies"):
            done, backlog_s = measure_backlog(
                models, settings, work / f"backlog-{label}", sent, per_study * count
            )
        # Images read per job: a study's photographs, once per model of the exam.
        images_per_job = len(studies[name]) if task.routing.level == "study" else 1
        with console.status(f"bare engines {name}"):
            bare = bare_engines(models_dir, name, args.seconds)
        images = count * len(studies[name])
        measured = Throughput(
            label,
            task.name if label != "fundus+glaucoma" else f"{task.name} + {TASKS['glaucoma'].name}",
            count,
            images,
            seconds,
            sending,
            60 * count / seconds,
            images / seconds,
            done * images_per_job / backlog_s / models_of_exam,
            **bare,  # type: ignore[arg-type]
        )
        throughputs.append(measured)
        console.print(
            f"{label}: sustained {measured.studies_per_min:.1f} studies/min; pipeline "
            f"{measured.pipeline_images_per_s:.2f} img/s = {100 * measured.of_bare_ort:.0f}% "
            f"of bare ORT ({measured.ort_best:.2f}), {100 * measured.of_parallel_ort:.0f}% of "
            f"parallel passes ({measured.ort_parallel:.2f})"
        )
    return latencies, throughputs


def markdown(latencies: list[Latency], throughputs: list[Throughput], meta: dict[str, Any]) -> str:
    lines = [
        "# End to end: C-STORE to SR",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; onnxruntime "
        f"{meta['onnxruntime']}, torch {meta['torch']}; image scale {meta['scale']}.",
        "",
        "## Chest X-ray: C-STORE response to SR listed by QIDO-RS",
        "",
        "| arrivals | studies | p50 s | p95 s | max s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in latencies:
        arrivals = "idle (one at a time)" if r.rate_per_s == 0 else f"{r.rate_per_s:g} study/s"
        lines.append(
            f"| {arrivals} | {r.studies} | {r.p50_s:.3f} | {r.p95_s:.3f} | {r.max_s:.3f} |"
        )
    lines += [
        "",
        "## Sustained screening, studies sent back to back",
        "",
        "| task | model | studies | images | sending s | to last SR s | studies/min | img/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in throughputs:
        lines.append(
            f"| {t.task} | {t.model} | {t.studies} | {t.images} | {t.sending_s:.1f} | "
            f"{t.seconds:.1f} | {t.studies_per_min:.1f} | {t.images_per_s:.2f} |"
        )
    lines += [
        "",
        "From the first C-STORE to the last SR: receiving the images (over loopback, from "
        "a pynetdicom SCU in the benchmark's own process) shares the cores with screening "
        "them; fundus and mammography (exams) include the last study's "
        f"{meta['stable_seconds']} s stability wait.",
        "",
        "## Pipeline against bare ONNX Runtime",
        "",
        "| task | pipeline img/s | bare ORT best img/s (batch) | pipeline / bare | "
        "parallel passes img/s | pipeline / parallel | ORT b1 | torch eager b1 | torch best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in throughputs:
        lines.append(
            f"| {t.task} | {t.pipeline_images_per_s:.2f} | {t.ort_best:.2f} "
            f"(b{t.ort_best_batch}) | {100 * t.of_bare_ort:.0f}% | {t.ort_parallel:.2f} | "
            f"{100 * t.of_parallel_ort:.0f}% | {t.ort_batch1:.2f} | {t.torch_batch1:.2f} | "
            f"{t.torch_best:.2f} |"
        )
    lines += [
        "",
        "Pipeline: the studies archived with screening paused, then a server started on "
        "that archive screens the backlog; images per second over the middle 80% of the "
        "jobs, by the times the server recorded them done. Each image is read from the archive, "
        "decoded, preprocessed, run, reported on (TID 1500 SR) and the report stored. Bare "
        "ORT: ready tensors, one session on every core at its best batch; parallel passes: "
        "one single-thread pass per core at a time, batch 1.",
        "",
    ]
    return "\n".join(lines)


def plot(latencies: list[Latency], throughputs: list[Throughput], path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in latencies:
        label = "idle" if r.rate_per_s == 0 else f"{r.rate_per_s:g}/s"
        left.plot(sorted(r.values_s), np.linspace(0, 1, len(r.values_s)), label=label)
    left.axvline(1.5, color="grey", linestyle=":", label="target p95")
    left.set_xlabel("C-STORE response to SR listed (s)")
    left.set_ylabel("fraction of studies")
    left.legend()
    names = [t.task for t in throughputs]
    x = np.arange(len(names))
    bars = (
        ("sustained, receiving included", [t.images_per_s for t in throughputs]),
        ("pipeline (backlog)", [t.pipeline_images_per_s for t in throughputs]),
        ("bare ORT, best batch", [t.ort_best for t in throughputs]),
        ("bare ORT, parallel passes", [t.ort_parallel for t in throughputs]),
    )
    for n, (label, values) in enumerate(bars):
        right.bar(x + (n - 1.5) * 0.2, values, 0.2, label=label)
    right.set_xticks(x, names)
    right.set_ylabel("images/s")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _studies(values: list[str]) -> dict[str, int]:
    out = {}
    for value in values:
        name, _, count = value.partition("=")
        if name not in STUDIES or not count.isdigit():
            raise argparse.ArgumentTypeError(f"{value!r}: expected KIND=COUNT, KIND in {STUDIES}")
        out[name] = int(count)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scale", type=float, default=1.0, help="of the usual image sizes")
    parser.add_argument("--latency", type=int, default=40, help="chest X-rays per rate")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument(
        "--studies", nargs="+", default=["chest-xray=200", "fundus=60", "mammography=30"]
    )
    parser.add_argument("--stable-seconds", type=float, default=1.0)
    parser.add_argument("--inference-workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="per bare-engine setting")
    parser.add_argument("--models-dir", type=Path, help="reuse models built here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        args.studies = _studies(args.studies)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    arguments = argv if argv is not None else sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="filmless-e2e-") as scratch:
        latencies, throughputs = run(args, Path(scratch))
    meta = run_facts("benchmarks.e2e", arguments) | {
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "scale": args.scale,
        "stable_seconds": args.stable_seconds,
        "inference_workers": args.inference_workers,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "latency": [asdict(r) for r in latencies],
                "throughput": [
                    asdict(t) | {"of_bare_ort": t.of_bare_ort, "of_parallel_ort": t.of_parallel_ort}
                    for t in throughputs
                ],
            },
            indent=2,
        )
    )
    (args.out / "e2e.md").write_text(markdown(latencies, throughputs, meta))
    plot(latencies, throughputs, args.out / "e2e.png")
    table = Table(title="end to end")
    for column in ("what", "value"):
        table.add_column(column)
    for r in latencies:
        table.add_row(
            f"CXR latency {r.rate_per_s or 'idle'}", f"p50 {r.p50_s:.3f} s, p95 {r.p95_s:.3f} s"
        )
    for t in throughputs:
        table.add_row(
            f"{t.task} throughput",
            f"sustained {t.studies_per_min:.1f} studies/min; pipeline "
            f"{t.pipeline_images_per_s:.2f} img/s ({100 * t.of_bare_ort:.0f}% of bare ORT, "
            f"{100 * t.of_parallel_ort:.0f}% of parallel passes)",
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
