"""DICOMweb: QIDO-RS latency, WADO-RS study retrieve throughput and memory, rendered latency.

* QIDO-RS: ``/studies`` by PatientID, by StudyDate range and by wildcard PatientName,
  against an index of N generated instances (the rows of ``benchmarks.query``); p50/p95
  over R requests on one keep-alive connection.
* WADO-RS: one study of full-size 2500x2048 16-bit chest X-rays (``--study-mb``),
  retrieved as stored (``transfer-syntax=*``) and as Explicit VR Little Endian; MB/s of
  the body read by the client, and the server's peak RSS (VmHWM) before and after.
* Rendered: ``/rendered`` (image/jpeg) of one of those chest X-rays, and of the same
  image stored JPEG-LS lossless; p50/p95 over R requests.

Each filmless measurement runs ``filmless serve`` as a separate process, as deployed.
With Orthanc and its DICOMweb plugin installed, the same requests go to an Orthanc
loaded through its REST API; the run then happens in a private network namespace.

    python -m benchmarks.dicomweb --sizes 10000 100000 --repeats 200 --study-mb 2048
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import pydicom
from pydicom.uid import JPEGLSLossless
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from benchmarks.ingest import ORTHANC_PLUGINS, FilmlessServer, OrthancServer, make_large
from benchmarks.query import _orthanc_corpus, fill_index
from benchmarks.support import (
    free_port,
    in_private_network,
    rerun_in_private_network,
    run_facts,
)
from pacs.archive import Archive
from pacs.index import Index
from pacs.store import FsBlobStore

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
DICOMWEB_PLUGIN = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"
console = Console(stderr=True)

QIDO_QUERIES = {
    "PatientID": "PatientID=PID0000042",
    "date range": "StudyDate=20240301-20240307",
    "wildcard name": "PatientName=Kowalski2*",  # present at every size (see benchmarks.query)
}
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
UNCOMPRESSED = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'


@dataclass
class Latency:
    server: str
    what: str
    size: int
    matches: int
    p50_ms: float
    p95_ms: float
    max_ms: float


@dataclass
class Retrieve:
    server: str
    accept: str
    instances: int
    megabytes: float
    seconds: float
    rss_before_mb: float
    rss_peak_mb: float

    @property
    def megabytes_per_s(self) -> float:
        return self.megabytes / self.seconds


def _latency(server: str, what: str, size: int, matches: int, timings: list[float]) -> Latency:
    ordered = sorted(timings)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return Latency(
        server, what, size, matches, statistics.median(ordered) * 1e3, p95 * 1e3, ordered[-1] * 1e3
    )


def _peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


@contextmanager
def filmless_serving(data_dir: Path) -> Iterator[tuple[str, int]]:
    """``filmless serve`` on loopback; yields (DICOMweb base URL, pid)."""
    server = FilmlessServer(dimse_workers="1", max_find_matches="100000")
    with server.running(data_dir, free_port()):
        yield f"http://127.0.0.1:{server.http_port}/dicom-web", server.pid


@contextmanager
def orthanc_serving(binary: str, folder: Path) -> Iterator[tuple[str, int, OrthancServer]]:
    orthanc = OrthancServer(binary, plugins=[str(DICOMWEB_PLUGIN)])
    with orthanc.running(folder, free_port()):
        pid = int(
            subprocess.run(
                ["pgrep", "-n", "-f", str(folder / "orthanc.json")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        )
        yield f"http://127.0.0.1:{orthanc.http_port}/dicom-web", pid, orthanc


def qido(client: httpx.Client, base: str, query: str, repeats: int) -> tuple[int, list[float]]:
    url = f"{base}/studies?{query}"
    matches = len(client.get(url).json())
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        response = client.get(url, headers={"Accept": "application/dicom+json"})
        response.raise_for_status()
        response.read()
        timings.append(time.perf_counter() - start)
    return matches, timings


def retrieve(base: str, study: str, accept: str, pid: int, server: str) -> Retrieve:
    rss_before, _ = _peak_rss_mb(pid)
    received = 0
    parts = 0
    start = time.perf_counter()
    with (
        httpx.Client(timeout=600) as client,
        client.stream("GET", f"{base}/studies/{study}", headers={"Accept": accept}) as answer,
    ):
        answer.raise_for_status()
        for chunk in answer.iter_raw(1 << 20):
            received += len(chunk)
            parts += chunk.count(b"Content-Type: application/dicom")
    seconds = time.perf_counter() - start
    _, peak = _peak_rss_mb(pid)
    label = "as stored" if accept == AS_STORED else "explicit VR LE"
    return Retrieve(server, label, parts, received / 1e6, seconds, rss_before, peak)


def rendered(client: httpx.Client, url: str, repeats: int) -> list[float]:
    # One untimed request first: the first decode loads codec libraries on either server.
    client.get(url, headers={"Accept": "image/jpeg"}).raise_for_status()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        response = client.get(url, headers={"Accept": "image/jpeg"})
        response.raise_for_status()
        timings.append(time.perf_counter() - start)
    return timings


def _instance_url(base: str, path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (
        f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _jpeg_ls_copy(source: Path, target: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    ds.save_as(target, enforce_file_format=True)
    return target


def measure_wado(
    server: str, base: str, pid: int, *, files: list[Path], extra: Path, repeats: int
) -> tuple[list[Retrieve], list[Latency]]:
    """The study retrieved both ways, then the rendered chest X-ray, uncompressed and JPEG-LS."""
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    retrieves = [retrieve(base, study, accept, pid, server) for accept in (AS_STORED, UNCOMPRESSED)]
    latencies = []
    with httpx.Client(timeout=60) as client:
        for label, path in (("uncompressed", files[0]), ("JPEG-LS", extra)):
            timings = rendered(client, _instance_url(base, path) + "/rendered", repeats)
            latencies.append(_latency(server, f"rendered CXR {label}", 1, 1, timings))
    return retrieves, latencies


def run_filmless_qido(work: Path, size: int, repeats: int) -> list[Latency]:
    folder = work / f"qido-{size}"
    index = Index(f"sqlite:///{(folder / 'index.sqlite').resolve()}")
    folder.mkdir(parents=True)
    index.create_schema()
    with console.status(f"filling the index with {size} instances"):
        fill_index(index, size)
    index.dispose()
    results = []
    with filmless_serving(folder) as (base, _pid), httpx.Client(timeout=60) as client:
        for name, query in QIDO_QUERIES.items():
            matches, timings = qido(client, base, query, repeats)
            results.append(_latency("filmless", f"QIDO {name}", size, matches, timings))
    shutil.rmtree(folder, ignore_errors=True)
    return results


def run_filmless_wado(
    files: list[Path], extra: Path, work: Path, repeats: int
) -> tuple[list[Retrieve], list[Latency]]:
    folder = work / "wado"
    folder.mkdir()
    index = Index(f"sqlite:///{(folder / 'index.sqlite').resolve()}")
    index.create_schema()
    archive = Archive(FsBlobStore(folder), index)
    with console.status(f"importing {len(files) + 1} instances"):
        for path in [*files, extra]:
            archive.ingest_file(path)
    index.dispose()
    with filmless_serving(folder) as (base, pid):
        measured = measure_wado("filmless", base, pid, files=files, extra=extra, repeats=repeats)
    shutil.rmtree(folder, ignore_errors=True)
    return measured


def _post_to_orthanc(http_port: int, files: list[Path], progress: Progress) -> None:
    """Over REST, four requests at a time: the index holds as many instances as
    filmless's at each size in minutes, not hours."""
    task = progress.add_task("loading Orthanc over REST", total=len(files))
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:

        def post(path: Path) -> None:
            response = client.post(
                f"http://127.0.0.1:{http_port}/instances", content=path.read_bytes()
            )
            response.raise_for_status()
            progress.advance(task)

        for _ in pool.map(post, files):
            pass


def run_orthanc(
    binary: str,
    work: Path,
    *,
    qido_sizes: list[int],
    files: list[Path],
    extra: Path,
    repeats: int,
    render_repeats: int,
) -> tuple[list[Latency], list[Retrieve]]:
    latencies: list[Latency] = []
    retrieves: list[Retrieve] = []
    for qido_size in qido_sizes:
        small = _orthanc_corpus(work / f"orthanc-qido-in-{qido_size}", qido_size)
        with orthanc_serving(binary, work / "orthanc-qido") as (base, _pid, orthanc):
            with Progress(console=console) as progress:
                _post_to_orthanc(orthanc.http_port, small, progress)
            with httpx.Client(timeout=60) as client:
                for name, query in QIDO_QUERIES.items():
                    matches, timings = qido(client, base, query, repeats)
                    latencies.append(
                        _latency("orthanc", f"QIDO {name}", qido_size, matches, timings)
                    )
        shutil.rmtree(work / "orthanc-qido", ignore_errors=True)
    with orthanc_serving(binary, work / "orthanc-wado") as (base, pid, orthanc):
        with Progress(console=console) as progress:
            _post_to_orthanc(orthanc.http_port, [*files, extra], progress)
        retrieved, rendered_latency = measure_wado(
            "orthanc", base, pid, files=files, extra=extra, repeats=render_repeats
        )
    shutil.rmtree(work / "orthanc-wado", ignore_errors=True)
    return latencies + rendered_latency, retrieves + retrieved


def markdown(latencies: list[Latency], retrieves: list[Retrieve], meta: dict[str, Any]) -> str:
    lines = [
        "# DICOMweb",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}.",
        "",
        "## Latency",
        "",
        "| server | request | instances | matches | p50 ms | p95 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in latencies:
        lines.append(
            f"| {r.server} | {r.what} | {r.size} | {r.matches} "
            f"| {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.max_ms:.1f} |"
        )
    lines += [
        "",
        "## WADO-RS study retrieve",
        "",
        "| server | transfer syntax | instances | MB | s | MB/s | RSS before MB | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for got in retrieves:
        lines.append(
            f"| {got.server} | {got.accept} | {got.instances} | {got.megabytes:.0f} "
            f"| {got.seconds:.1f} | {got.megabytes_per_s:.0f} | {got.rss_before_mb:.0f} "
            f"| {got.rss_peak_mb:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(latencies: list[Latency], retrieves: list[Retrieve], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[3, 1])
    labels = [
        f"{r.server}\n{r.what}\n{r.size // 1000}k" if r.size > 1 else f"{r.server}\n{r.what}"
        for r in latencies
    ]
    left.bar(labels, [r.p95_ms for r in latencies], color="#c0392b", label="p95")
    left.bar(labels, [r.p50_ms for r in latencies], color="#4a7bb7", label="p50")
    left.axhline(30, color="#333", linestyle="--", label="QIDO target 30 ms (p95)")
    left.axhline(150, color="#777", linestyle=":", label="rendered target 150 ms")
    left.set_ylabel("ms")
    left.legend(fontsize=7)
    left.tick_params(axis="x", labelsize=6)
    right.bar(
        [f"{r.server}\n{r.accept}" for r in retrieves],
        [r.megabytes_per_s for r in retrieves],
        color="#27ae60",
    )
    right.set_ylabel("WADO-RS study MB/s")
    right.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--study-mb", type=int, default=2048, help="size of the WADO-RS study")
    parser.add_argument("--orthanc", choices=["auto", "no"], default="auto")
    parser.add_argument(
        "--orthanc-qido",
        type=int,
        nargs="*",
        help="index sizes at which Orthanc answers QIDO-RS (default: every one of --sizes)",
    )
    parser.add_argument("--work-dir", type=Path, help="where data is written (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]

    orthanc_binary = shutil.which("Orthanc") if args.orthanc == "auto" else None
    if orthanc_binary and not DICOMWEB_PLUGIN.exists():
        console.print(
            "Orthanc has no DICOMweb plugin (apt-get install orthanc-dicomweb): skipping it"
        )
        orthanc_binary = None
    if orthanc_binary and not in_private_network():
        status = rerun_in_private_network("benchmarks.dicomweb", arguments)
        if status is not None:
            return status
        console.print("Orthanc needs a private network namespace (root): skipping it")
        orthanc_binary = None

    work = Path(tempfile.mkdtemp(prefix="filmless-dicomweb-", dir=args.work_dir))
    latencies: list[Latency] = []
    retrieves: list[Retrieve] = []
    try:
        for size in args.sizes:
            latencies += run_filmless_qido(work, size, args.repeats)
        count = max(1, round(args.study_mb * 1e6 / (2500 * 2048 * 2)))
        with console.status(f"writing a study of {count} chest X-rays"):
            study = make_large(work / "study", count)
            extra = _jpeg_ls_copy(study.files[0], work / "study-jpeg-ls.dcm")
        render_repeats = max(20, args.repeats // 4)
        retrieved, rendered_latency = run_filmless_wado(study.files, extra, work, render_repeats)
        retrieves += retrieved
        latencies += rendered_latency
        if orthanc_binary:
            try:
                more, retrieved = run_orthanc(
                    orthanc_binary,
                    work,
                    qido_sizes=args.sizes if args.orthanc_qido is None else args.orthanc_qido,
                    files=study.files,
                    extra=extra,
                    repeats=args.repeats,
                    render_repeats=render_repeats,
                )
                latencies += more
                retrieves += retrieved
            except (RuntimeError, subprocess.SubprocessError, httpx.HTTPError) as exc:
                console.print(f"[red]Orthanc run failed:[/red] {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = run_facts("benchmarks.dicomweb", arguments) | {"repeats": args.repeats}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": meta,
        "latency": [asdict(r) for r in latencies],
        "retrieve": [asdict(r) | {"megabytes_per_s": r.megabytes_per_s} for r in retrieves],
    }
    (args.out / "dicomweb.json").write_text(json.dumps(result, indent=2))
    (args.out / "dicomweb.md").write_text(markdown(latencies, retrieves, meta))
    plot(latencies, retrieves, args.out / "dicomweb.png")
    table = Table(title="DICOMweb")
    for column in ("server", "request", "instances", "p50 ms", "p95 ms"):
        table.add_column(column)
    for r in latencies:
        table.add_row(r.server, r.what, str(r.size), f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}")
    console.print(table)
    retrieve_table = Table(title="WADO-RS study retrieve")
    for column in ("server", "syntax", "MB", "MB/s", "peak RSS MB"):
        retrieve_table.add_column(column)
    for got in retrieves:
        retrieve_table.add_row(
            got.server,
            got.accept,
            f"{got.megabytes:.0f}",
            f"{got.megabytes_per_s:.0f}",
            f"{got.rss_peak_mb:.0f}",
        )
    console.print(retrieve_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
