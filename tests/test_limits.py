"""Every resource a peer can make the server spend is bounded and refused with a reason.

Malformed parameters are 4xx with the reason, never a 500; requests that would multiply
the server's work or memory are refused before the work starts. The bombs (decompression,
pixels) are in the second half, against a running ``filmless serve`` whose memory is
measured.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dicomweb.app import create_app
from pacs.archive import Archive, Origin
from pacs.audit import AuditTrail
from pacs.index import InstanceRecord
from tests.support.instances import ct_instance, part10, source
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
