"""Hostile peers against one ``filmless serve`` while a normal load runs.

A server (screening off, ``max_instance_bytes`` 512 MiB) on loopback first serves the
normal load alone: dcmtk ``storescu`` stores ``--instances`` small CT images over two
associations while a QIDO-RS client and a C-FIND client ask again and again. Then the
same load runs with every attack of ``scripts.hostile`` going on at once, each in its
own thread, ``--rate`` attempts a second (0: as fast as it can; ``--without`` leaves
some out, to see what each costs), until the load is done (bounded in count and time):

- deflated data sets of 1 MB that inflate to 1 GiB, by STOW-RS;
- JPEG and JPEG 2000 frames claiming 16384 x 16384, rendered again and again;
- includefield with 300 attributes, and 250 unindexed ones over every study;
- C-FIND identifiers of 2 MiB; A-ASSOCIATE-RQs with an even context ID and an unknown
  user identity; 64 silent connections held open;
- a frame list of 5,000 frames, NumberOfFrames 2^31 over bulk data, requests for
  another Host name.

Reported: the normal load's store throughput and query p50/p95 in both runs, how many
attacks were refused as they should be, and the peak memory (VmHWM summed over the
server's processes). Writes ``hostile.json`` and ``hostile.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from rich.console import Console

from benchmarks.support import (
    free_port,
    no_delay,
    run_facts,
    session_peak_rss,
    wait_for_port,
)
from pacs.dimse.reactor import MendedAE
from scripts.hostile import MiB, associate_rq, deflated_bomb, image_bomb, part10, small_image

RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
TARGET_PEAK_MIB = 1024
# Loopback addresses of the hostile peers (the normal load comes from 127.0.0.1).
SILENT_HOST = "127.0.0.2"
ATTACKER = "127.0.0.3"
TARGET_P95_RATIO = 2.0


@dataclass
class Load:
    stored_per_s: float
    store_ok: bool
    qido_p50_ms: float
    qido_p95_ms: float
    find_p50_ms: float
    find_p95_ms: float


@dataclass
class Result:
    instances: int
    rate: float
    quiet: Load
    hostile: Load
    attacks: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_rss_mib: float = 0.0

    @property
    def p95_ratio(self) -> float:
        return max(
            self.hostile.qido_p95_ms / max(self.quiet.qido_p95_ms, 0.001),
            self.hostile.find_p95_ms / max(self.quiet.find_p95_ms, 0.001),
        )


class Server:
    def __init__(self, work: Path) -> None:
        self.port, self.http_port = free_port(), free_port()
        env = {
            **os.environ,
            "FILMLESS_DATA_DIR": str(work / "data"),
            "FILMLESS_DIMSE_PORT": str(self.port),
            "FILMLESS_HTTP_PORT": str(self.http_port),
            "FILMLESS_SCREENING": "false",
            "FILMLESS_MAX_INSTANCE_BYTES": str(512 * MiB),
        }
        self.log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "filmless.cli", "serve"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port)
        wait_for_port(self.http_port)
        self.url = f"http://127.0.0.1:{self.http_port}/dicom-web"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)
        self.log.close()


def _images(folder: Path, count: int, tag: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(tag))
    study = small_image().StudyInstanceUID
    paths = []
    for n in range(count):
        ds = small_image(Rows=512, Columns=512, PatientID=f"LOAD{tag}", InstanceNumber=n + 1)
        ds.StudyInstanceUID = study
        ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
        path = folder / f"{n:05d}.dcm"
        path.write_bytes(part10(ds))
        paths.append(path)
    return paths


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def normal_load(server: Server, paths: list[Path], tag: str) -> Load:
    """storescu over two associations, with QIDO-RS and C-FIND asked meanwhile."""
    halves = [paths[0::2], paths[1::2]]
    done = threading.Event()
    qido: list[float] = []
    find: list[float] = []

    def ask_qido() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get(f"{server.url}/studies", params={"PatientID": f"LOAD{tag}"})
                qido.append((time.perf_counter() - start) * 1000)

    def ask_find() -> None:
        ae = MendedAE(ae_title="LOADFIND")
        ae.add_requested_context(FIND)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="FILMLESS")
        no_delay(assoc)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = f"LOAD{tag}"
        query.StudyInstanceUID = ""
        while not done.is_set() and assoc.is_established:
            start = time.perf_counter()
            list(assoc.send_c_find(query, FIND))
            find.append((time.perf_counter() - start) * 1000)
        if assoc.is_established:
            assoc.release()

    askers = [threading.Thread(target=ask_qido), threading.Thread(target=ask_find)]
    for thread in askers:
        thread.start()
    start = time.perf_counter()
    runs = [
        subprocess.Popen(
            ["storescu", "-aet", "LOAD", "-aec", "FILMLESS", "127.0.0.1", str(server.port)]
            + [str(p) for p in half],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for half in halves
    ]
    ok = all(run.wait(600) == 0 for run in runs)
    seconds = time.perf_counter() - start
    done.set()
    for thread in askers:
        thread.join(60)
    return Load(
        len(paths) / seconds,
        ok,
        _percentile(qido, 0.5),
        _percentile(qido, 0.95),
        _percentile(find, 0.5),
        _percentile(find, 0.95),
    )


# -- the attacks ---------------------------------------------------------------------------

Attack = Callable[[Server], bool]  # one attempt; True when refused as it should be


def _stow(server: Server, data: bytes) -> httpx.Response:
    boundary = "hostile"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return httpx.post(
        f"{server.url}/studies", content=body, headers={"Content-Type": content_type}, timeout=300
    )


def _instance_url(server: Server, ds_bytes: bytes) -> str:
    ds = pydicom.dcmread(io.BytesIO(ds_bytes), stop_before_pixels=True)
    return (
        f"{server.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def attacks(server: Server) -> dict[str, Attack]:
    bomb = deflated_bomb(1 << 30)
    pictures = [image_bomb("jpeg", header_rows=64), image_bomb("j2k", header_rows=64)]
    frames_bomb = part10(small_image(NumberOfFrames=1 << 31))
    for data in (*pictures, frames_bomb):
        _stow(server, data)
    picture_urls = [_instance_url(server, data) for data in pictures]
    frames_url = _instance_url(server, frames_bomb)
    wide = ",".join(f"0009{n:04X}" for n in range(0x1000, 0x1000 + 250))
    many = ",".join(f"0008{n:04X}" for n in range(0x0100, 0x0100 + 300))

    def deflate(server: Server) -> bool:
        answer = _stow(server, bomb)
        failed = answer.json().get("00081198", {}).get("Value", [])
        return bool(failed) and failed[0]["00081197"]["Value"] == [0xA700]

    def picture(server: Server) -> bool:
        codes = [httpx.get(f"{u}/rendered", timeout=60).status_code for u in picture_urls]
        return codes == [406, 406]

    def includefield_many(server: Server) -> bool:
        return httpx.get(f"{server.url}/studies", params={"includefield": many}).status_code == 400

    def includefield_unindexed(server: Server) -> bool:
        answer = httpx.get(f"{server.url}/studies", params={"includefield": wide}, timeout=120)
        return answer.status_code in (200, 400)

    def big_identifier(server: Server) -> bool:
        ae = MendedAE(ae_title="BIGFIND")
        ae.add_requested_context(FIND)
        assoc = ae.associate(
            "127.0.0.1", server.port, ae_title="FILMLESS", bind_address=(ATTACKER, 0)
        )
        if not assoc.is_established:
            return False
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.add_new(0x0040A160, "UT", "x" * (2 * MiB))
        list(assoc.send_c_find(query, FIND))
        deadline = time.monotonic() + 30
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        return not assoc.is_established

    def malformed(server: Server) -> bool:
        answers = []
        for request in (associate_rq(context_id=2), associate_rq(identity=b"\x09\x00\x00\x01x")):
            address = ("127.0.0.1", server.port)
            with socket.create_connection(
                address, timeout=30, source_address=(ATTACKER, 0)
            ) as sock:
                sock.sendall(request)
                answers.append(sock.recv(16)[:1])
        return answers == [b"\x03", b"\x03"]

    def frames(server: Server) -> bool:
        many_frames = httpx.get(f"{frames_url}/frames/{','.join(['1'] * 5000)}", timeout=60)
        bulk = httpx.get(f"{frames_url}/bulkdata/7FE00010", timeout=60)
        return (many_frames.status_code, bulk.status_code) == (406, 406)

    def rebinding(server: Server) -> bool:
        answer = httpx.get(f"{server.url}/studies", headers={"Host": "attacker.example"})
        return answer.status_code == 421

    return {
        "deflate bomb 1 MB -> 1 GiB (STOW-RS)": deflate,
        "16384^2 JPEG / J2K frames rendered": picture,
        "includefield of 300 attributes": includefield_many,
        "includefield of 250 unindexed attributes": includefield_unindexed,
        "C-FIND identifier of 2 MiB": big_identifier,
        "malformed A-ASSOCIATE-RQ": malformed,
        "5,000 frames / NumberOfFrames 2^31": frames,
        "Host of another site (DNS rebinding)": rebinding,
    }


def hostile_load(
    server: Server, paths: list[Path], tag: str, rate: float, without: str = ""
) -> tuple[Load, dict[str, Counter[str]]]:
    stop = threading.Event()
    tally: dict[str, Counter[str]] = {}
    # From another address than the normal load's, as a hostile host would be: the
    # per-address cap on negotiating connections is what keeps the others' places.
    silent = [
        socket.create_connection(("127.0.0.1", server.port), source_address=(SILENT_HOST, 0))
        for _ in range(64)
    ]

    def run(name: str, attack: Attack) -> None:
        counts = tally.setdefault(name, Counter())
        interval = 1 / rate if rate > 0 else 0.0
        for _ in range(1000):  # bounded in count, and by the load's duration
            began = time.monotonic()
            if stop.is_set():
                return
            try:
                counts["refused" if attack(server) else "NOT REFUSED"] += 1
            except (httpx.HTTPError, OSError) as exc:
                counts[f"error {type(exc).__name__}"] += 1
            stop.wait(max(0.0, interval - (time.monotonic() - began)))

    chosen = {k: v for k, v in attacks(server).items() if not without or without not in k}
    threads = [threading.Thread(target=run, args=item) for item in chosen.items()]
    for thread in threads:
        thread.start()
    try:
        load = normal_load(server, paths, tag)
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
        for sock in silent:
            sock.close()
    return load, tally


def markdown(result: Result, meta: dict[str, Any]) -> str:
    q, h = result.quiet, result.hostile
    lines = [
        "# Hostile peers during a normal load",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}. {result.instances} "
        "CT images of 512 x 512 by storescu over 2 associations; QIDO-RS and C-FIND asked "
        "meanwhile, one client each. Each attack "
        + (f"tried {result.rate:g} times a second" if result.rate > 0 else "as fast as it can")
        + ", all at once, with 64 silent connections held open. Peak memory: VmHWM summed "
        "over the server's processes.",
        "",
        "| | quiet | under attack |",
        "|---|---:|---:|",
        f"| stored per s | {q.stored_per_s:.0f} | {h.stored_per_s:.0f} |",
        f"| all stored | {q.store_ok} | {h.store_ok} |",
        f"| QIDO-RS p50 / p95 ms | {q.qido_p50_ms:.1f} / {q.qido_p95_ms:.1f} | "
        f"{h.qido_p50_ms:.1f} / {h.qido_p95_ms:.1f} |",
        f"| C-FIND p50 / p95 ms | {q.find_p50_ms:.1f} / {q.find_p95_ms:.1f} | "
        f"{h.find_p50_ms:.1f} / {h.find_p95_ms:.1f} |",
        "",
        f"Peak memory of the server: {result.peak_rss_mib:.0f} MiB (target under "
        f"{TARGET_PEAK_MIB}); p95 under attack / quiet: {result.p95_ratio:.2f} (target "
        f"under {TARGET_P95_RATIO}).",
        "",
        "| attack | outcomes |",
        "|---|---|",
    ]
    for name, counts in result.attacks.items():
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument(
        "--rate", type=float, default=1.0, help="attempts a second per attack, 0: flat out"
    )
    parser.add_argument(
        "--without", default="", help="leave out the attacks whose name contains this"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="filmless-hostile-"))
    quiet_paths = _images(work / "quiet", args.instances, "Q")
    hostile_paths = _images(work / "hostile", args.instances, "H")
    server = Server(work)
    try:
        time.sleep(2)
        quiet = normal_load(server, quiet_paths, "Q")
        console.print("quiet:", quiet)
        hostile, tally = hostile_load(server, hostile_paths, "H", args.rate, args.without)
        console.print("under attack:", hostile)
        peak = session_peak_rss(server.process.pid) / MiB
    finally:
        server.stop()
    result = Result(
        args.instances, args.rate, quiet, hostile, {k: dict(v) for k, v in tally.items()}, peak
    )
    meta = run_facts("benchmarks.hostile", arguments)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, **asdict(result), "p95_ratio": result.p95_ratio}
    (args.out / "hostile.json").write_text(json.dumps(report, indent=2))
    (args.out / "hostile.md").write_text(markdown(result, meta))
    console.print(markdown(result, meta))
    refused = all(set(c) == {"refused"} for c in result.attacks.values())
    met = peak < TARGET_PEAK_MIB and result.p95_ratio < TARGET_P95_RATIO
    return 0 if quiet.store_ok and hostile.store_ok and refused and met else 1


if __name__ == "__main__":
    raise SystemExit(main())
