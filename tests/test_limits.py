"""Every resource a peer can make the server spend is bounded and refused with a reason.

Malformed parameters are 4xx with the reason, never a 500; requests that would multiply
the server's work or memory are refused before the work starts. The bombs (decompression,
pixels) are in the second half, against a running ``filmless serve`` whose memory is
measured.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from benchmarks.support import session_peak_rss
from dicomweb.app import create_app
from pacs.archive import Archive, Origin
from pacs.audit import AuditTrail
from pacs.index import InstanceRecord
from scripts.hostile import MiB, associate_rq, deflated_bomb, image_bomb, small_image
from scripts.hostile import part10 as hostile_part10
from tests.support.dcmtk import storescu
from tests.support.instances import ct_instance, part10, source
from tests.support.server import Server
from tests.support.web import serving


@dataclass
class Served:
    url: str
    record: InstanceRecord
    archive: Archive

    @property
    def instance(self) -> str:
        r = self.record
        return (
            f"{self.url}/studies/{r.StudyInstanceUID}/series/{r.SeriesInstanceUID}"
            f"/instances/{r.SOPInstanceUID}"
        )


@pytest.fixture
def served(archive: Archive, tmp_path: Path) -> Iterator[Served]:
    archive.audit = AuditTrail(tmp_path / "audit.jsonl")
    outcome = archive.ingest(source(ct_instance()), Origin.IMPORT)
    with serving(create_app(archive, max_uploads=2)) as url:
        yield Served(url, outcome.record, archive)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/bulkdata/-0000001", "is not a tag of 8 hex digits"),
        ("/bulkdata/00280010/x/00280010", "is not an item number"),
        ("/frames/²", "must be positive integers"),
        ("/frames/" + ",".join(["1"] * 5000), "5000 frames asked for; the instance has 1"),
        ("/frames/99999999999999999999", "must be positive integers"),
        ("/rendered?quality=²", "quality must be 1..100"),
        ("/rendered?viewport=²,4", "not numeric"),
    ],
)
def test_malformed_retrieve_parameters_are_400(served: Served, path: str, reason: str) -> None:
    answer = httpx.get(served.instance + path)
    assert answer.status_code == 400, answer.text
    assert reason in answer.json()["error"]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("limit=²", "limit must be a non-negative integer"),
        ("offset=9223372036854775808", "offset must be a non-negative integer"),
        ("NumberOfStudyRelatedInstances=100000000000000000000", "out of range"),
        ("NumberOfStudyRelatedInstances=²", "not a number"),
    ],
)
def test_malformed_search_parameters_are_400(served: Served, query: str, reason: str) -> None:
    answer = httpx.get(f"{served.url}/studies?{query}")
    assert answer.status_code == 400, answer.text
    assert reason in answer.json()["error"]


def test_a_query_naming_too_many_attributes_is_400(served: Served) -> None:
    """max_query_keys (256): 300 includefield attributes are refused before any search,
    and so are study-level searches whose many series-level fields would be dropped."""
    many = ",".join(f"0008{n:04X}" for n in range(0x0100, 0x0100 + 300))
    answer = httpx.get(f"{served.url}/studies", params={"includefield": many})
    assert answer.status_code == 400
    assert "names 300 attributes; at most 256 (max_query_keys)" in answer.json()["error"]
    lower = ",".join(f"0018{n:04X}" for n in range(0x1000, 0x1000 + 260))
    answer = httpx.get(f"{served.url}/studies", params={"includefield": lower})
    assert answer.status_code == 400
    assert "(max_query_keys)" in answer.json()["error"]


def test_an_answer_past_max_answer_bytes_is_400_and_limit_gets_it(
    archive: Archive,
) -> None:
    """Answers are built one match at a time and refused once past max_answer_bytes,
    with the way out named; fewer matches (limit) are answered."""
    for seed in range(20):
        archive.ingest(source(ct_instance(seed=seed)), Origin.IMPORT)
    with serving(create_app(archive, max_answer_bytes=4000)) as url:
        whole = httpx.get(f"{url}/studies")
        one = httpx.get(f"{url}/studies", params={"limit": "1"})
    assert whole.status_code == 400
    assert "larger than 4000 bytes (max_answer_bytes)" in whole.json()["error"]
    assert one.status_code == 200
    assert len(one.json()) == 1


def _stow_body(count: int) -> tuple[bytes, str]:
    boundary = "limits-boundary"
    body = b""
    for n in range(count):
        data = part10(ct_instance(seed=n))
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_uploads_at_a_time_are_bounded(served: Served) -> None:
    """max_concurrent_uploads (2 here): a third STOW-RS while two are being received is
    503 at once; the two complete."""

    async def scenario() -> list[int]:
        body, content_type = _stow_body(1)
        half = len(body) // 2
        gate = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:  # holds its place until told
            yield body[:half]
            await gate.wait()
            yield body[half:]

        async with httpx.AsyncClient(timeout=60) as client:
            headers = {"Content-Type": content_type}
            holding = [
                asyncio.create_task(
                    client.post(f"{served.url}/studies", content=slow(), headers=headers)
                )
                for _ in range(2)
            ]
            await asyncio.sleep(0)  # let both start sending
            third = None
            for _attempt in range(200):  # until both hold their place (bounded)
                third = await client.post(f"{served.url}/studies", content=body, headers=headers)
                if third.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            gate.set()
            done = [await task for task in holding]
            assert third is not None
            assert third.headers.get("retry-after") == "1"
            return [third.status_code, *[r.status_code for r in done]]

    third, *held = asyncio.run(scenario())
    assert third == 503
    assert held == [200, 200]


def test_a_sender_gone_mid_upload_leaves_what_it_sent_stored_and_audited(
    served: Served, tmp_path: Path
) -> None:
    body, content_type = _stow_body(3)
    cut = body[: int(len(body) * 0.8)]  # two whole instances, the third cut off
    host, port = served.url.removeprefix("http://").split("/")[0].split(":")
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + cut)
        for _ in range(400):  # until the two whole instances are stored (bounded), then go
            if len(served.archive.index.instances()) == 3:
                break
            asyncio.run(asyncio.sleep(0.05))
    deadline_rounds = 200
    lines: list[dict[str, object]] = []
    trail = tmp_path / "audit.jsonl"
    for _ in range(deadline_rounds):  # the server notices the close (bounded wait)
        text = trail.read_text() if trail.exists() else ""
        lines = [json.loads(line) for line in text.splitlines()]
        if any("client went away" in str(line["Detail"]) for line in lines):
            break
        asyncio.run(asyncio.sleep(0.05))
    stored = [line for line in lines if "STOW-RS" in str(line["Detail"])]
    assert len(stored) == 2
    assert all(line["EventOutcomeIndicator"] == 0 for line in stored)
    assert any("client went away; 2 stored" in str(line["Detail"]) for line in lines)
    assert len(served.archive.index.instances()) == 3  # the fixture's and the two


# -- bombs, against a running server ------------------------------------------------------

# Loopback addresses of hostile peers; the normal clients come from 127.0.0.1.
SILENT = "127.0.0.2"
ATTACKER = "127.0.0.3"


def _malformed_image(**changes: object) -> bytes:
    return hostile_part10(small_image(**changes))


@dataclass
class Running:
    server: Server
    session: int

    def stow(self, data: bytes) -> httpx.Response:
        boundary = "bomb-boundary"
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return httpx.post(
            f"{self.server.url}/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
            },
            timeout=300,
        )

    def instance_url(self, data: bytes) -> str:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        return (
            f"{self.server.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )

    def peak(self) -> int:
        return session_peak_rss(self.session)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    server = Server(
        tmp_path_factory.mktemp("limits") / "data",
        FILMLESS_SCREENING="false",
        FILMLESS_MAX_INSTANCE_BYTES=str(256 * MiB),
    )
    server.start()
    assert server.process is not None
    try:
        yield Running(server, os.getsid(server.process.pid))
    finally:
        assert server.stop() == 0


def test_a_deflate_bomb_is_refused_without_taking_memory(running: Running) -> None:
    """1 MB that inflates to 1 GiB: refused at max_instance_bytes (256 MiB here), inflated
    in pieces to disk, so the server's peak memory barely moves."""
    bomb = deflated_bomb(1 << 30)
    assert len(bomb) < 2 * MiB
    before = running.peak()
    answer = running.stow(bomb)
    (failure,) = answer.json()["00081198"]["Value"]
    assert failure["00081197"]["Value"] == [0xA700]
    assert "max_instance_bytes" in answer.headers["warning"]
    assert running.peak() - before < 64 * MiB


def test_a_stored_deflated_giant_is_read_back_in_pieces(running: Running) -> None:
    """200 MiB inflated, stored (under the limit): its metadata, its image and its
    frames are read from an inflated copy on disk, never whole in memory."""
    big = deflated_bomb(200 * MiB)
    assert running.stow(big).status_code == 200
    before = running.peak()
    url = running.instance_url(big)
    metadata = httpx.get(f"{url}/metadata", timeout=120)
    assert metadata.status_code == 200
    (entry,) = metadata.json()
    assert "BulkDataURI" in entry["00091001"]
    assert httpx.get(f"{url}/rendered", timeout=120).status_code == 200
    assert httpx.get(f"{url}/frames/1", timeout=120).status_code == 200
    assert running.peak() - before < 64 * MiB


@pytest.mark.parametrize(
    ("codec", "header_rows", "reason"),
    [
        ("jpeg", 64, "codestream says 16384 x 16384"),
        ("j2k", 64, "codestream says 16384 x 16384"),
        ("jpeg", 16384, "more than max_pixels"),
    ],
)
def test_an_image_bomb_is_refused_before_decoding(
    running: Running, codec: str, header_rows: int, reason: str
) -> None:
    """A few KB claiming 16384 x 16384 (1.3-1.75 GB decoded): 406 with the reason, for
    the rendered image and the uncompressed frame, and the memory does not move."""
    bomb = image_bomb(codec, header_rows=header_rows)
    assert len(bomb) < 8 << 10
    assert running.stow(bomb).status_code == 200
    before = running.peak()
    url = running.instance_url(bomb)
    for path in ("/rendered", "/frames/1"):
        answer = httpx.get(
            url + path,
            headers={"Accept": 'multipart/related; type="application/octet-stream"'}
            if path.startswith("/frames")
            else {},
            timeout=60,
        )
        assert answer.status_code == 406, (path, answer.text)
        assert reason in answer.json()["error"]
    assert running.peak() - before < 64 * MiB


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"NumberOfFrames": 1 << 31}, "NumberOfFrames 2147483648 needs"),
        ({"BitsAllocated": 64}, "BitsAllocated 64"),
        ({"SamplesPerPixel": 4}, "SamplesPerPixel 4"),
        ({"Rows": 0}, "there is no image"),
    ],
)
def test_pixel_descriptions_that_cannot_be_decoded_are_406(
    running: Running, changes: dict[str, object], reason: str
) -> None:
    """Not a 500 (and no list of 2^31 frames): the reason, before anything is read."""
    data = _malformed_image(**changes)
    assert running.stow(data).status_code == 200
    url = running.instance_url(data)
    for path in ("/rendered", "/frames/1", "/bulkdata/7FE00010"):
        answer = httpx.get(url + path, timeout=60)
        assert answer.status_code == 406, (path, answer.text)
        assert reason in answer.json()["error"]


def test_a_modality_and_a_viewer_are_served_while_attacked(
    running: Running, tmp_path: Path
) -> None:
    """The attacks at once (deflate bombs, image bombs rendered, malformed A-ASSOCIATE-RQs,
    64 silent connections from another address), each refused as it should be, while a
    real storescu stores 20 images and another client's QIDO-RS searches are answered;
    the whole server stays under 1 GiB."""
    paths = []
    for n in range(20):
        path = tmp_path / f"{n:02d}.dcm"
        path.write_bytes(hostile_part10(small_image(PatientID="MEANWHILE", InstanceNumber=n)))
        paths.append(path)
    picture = image_bomb("jpeg", header_rows=64)
    assert running.stow(picture).status_code == 200
    picture_url = running.instance_url(picture) + "/rendered"
    bomb = deflated_bomb(1 << 30)

    def deflate() -> bool:
        (failure,) = running.stow(bomb).json()["00081198"]["Value"]
        return bool(failure["00081197"]["Value"] == [0xA700])

    def render() -> bool:
        return httpx.get(picture_url, timeout=120).status_code == 406

    def associate() -> bool:
        address = ("127.0.0.1", running.server.port)
        with socket.create_connection(address, 60, source_address=(ATTACKER, 0)) as sock:
            sock.sendall(associate_rq(context_id=2))
            return sock.recv(16)[:1] == b"\x03"  # A-ASSOCIATE-RJ

    outcomes: dict[str, list[bool]] = {}
    started = threading.Barrier(4)

    def attack(name: str, one: Callable[[], bool]) -> None:
        started.wait(60)
        outcomes[name] = [one() for _ in range(3)]

    silent = [
        socket.create_connection(("127.0.0.1", running.server.port), source_address=(SILENT, 0))
        for _ in range(64)
    ]
    threads = [
        threading.Thread(target=attack, args=item)
        for item in {"deflate": deflate, "render": render, "associate": associate}.items()
    ]
    try:
        for thread in threads:
            thread.start()
        started.wait(60)
        storescu(running.server.port, paths)
        with httpx.Client(timeout=120) as viewer:
            searches = [
                viewer.get(f"{running.server.url}/instances", params={"PatientID": "MEANWHILE"})
                for _ in range(5)
            ]
        for thread in threads:
            thread.join(600)
    finally:
        for sock in silent:
            sock.close()
    assert outcomes == {name: [True] * 3 for name in ("deflate", "render", "associate")}
    assert [answer.status_code for answer in searches] == [200] * 5
    assert len(searches[-1].json()) == 20
    assert running.peak() < 1 << 30
