"""C-FIND latency at STUDY level: by PatientID, by date range, by wildcard name.

The index is filled with generated rows (patients, studies of two series of ten
instances, names and dates spread out) straight through SQL, at each size asked for.
``filmless serve`` (one DIMSE worker) answers over loopback. Each query runs once to warm
up and then R times on one association, with two SCUs: dcmtk's findscu (C, timed from its
own log) and pynetdicom (timed in Python, so its own per-response cost is part of the
figure). We report p50/p95/max in milliseconds.

With Orthanc installed and ``--orthanc``, the same queries run against an Orthanc
holding the same instances at every size (the same patients, names, dates and UIDs,
sent by four storescu processes), so that each query matches the same studies in
both; the table says where the counts differ. Orthanc runs as in
:mod:`benchmarks.ingest` (``TCP_NODELAY=1``, its configuration printed with the results).

    python -m benchmarks.query --sizes 3000 100000 --repeats 200 --orthanc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from rich.console import Console
from rich.table import Table
from sqlalchemy import insert

from benchmarks.ingest import FilmlessServer, OrthancServer, send
from benchmarks.support import free_port, in_private_network, no_delay, rerun_in_private_network
from pacs.dimse.reactor import MendedAE
from pacs.header import normalise_name
from pacs.index import Index, instance, patient, patient_key, series, study

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)

FAMILY = [
    "Smith",
    "Müller",
    "Nguyen",
    "Garcia",
    "Kowalski",
    "Tanaka",
    "Okafor",
    "Rossi",
    "Dubois",
    "Larsen",
]
GIVEN = ["Anna", "Jürgen", "Lan", "Maria", "Piotr", "Yuki", "Chidi", "Luca", "Amélie", "Sofie"]
INSTANCES_PER_STUDY = 20


@dataclass
class Latency:
    server: str
    size: int
    query: str
    matches: int
    p50_ms: float
    p95_ms: float
    max_ms: float


def fill_index(index: Index, instances: int, seed: int = 0) -> None:
    """Generated rows, consistent counters, inserted in bulk."""
    rng = np.random.default_rng(seed)
    studies = max(1, instances // INSTANCES_PER_STUDY)
    patients = max(1, studies // 3)
    start = datetime(2023, 1, 1)
    now = datetime.now(UTC)
    people = [
        {
            "PatientID": f"PID{p:07d}",
            "IssuerOfPatientID": "",
            "PatientName": (name := f"{FAMILY[p % 10]}{p // 10}^{GIVEN[(p * 7) % 10]}"),
            "PatientNameSearch": normalise_name(name),
            "PatientBirthDate": "19700101",
            "PatientSex": "FMO"[p % 3],
        }
        for p in range(patients)
    ]
    with index.writer.begin() as conn:
        conn.execute(
            insert(patient),
            [
                {
                    "id": p + 1,
                    "PatientKey": patient_key(person["PatientID"], "", ""),
                    **person,
                    "NumberOfPatientRelatedStudies": studies // patients,
                    "NumberOfPatientRelatedSeries": 2 * studies // patients,
                    "NumberOfPatientRelatedInstances": INSTANCES_PER_STUDY * studies // patients,
                }
                for p, person in enumerate(people)
            ],
        )
        study_rows, series_rows, instance_rows = [], [], []
        for s in range(studies):
            day = start + timedelta(days=int(rng.integers(0, 3 * 365)))
            modality = ["CT", "MR", "DX", "MG"][s % 4]
            study_rows.append(
                {
                    "id": s + 1,
                    "patient_id": s % patients + 1,
                    **people[s % patients],
                    "StudyInstanceUID": f"2.25.{s + 1}",
                    "StudyDate": day.strftime("%Y%m%d"),
                    "StudyTime": f"{8 + s % 10:02d}0000",
                    "AccessionNumber": f"ACC{s:08d}",
                    "StudyID": str(s),
                    "StudyDescription": "BENCH",
                    "ReferringPhysicianName": "",
                    "ReferringPhysicianNameSearch": "",
                    "TimezoneOffsetFromUTC": "",
                    "ModalitiesInStudy": modality,
                    "NumberOfStudyRelatedSeries": 2,
                    "NumberOfStudyRelatedInstances": INSTANCES_PER_STUDY,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            for k in range(2):
                series_id = s * 2 + k + 1
                series_rows.append(
                    {
                        "id": series_id,
                        "study_id": s + 1,
                        "SeriesInstanceUID": f"2.25.{s + 1}.{k + 1}",
                        "Modality": modality,
                        "SeriesNumber": k + 1,
                        "NumberOfSeriesRelatedInstances": INSTANCES_PER_STUDY // 2,
                    }
                )
                for i in range(INSTANCES_PER_STUDY // 2):
                    instance_rows.append(
                        {
                            "series_id": series_id,
                            "SOPInstanceUID": f"2.25.{s + 1}.{k + 1}.{i + 1}",
                            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                            "InstanceNumber": i + 1,
                            "TransferSyntaxUID": "1.2.840.10008.1.2.1",
                            "size": 0,
                            "sha256": "0" * 64,
                            "path": "",
                            "received_at": now,
                        }
                    )
        conn.execute(insert(study), study_rows)
        conn.execute(insert(series), series_rows)
        for chunk in range(0, len(instance_rows), 20000):
            conn.execute(insert(instance), instance_rows[chunk : chunk + 20000])


def queries() -> dict[str, Callable[[], Dataset]]:
    def base() -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.PatientName = ""
        ds.StudyDate = ""
        ds.ModalitiesInStudy = ""
        ds.NumberOfStudyRelatedInstances = ""
        return ds

    def by_patient_id() -> Dataset:
        ds = base()
        ds.PatientID = "PID0000042"
        return ds

    def by_date_range() -> Dataset:
        ds = base()
        ds.StudyDate = "20240301-20240307"
        return ds

    def by_wildcard_name() -> Dataset:
        # Patient 24 is Kowalski2, present at every size: matches Kowalski2 and, as the
        # index grows, Kowalski20..29.
        ds = base()
        ds.PatientName = "Kowalski2*"
        return ds

    return {
        "PatientID": by_patient_id,
        "date range": by_date_range,
        "wildcard name": by_wildcard_name,
    }


def measure(
    port: int, ae_title: str, make: Callable[[], Dataset], repeats: int
) -> tuple[int, list[float]]:
    """pynetdicom as the SCU: one association, one warm-up query, then ``repeats`` timed."""
    ae = MendedAE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"association to {ae_title} refused")
    no_delay(assoc)
    timings, matches = [], 0
    try:
        for _ in range(repeats + 1):
            query = make()
            start = time.perf_counter()
            found = 0
            for status, _answer in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                if "Status" not in status:
                    raise RuntimeError(f"{ae_title} did not answer the C-FIND")
                if status.Status in (0xFF00, 0xFF01):
                    found += 1
                elif status.Status != 0:
                    raise RuntimeError(f"C-FIND failed: 0x{status.Status:04X}")
            timings.append((time.perf_counter() - start) * 1000)
            matches = found
    finally:
        assoc.release()
    return matches, timings[1:]


def findscu_args(query: Dataset) -> list[str]:
    """The same identifier as dcmtk ``-k`` options."""
    args = []
    for element in query:
        value = "" if element.value is None else str(element.value)
        args += ["-k", f"{element.keyword}={value}" if value else element.keyword]
    return args


# dcmtk logs with a wall-clock stamp in fractional milliseconds; each query is timed from
# "Sending Find Request" to "Received Final Find Response".
_DCMTK_LOG = """log4cplus.rootLogger = INFO, out
log4cplus.appender.out = log4cplus::ConsoleAppender
log4cplus.appender.out.layout = log4cplus::PatternLayout
log4cplus.appender.out.layout.ConversionPattern = %D{%s %Q} %m%n
"""


def measure_findscu(
    port: int, ae_title: str, make: Callable[[], Dataset], repeats: int, work: Path
) -> tuple[int, list[float]]:
    """dcmtk findscu as the SCU: one association, a warm-up query, then ``repeats`` timed.

    Nagle's algorithm is off (``TCP_NODELAY=1``, dcmtk's switch for it): otherwise
    findscu's request, a command PDU and a data set PDU, waits for a delayed ACK.
    """
    config = work / "findscu-log.cfg"
    config.write_text(_DCMTK_LOG)
    run = subprocess.run(
        [
            "findscu",
            "-S",
            "-lc",
            str(config),
            "--repeat",
            str(repeats + 1),
            "-aec",
            ae_title,
            *findscu_args(make()),
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )
    # Answers may be in any character set: decoded leniently, only log lines are read.
    lines = (run.stdout + run.stderr).decode("utf-8", "replace").splitlines()

    def stamps(text: str) -> list[float]:
        found = []
        for line in lines:
            if text in line:
                seconds, millis = line.split()[:2]
                found.append(int(seconds) * 1000 + float(millis))
        return found

    sent, final = stamps("Sending Find Request"), stamps("Received Final Find Response")
    if run.returncode != 0 or len(sent) != repeats + 1 or len(final) != repeats + 1:
        raise RuntimeError(f"findscu failed: {lines[-3:]}")
    pending = sum("(Pending)" in line for line in lines) // (repeats + 1)
    timings = [end - start for start, end in zip(sent, final, strict=True)]
    return pending, timings[1:]


def _summary(server: str, size: int, name: str, matches: int, timings: list[float]) -> Latency:
    ordered = sorted(timings)
    return Latency(
        server=server,
        size=size,
        query=name,
        matches=matches,
        p50_ms=statistics.median(ordered),
        p95_ms=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        max_ms=ordered[-1],
    )


def run_filmless(server: FilmlessServer, work: Path, size: int, repeats: int) -> list[Latency]:
    folder = work / f"filmless-{size}"
    folder.mkdir()
    index = Index(f"sqlite:///{folder / 'index.sqlite'}")
    index.create_schema()
    with console.status(f"filling the index with {size} instances"):
        fill_index(index, size)
    index.dispose()
    # The server runs as deployed, in a process of its own: an SCU in the same process
    # would share its interpreter lock and inflate every figure.
    port = free_port()
    with server.running(folder, port):
        return run_queries("filmless", server.ae_title, port, size=size, repeats=repeats, work=work)


def run_queries(
    server: str, ae_title: str, port: int, *, size: int, repeats: int, work: Path
) -> list[Latency]:
    """Every query with each SCU: dcmtk findscu where installed, and pynetdicom."""
    results = []
    for name, make in queries().items():
        if shutil.which("findscu"):
            matches, timings = measure_findscu(port, ae_title, make, repeats, work)
            results.append(_summary(f"{server} (findscu)", size, name, matches, timings))
        matches, timings = measure(port, ae_title, make, repeats)
        results.append(_summary(f"{server} (pynetdicom SCU)", size, name, matches, timings))
    return results


def _orthanc_corpus(folder: Path, count: int) -> list[Path]:
    """Small instances with the same patient, date and name spread as :func:`fill_index`."""
    folder.mkdir(parents=True)
    studies = max(1, count // INSTANCES_PER_STUDY)
    patients = max(1, studies // 3)
    rng = np.random.default_rng(0)
    start = datetime(2023, 1, 1)
    files = []
    for s in range(studies):
        p = s % patients
        day = start + timedelta(days=int(rng.integers(0, 3 * 365)))
        for i in range(INSTANCES_PER_STUDY):
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ds.SOPInstanceUID = f"2.25.{s + 1}.{i // 10 + 1}.{i % 10 + 1}"
            ds.StudyInstanceUID = f"2.25.{s + 1}"
            ds.SeriesInstanceUID = f"2.25.{s + 1}.{i // 10 + 1}"
            ds.PatientID = f"PID{p:07d}"
            ds.PatientName = f"{FAMILY[p % 10]}{p // 10}^{GIVEN[(p * 7) % 10]}"
            ds.StudyDate = day.strftime("%Y%m%d")
            ds.StudyTime = f"{8 + s % 10:02d}0000"
            ds.Modality = ["CT", "MR", "DX", "MG"][s % 4]
            ds.AccessionNumber = f"ACC{s:08d}"
            ds.InstanceNumber = i + 1
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"{s:06d}-{i:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def run_orthanc(orthanc: OrthancServer, work: Path, size: int, repeats: int) -> list[Latency]:
    folder = work / f"orthanc-{size}"
    files = _orthanc_corpus(work / f"orthanc-in-{size}", size)
    port = free_port()
    with orthanc.running(folder, port):
        with console.status(f"loading {len(files)} instances into Orthanc"):
            send(files, port, orthanc.ae_title, 4)
        return run_queries("orthanc", orthanc.ae_title, port, size=size, repeats=repeats, work=work)


def differing_matches(results: list[Latency]) -> list[str]:
    """Queries whose match counts differ between servers at one size."""
    found: dict[tuple[int, str], set[int]] = {}
    for r in results:
        found.setdefault((r.size, r.query), set()).add(r.matches)
    return [f"{query} at {size}" for (size, query), counts in found.items() if len(counts) > 1]


def markdown(results: list[Latency], meta: dict[str, Any]) -> str:
    lines = [
        "# C-FIND latency (STUDY level)",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; "
        f"{meta['repeats']} runs per query.",
        "",
        "| server | instances | query | matches | p50 ms | p95 ms | max ms |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.size} | {r.query} | {r.matches} "
            f"| {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.max_ms:.1f} |"
        )
    differing = differing_matches(results)
    lines += [
        "",
        "Match counts differ between servers: " + ", ".join(differing)
        if differing
        else "Every query matched the same number of studies on every server.",
        "",
        "Configurations:",
        "",
    ]
    for server, configuration in meta["servers"].items():
        described = "; ".join(f"{k}: {v}" for k, v in configuration.items() if v != "")
        lines.append(f"- {server}: {described}")
    return "\n".join(lines) + "\n"


def plot(results: list[Latency], path: Path) -> None:
    labels = [f"{r.server}\n{r.size // 1000}k\n{r.query}" for r in results]
    fig, axis = plt.subplots(figsize=(max(6, len(results) * 0.9), 4))
    axis.bar(labels, [r.p95_ms for r in results], color="#c0392b", label="p95")
    axis.bar(labels, [r.p50_ms for r in results], color="#4a7bb7", label="p50")
    axis.axhline(20, color="#333", linestyle="--", label="20 ms target (p95)")
    axis.set_ylabel("ms")
    axis.legend()
    axis.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--orthanc", action="store_true", help="also Orthanc, holding the same instances"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    orthanc_binary = shutil.which("Orthanc") if args.orthanc else None
    if orthanc_binary and not in_private_network():
        status = rerun_in_private_network("benchmarks.query", argv or sys.argv[1:])
        if status is not None:
            return status
        console.print("Orthanc needs a private network namespace (root): skipping it")
        orthanc_binary = None

    work = Path(tempfile.mkdtemp(prefix="filmless-query-"))
    results: list[Latency] = []
    filmless = FilmlessServer(dimse_workers="1", max_find_matches="100000")
    orthanc = OrthancServer(orthanc_binary) if orthanc_binary else None
    try:
        for size in args.sizes:
            results += run_filmless(filmless, work, size, args.repeats)
            if orthanc is not None:
                try:
                    results += run_orthanc(orthanc, work, size, args.repeats)
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    console.print(f"[red]Orthanc run failed:[/red] {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta: dict[str, Any] = {
        "command": "python -m benchmarks.query " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.python_version()})",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "servers": {
            server.name: server.configuration()
            for server in (filmless, orthanc)
            if server is not None
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "query.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)
    )
    (args.out / "query.md").write_text(markdown(results, meta))
    plot(results, args.out / "query.png")
    table = Table(title="C-FIND latency")
    for column in ("server", "instances", "query", "matches", "p50 ms", "p95 ms"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.server, str(r.size), r.query, str(r.matches), f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}"
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
