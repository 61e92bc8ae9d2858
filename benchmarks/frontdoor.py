"""DIMSE front door under hostile peers: storescu time and server memory.

For each DIMSE process count, ``filmless serve`` (screening off) is started on loopback
and measured at rest; then ``--idle`` silent sockets are opened, three connections
announce a 512 MiB A-ASSOCIATE-RQ, one association announces a 512 MiB P-DATA-TF, and a
real dcmtk ``storescu`` stores one image while all of that is open. Reported: the
storescu wall time, and the server's memory (RSS and PSS summed over its processes)
before and after. Writes ``frontdoor.json`` and ``frontdoor.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from rich.console import Console

from benchmarks.support import free_port, run_facts, session_memory, wait_for_port
from pacs.dimse.reactor import MendedAE
from scripts.synthetic_corpus import write_corpus

RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)


@dataclass
class Run:
    dimse_workers: int
    processes: int
    idle_sockets: int
    storescu_s: float
    storescu_ok: bool
    rss_rest_mib: float
    rss_attacked_mib: float
    pss_rest_mib: float
    pss_attacked_mib: float


def _image(folder: Path) -> Path:
    for path in write_corpus(folder, patients=2, seed=3, scale=0.05, ct_slices=1):
        ds = dcmread(path, stop_before_pixels=True)
        if ds.Modality == "DX" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1":
            return path
    raise RuntimeError("no uncompressed DX image in the generated corpus")


def measure(workers: int, idle: int, work: Path, image: Path) -> Run:
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "FILMLESS_DATA_DIR": str(work / f"data-{workers}"),
        "FILMLESS_DIMSE_PORT": str(port),
        "FILMLESS_HTTP_PORT": str(http_port),
        "FILMLESS_SCREENING": "false",
        "FILMLESS_DIMSE_WORKERS": str(workers),
    }
    with open(work / f"serve-{workers}.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "filmless.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sockets: list[socket.socket] = []
    greedy = None
    try:
        wait_for_port(port)
        wait_for_port(http_port)
        time.sleep(2)
        processes, rss_rest, pss_rest = session_memory(server.pid)
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
        for _ in range(3):
            claim = socket.create_connection(("127.0.0.1", port))
            claim.sendall(struct.pack(">BBL", 0x01, 0, 512 << 20) + bytes(1 << 16))
            sockets.append(claim)
        ae = MendedAE(ae_title="GREEDY")
        ae.add_requested_context(Verification)
        greedy = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
        raw = greedy.dul.socket.socket if greedy.dul.socket else None
        if raw is not None:
            raw.sendall(struct.pack(">BBL", 0x04, 0, 512 << 20) + bytes(1 << 16))
            sockets.append(raw)
        start = time.monotonic()
        command = ["storescu", "-aet", "MODALITY", "-aec", "FILMLESS", "127.0.0.1", str(port)]
        run = subprocess.run(
            [*command, str(image)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        seconds = time.monotonic() - start
        _, rss, pss = session_memory(server.pid)
    finally:
        for sock in sockets:
            sock.close()
        if greedy is not None:
            greedy.abort()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    mib = 1 << 20
    return Run(
        workers,
        processes,
        idle,
        seconds,
        run.returncode == 0,
        rss_rest / mib,
        rss / mib,
        pss_rest / mib,
        pss / mib,
    )


def markdown(runs: list[Run], meta: dict[str, Any]) -> str:
    lines = [
        "# DIMSE front door under hostile peers",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}. Open during the store: "
        "the idle sockets, 3 connections announcing a 512 MiB A-ASSOCIATE-RQ, 1 association "
        "announcing a 512 MiB P-DATA-TF. Memory summed over the server's processes.",
        "",
        "| DIMSE workers | processes | idle sockets | storescu s | stored | RSS rest MiB | "
        "RSS attacked MiB | PSS rest MiB | PSS attacked MiB |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.dimse_workers} | {r.processes} | {r.idle_sockets} | {r.storescu_s:.2f} | "
            f"{'yes' if r.storescu_ok else 'NO'} | {r.rss_rest_mib:.0f} | "
            f"{r.rss_attacked_mib:.0f} | {r.pss_rest_mib:.0f} | {r.pss_attacked_mib:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--idle", type=int, default=50, help="silent sockets held open")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="filmless-frontdoor-"))
    image = _image(work / "corpus")
    runs = []
    for workers in args.workers:
        runs.append(measure(workers, args.idle, work, image))
        console.print(runs[-1])
    meta = run_facts("benchmarks.frontdoor", arguments)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontdoor.json").write_text(
        json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=2)
    )
    (args.out / "frontdoor.md").write_text(markdown(runs, meta))
    console.print(markdown(runs, meta))
    return 0 if all(r.storescu_ok for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
