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

QIDO-RS runs the same queries over HTTP (one kept-alive connection), and also OHIF's
study list. With ``--index postgresql`` the index lives in a PostgreSQL server started
on loopback, filled with COPY, and the report shows PostgreSQL's plan of every query:

    python -m benchmarks.query --sizes 3000 100000 --repeats 200 --orthanc
    python -m benchmarks.query --index postgresql --sizes 1000000 --repeats 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import numpy as np
import sqlalchemy
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from rich.console import Console
from rich.table import Table
from sqlalchemy import Connection, create_engine, insert, text
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from benchmarks.ingest import FilmlessServer, OrthancServer, send
from benchmarks.support import free_port, in_private_network, no_delay, rerun_in_private_network
from pacs.dimse.reactor import MendedAE
from pacs.header import normalise_name
from pacs.index import Index, instance, patient, patient_key, series, study
from tests.support.postgres import PostgresServer, find_postgres_binaries

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
MODALITIES = ["CT", "MR", "DX", "MG"]
FIRST_DAY = datetime(2023, 1, 1)
DAYS = 3 * 365  # study dates spread over three years
RANGE_MATCHES = 100  # studies the date range query should match, about


@dataclass
class Latency:
    server: str
    size: int
    query: str
    matches: int
    p50_ms: float
    p95_ms: float
    max_ms: float


def study_days(studies: int, seed: int = 0) -> list[int]:
    """Each study's date, as days after FIRST_DAY (the same for both servers' corpora)."""
    rng = np.random.default_rng(seed)
    return [int(d) for d in rng.integers(0, DAYS, size=studies)]


def fill_index(index: Index, instances: int, seed: int = 0) -> None:
    """Generated rows, consistent counters, written in bulk: multi-row INSERTs on SQLite,
    COPY on PostgreSQL (a million instances in about a minute)."""
    studies = max(1, instances // INSTANCES_PER_STUDY)
    patients = max(1, studies // 3)
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
    days = study_days(studies, seed)

    def patient_rows() -> Iterator[dict[str, Any]]:
        for p, person in enumerate(people):
            yield {
                "id": p + 1,
                "PatientKey": patient_key(person["PatientID"], "", ""),
                **person,
                "NumberOfPatientRelatedStudies": studies // patients,
                "NumberOfPatientRelatedSeries": 2 * studies // patients,
                "NumberOfPatientRelatedInstances": INSTANCES_PER_STUDY * studies // patients,
            }

    def study_rows() -> Iterator[dict[str, Any]]:
        for s in range(studies):
            yield {
                "id": s + 1,
                "patient_id": s % patients + 1,
                **people[s % patients],
                "StudyInstanceUID": f"2.25.{s + 1}",
                "StudyDate": (FIRST_DAY + timedelta(days=days[s])).strftime("%Y%m%d"),
                "StudyTime": f"{8 + s % 10:02d}0000",
                "AccessionNumber": f"ACC{s:08d}",
                "StudyID": str(s),
                "StudyDescription": "BENCH",
                "ModalitiesInStudy": MODALITIES[s % 4],
                "NumberOfStudyRelatedSeries": 2,
                "NumberOfStudyRelatedInstances": INSTANCES_PER_STUDY,
                "created_at": now,
                "updated_at": now,
            }

    def series_rows() -> Iterator[dict[str, Any]]:
        for s in range(studies):
            for k in range(2):
                yield {
                    "id": s * 2 + k + 1,
                    "study_id": s + 1,
                    "SeriesInstanceUID": f"2.25.{s + 1}.{k + 1}",
                    "Modality": MODALITIES[s % 4],
                    "SeriesNumber": k + 1,
                    "NumberOfSeriesRelatedInstances": INSTANCES_PER_STUDY // 2,
                }

    def instance_rows() -> Iterator[dict[str, Any]]:
        for s in range(studies):
            for k in range(2):
                for i in range(INSTANCES_PER_STUDY // 2):
                    yield {
                        "id": (s * 2 + k) * (INSTANCES_PER_STUDY // 2) + i + 1,
                        "series_id": s * 2 + k + 1,
                        "SOPInstanceUID": f"2.25.{s + 1}.{k + 1}.{i + 1}",
                        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                        "InstanceNumber": i + 1,
                        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
                        "size": 0,
                        "sha256": "0" * 64,
                        "path": "",
                        "received_at": now,
                    }

    tables = [
        (patient, patient_rows()),
        (study, study_rows()),
        (series, series_rows()),
        (instance, instance_rows()),
    ]
    with index.writer.begin() as conn:
        for table, rows in tables:
            if index.is_sqlite:
                while chunk := list(itertools.islice(rows, 20000)):
                    conn.execute(insert(table), chunk)
            else:
                _copy(conn, table, rows)
    if not index.is_sqlite:
        with index.writer.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()


def _copy(conn: Connection, table: sqlalchemy.Table, rows: Iterator[dict[str, Any]]) -> None:
    """COPY FROM STDIN of every column, the ones a row leaves out at their defaults."""
    columns = list(table.columns)
    defaults = [
        c.default.arg if isinstance(c.default, ScalarElementColumnDefault) else None
        for c in columns
    ]
    names = ", ".join(f'"{c.name}"' for c in columns)
    driver = conn.connection.driver_connection
    assert driver is not None
    with (
        driver.cursor() as cursor,
        cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy,
    ):
        for row in rows:
            copy.write_row(
                [row.get(c.name, default) for c, default in zip(columns, defaults, strict=True)]
            )


def date_range(size: int) -> str:
    """A StudyDate range that holds about RANGE_MATCHES studies at ``size`` instances."""
    studies = max(1, size // INSTANCES_PER_STUDY)
    width = min(DAYS, -(-RANGE_MATCHES * DAYS // studies))
    first = FIRST_DAY + timedelta(days=max(0, min(425, DAYS - width)))  # from 2024-03-01
    last = first + timedelta(days=width - 1)
    return f"{first:%Y%m%d}-{last:%Y%m%d}"


def matching_keys(size: int) -> dict[str, dict[str, str]]:
    """The queries' matching keys, the same for C-FIND and QIDO-RS."""
    return {
        "PatientID": {"PatientID": "PID0000042"},
        "AccessionNumber": {"AccessionNumber": "ACC00000042"},
        "date range": {"StudyDate": date_range(size)},
        # Patient 24 is Kowalski2, present at every size: matches Kowalski2 and, as the
        # index grows, Kowalski20..29.
        "wildcard name": {"PatientName": "Kowalski2*"},
    }


# OHIF's study list, as its DICOMweb data source asks for it (no filter typed yet).
OHIF_STUDY_LIST = [
    ("limit", "101"),
    ("offset", "0"),
    ("fuzzymatching", "false"),
    ("includefield", "00081030,00080060"),
]


RETURNED = [
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
]


def queries(size: int) -> dict[str, Callable[[], Dataset]]:
    def make(keys: dict[str, str]) -> Callable[[], Dataset]:
        def identifier() -> Dataset:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            for keyword in RETURNED:
                setattr(ds, keyword, "")
            for keyword, value in keys.items():
                setattr(ds, keyword, value)
            return ds

        return identifier

    return {name: make(keys) for name, keys in matching_keys(size).items()}


def qido_queries(size: int) -> dict[str, list[tuple[str, str]]]:
    found = {name: list(keys.items()) for name, keys in matching_keys(size).items()}
    return found | {"OHIF study list": OHIF_STUDY_LIST}


def measure_qido(
    base: str, params: Sequence[tuple[str, str | int | float | bool | None]], repeats: int
) -> tuple[int, list[float]]:
    """QIDO-RS /studies over one kept-alive connection: a warm-up, then ``repeats``."""
    timings, matches = [], 0
    with httpx.Client(timeout=60) as client:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            answer = client.get(f"{base}/studies", params=list(params))
            found = answer.json() if answer.status_code == 200 else []
            timings.append((time.perf_counter() - start) * 1000)
            if answer.status_code not in (200, 204):
                raise RuntimeError(f"QIDO-RS failed: {answer.status_code} {answer.text[:200]}")
            matches = len(found)
    return matches, timings[1:]


def explain(url: str, size: int) -> dict[str, str]:
    """PostgreSQL's plan, with its actual times, of the SQL each query runs."""
    from dicomweb.qido import parse_search  # noqa: PLC0415
    from pacs.dimse.find import query_from_identifier  # noqa: PLC0415
    from pacs.query import Level, Model, compile_query  # noqa: PLC0415

    statements = {}
    for name, make in queries(size).items():
        query = query_from_identifier(make(), Model.STUDY_ROOT, case_insensitive_names=True)
        statements[f"C-FIND {name}"] = compile_query(query)
    for name, params in qido_queries(size).items():
        search = parse_search(Level.STUDY, params)
        statements[f"QIDO-RS {name}"] = compile_query(
            search.query, limit=search.limit, offset=search.offset
        )
    engine = create_engine(url)
    plans = {}
    try:
        with engine.connect() as conn:
            for name, statement in statements.items():
                sql = str(
                    statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
                )
                rows = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")).scalars()
                plans[name] = "\n".join(rows)
    finally:
        engine.dispose()
    return plans


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


def run_filmless(
    server: FilmlessServer,
    work: Path,
    size: int,
    repeats: int,
    *,
    postgres: PostgresServer | None = None,
    plans: dict[str, dict[str, str]] | None = None,
) -> list[Latency]:
    """C-FIND and QIDO-RS against ``filmless serve`` over an index of ``size`` generated
    instances (SQLite, or a new PostgreSQL database whose plans go to ``plans``)."""
    folder = work / f"filmless-{size}"
    folder.mkdir()
    url = postgres.fresh_database() if postgres else f"sqlite:///{folder / 'index.sqlite'}"
    index = Index(url)
    index.create_schema()
    started = time.perf_counter()
    with console.status(f"filling the index with {size} instances"):
        fill_index(index, size)
    index.dispose()
    console.print(f"{size} instances written to the index in {time.perf_counter() - started:.0f} s")
    if postgres is not None and plans is not None:
        plans[str(size)] = explain(url, size)
    # The server runs as deployed, in a process of its own: an SCU in the same process
    # would share its interpreter lock and inflate every figure.
    port = free_port()
    server.settings["index_url"] = url
    with server.running(folder, port):
        found = run_queries(
            "filmless", server.ae_title, port, size=size, repeats=repeats, work=work
        )
        base = f"http://127.0.0.1:{server.http_port}/dicom-web"
        for name, params in qido_queries(size).items():
            matches, timings = measure_qido(base, params, repeats)
            found.append(_summary("filmless (QIDO-RS)", size, name, matches, timings))
        return found


def run_queries(
    server: str, ae_title: str, port: int, *, size: int, repeats: int, work: Path
) -> list[Latency]:
    """Every query with each SCU: dcmtk findscu where installed, and pynetdicom."""
    results = []
    for name, make in queries(size).items():
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
    days = study_days(studies)
    files = []
    for s in range(studies):
        p = s % patients
        day = FIRST_DAY + timedelta(days=days[s])
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
            ds.Modality = MODALITIES[s % 4]
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
    """C-FIND queries whose match counts differ between servers at one size."""
    found: dict[tuple[int, str], set[int]] = {}
    for r in results:
        if "QIDO" not in r.server:
            found.setdefault((r.size, r.query), set()).add(r.matches)
    return [f"{query} at {size}" for (size, query), counts in found.items() if len(counts) > 1]


def markdown(results: list[Latency], meta: dict[str, Any]) -> str:
    lines = [
        "# C-FIND and QIDO-RS latency (STUDY level)",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; "
        f"{meta['repeats']} runs per query; filmless index: {meta['index']}.",
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
    for size, plans in meta.get("plans", {}).items():
        lines += ["", f"## PostgreSQL plans at {size} instances (EXPLAIN ANALYZE)"]
        for name, text_plan in plans.items():
            lines += ["", f"{name}:", "", "```", text_plan, "```"]
    return "\n".join(lines) + "\n"


def plot(results: list[Latency], path: Path) -> None:
    labels = [f"{r.server}\n{r.size // 1000}k\n{r.query}" for r in results]
    fig, axis = plt.subplots(figsize=(max(6, len(results) * 0.9), 4))
    axis.bar(labels, [r.p95_ms for r in results], color="#c0392b", label="p95")
    axis.bar(labels, [r.p50_ms for r in results], color="#4a7bb7", label="p50")
    axis.axhline(30, color="#333", linestyle="--", label="30 ms: key lookups (p95)")
    axis.axhline(100, color="#777", linestyle=":", label="100 ms: range, study list (p95)")
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
    parser.add_argument(
        "--index",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="filmless's index: SQLite, or a PostgreSQL server started on loopback",
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
    plans: dict[str, dict[str, str]] = {}
    filmless = FilmlessServer(dimse_workers="1", max_find_matches="100000")
    orthanc = OrthancServer(orthanc_binary) if orthanc_binary else None
    stack = ExitStack()
    postgres = None
    if args.index == "postgresql":
        binaries = find_postgres_binaries()
        if binaries is None:
            console.print("[red]--index postgresql needs PostgreSQL (apt-get install postgresql)")
            return 2
        postgres = PostgresServer(binaries, port=free_port())
        postgres.start()
        stack.callback(postgres.stop)
    try:
        for size in args.sizes:
            results += run_filmless(
                filmless, work, size, args.repeats, postgres=postgres, plans=plans
            )
            if orthanc is not None:
                try:
                    results += run_orthanc(orthanc, work, size, args.repeats)
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    console.print(f"[red]Orthanc run failed:[/red] {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stack.close()
    meta: dict[str, Any] = {
        "index": "PostgreSQL (loopback, fsync on)" if postgres else "SQLite (WAL)",
        "plans": plans,
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
    table = Table(title="C-FIND and QIDO-RS latency")
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
