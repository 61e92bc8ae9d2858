"""Routing throughput: a hospital archive forwarding what it receives to a central one.

For each workload of ``benchmarks.ingest`` (small CT slices, large chest X-rays) the files
are sent by ``storescu`` (C parallel associations) to a "hospital" server that routes
every instance it stores to a "central" server of the same kind, both freshly started
on loopback. We measure the time from the first byte sent to the hospital until the
central archive holds every instance, and report instances/s and MB/s routed end to end,
with the part of that time the hospital took to acknowledge them.

filmless runs its routing rules with the two triggers (``instance``: as each instance is
stored; ``stable``: the study once it had no change for ``study_stable_seconds``, here
1 s). Orthanc 1.10 runs the two ways it routes without a plugin, with a Lua script:
``OnStoredInstance`` calling ``SendToModality`` for each instance, and ``OnStableStudy``
posting the study to ``/modalities/central/store`` (the whole study over one
association) once stable (``StableAge`` 1 s). Both
servers get the configuration of ``benchmarks.ingest`` (fsync of every file, TCP_NODELAY;
see there), printed with the results.

    python -m benchmarks.route --small 400 --large 40 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
from rich.console import Console
from rich.table import Table

from benchmarks.ingest import (
    FilmlessServer,
    OrthancServer,
    Server,
    Workload,
    make_large,
    make_small,
    send,
)
from benchmarks.support import free_port, in_private_network, rerun_in_private_network, run_facts

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)
WAIT_S = 600  # bound on the central catching up


@dataclass
class Pair:
    """A hospital and its central archive, and how the hospital routes."""

    name: str
    routing: str
    hospital: Callable[[int], Server]  # given the central's DIMSE port
    central: Server


@dataclass
class Result:
    system: str
    routing: str
    workload: str
    concurrency: int
    instances: int
    megabytes: float
    acknowledged_s: float
    routed_s: float

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.routed_s

    @property
    def megabytes_per_s(self) -> float:
        return self.megabytes / self.routed_s


def filmless_pairs() -> list[Pair]:
    quiet = {"screening": "false"}

    def hospital(trigger: str) -> Callable[[int], Server]:
        def make(port: int) -> Server:
            routes = {
                "central": {
                    "destination": f"CENTRAL@127.0.0.1:{port}",
                    "trigger": trigger,
                    "max_concurrent": 4,
                }
            }
            return FilmlessServer(routes=json.dumps(routes), study_stable_seconds="1", **quiet)

        return make

    central = FilmlessServer(ae_title="CENTRAL", **quiet)
    central.ae_title = "CENTRAL"
    return [
        Pair("filmless", "each instance", hospital("instance"), central),
        Pair("filmless", "stable study", hospital("stable"), central),
    ]


_LUA = {
    "each instance": """
function OnStoredInstance(instanceId, tags, metadata, origin)
   SendToModality(instanceId, 'central')
end
""",
    "stable study": """
function OnStableStudy(studyId, tags, metadata)
   RestApiPost('/modalities/central/store', studyId)
end
""",
}


def orthanc_pairs(binary: str, work: Path) -> list[Pair]:
    pairs = []
    for routing, script in _LUA.items():
        path = work / f"route-{routing.replace(' ', '-')}.lua"
        path.write_text(script)

        def make(port: int, lua: Path = path) -> Server:
            extra = {
                "DicomModalities": {"central": ["CENTRAL", "127.0.0.1", port]},
                "LuaScripts": [str(lua)],
                "StableAge": 1,
            }
            return OrthancServer(binary, extra=extra)

        pairs.append(Pair("orthanc", routing, make, OrthancServer(binary, ae_title="CENTRAL")))
    return pairs


@contextmanager
def _both(pair: Pair, work: Path, tag: str) -> Iterator[tuple[Server, Path, int, Path]]:
    central_port, hospital_port = free_port(), free_port()
    hospital = pair.hospital(central_port)
    with ExitStack() as stack:
        stack.enter_context(pair.central.running(work / f"{tag}-central", central_port))
        stack.enter_context(hospital.running(work / f"{tag}-hospital", hospital_port))
        yield hospital, work / f"{tag}-hospital", hospital_port, work / f"{tag}-central"


def measure(pair: Pair, workload: Workload, concurrency: int, work: Path) -> Result:
    tag = f"{pair.name}-{pair.routing.replace(' ', '-')}-{workload.name}"
    count = len(workload.files)
    with _both(pair, work, tag) as (hospital, _, port, central_folder):
        start = time.perf_counter()
        acknowledged = send(workload.files, port, hospital.ae_title, concurrency)
        deadline = time.monotonic() + WAIT_S
        while pair.central.count(central_folder) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: the central holds fewer than {count}")
            time.sleep(0.05)
        routed = time.perf_counter() - start
        if hospital.count(work / f"{tag}-hospital") != count:
            raise RuntimeError(f"{tag}: the hospital does not hold {count}")
    shutil.rmtree(work / f"{tag}-hospital", ignore_errors=True)
    shutil.rmtree(central_folder, ignore_errors=True)
    return Result(
        pair.name,
        pair.routing,
        workload.name,
        concurrency,
        count,
        workload.total_bytes / 1e6,
        acknowledged,
        routed,
    )


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    lines = [
        "# Routing hospital -> central",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}.",
        "",
        "| workload | routing | system | instances | acknowledged s | routed s | inst/s | MB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.routing} | {r.system} | {r.instances} | "
            f"{r.acknowledged_s:.2f} | {r.routed_s:.2f} | {r.instances_per_s:.1f} | "
            f"{r.megabytes_per_s:.1f} |"
        )
    lines += ["", "Configuration:", "", "```json", json.dumps(meta["servers"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, workload in zip(axes, ("small", "large"), strict=True):
        shown = [r for r in results if r.workload == workload]
        labels = [f"{r.system}\n{r.routing}" for r in shown]
        axis.bar(labels, [r.instances_per_s for r in shown], color="#4c72b0")
        axis.set_title(f"{workload}: instances/s routed end to end")
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", type=int, default=400, help="small instances")
    parser.add_argument("--large", type=int, default=40, help="large instances")
    parser.add_argument("--concurrency", type=int, default=4, help="associations into the hospital")
    parser.add_argument("--orthanc", choices=["auto", "no"], default="auto")
    parser.add_argument("--work-dir", type=Path, help="where data is written (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]

    orthanc_binary = shutil.which("Orthanc") if args.orthanc == "auto" else None
    if orthanc_binary and not in_private_network():
        status = rerun_in_private_network("benchmarks.route", given)
        if status is not None:
            return status
        console.print("Orthanc found but no private network namespace possible: skipping it")
        orthanc_binary = None
    if shutil.which("storescu") is None:
        console.print("[red]dcmtk's storescu is required (apt-get install dcmtk)[/red]")
        return 2
    work = Path(tempfile.mkdtemp(prefix="filmless-route-", dir=args.work_dir))
    try:
        pairs = filmless_pairs()
        if orthanc_binary:
            pairs += orthanc_pairs(orthanc_binary, work)
        workloads = []
        with console.status("generating workloads"):
            if args.small:
                workloads.append(make_small(work / "in-small", args.small))
            if args.large:
                workloads.append(make_large(work / "in-large", args.large))
        results = []
        for workload in workloads:
            for pair in pairs:
                with console.status(f"{workload.name}: {pair.name}, {pair.routing}"):
                    results.append(measure(pair, workload, args.concurrency, work))
                r = results[-1]
                console.print(
                    f"{workload.name} {pair.name} ({pair.routing}): {r.instances_per_s:.1f} inst/s"
                )
        servers = {
            f"{p.name} ({p.routing})": {
                "hospital": p.hospital(0).configuration(),
                "central": p.central.configuration(),
            }
            for p in pairs
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {**run_facts("benchmarks.route", given), "servers": servers}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "route.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "results": [
                    asdict(r)
                    | {"instances_per_s": r.instances_per_s, "megabytes_per_s": r.megabytes_per_s}
                    for r in results
                ],
            },
            indent=2,
        )
    )
    (args.out / "route.md").write_text(markdown(results, meta))
    plot(results, args.out / "route.png")
    table = Table(title="routing hospital -> central")
    for column in ("workload", "routing", "system", "acknowledged s", "routed s", "inst/s", "MB/s"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.workload,
            r.routing,
            r.system,
            f"{r.acknowledged_s:.2f}",
            f"{r.routed_s:.2f}",
            f"{r.instances_per_s:.1f}",
            f"{r.megabytes_per_s:.1f}",
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
