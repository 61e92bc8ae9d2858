"""Real DIMSE peers: dcmtk's echoscu and storescu against the server on loopback."""

from __future__ import annotations

import io
import shutil
import subprocess
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs.archive import Archive
from pacs.dimse.server import DimseConfig
from pacs.part10 import read_file_meta
from tests.support.dcmtk import PROPOSE

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
]


def _data_set(data: bytes) -> tuple[str, str, bytes]:
    """(SOP Instance UID, transfer syntax, data set bytes, inflated when deflated)."""
    stream = io.BytesIO(data)
    meta = read_file_meta(stream)
    body = stream.read()
    if meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    return meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID, body


def test_echoscu(dimse_server: DimseConfig) -> None:
    run = subprocess.run(
        ["echoscu", "-aec", "FILMLESS", "127.0.0.1", str(dimse_server.port)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_storescu_corpus(
    archive: Archive, dimse_server: DimseConfig, corpus: list[Path], tmp_path: Path
) -> None:
    groups: dict[str, Path] = {}
    sent: dict[str, tuple[str, bytes]] = {}
    for path in corpus:
        sop_instance, syntax, body = _data_set(path.read_bytes())
        sent[sop_instance] = (syntax, body)
        folder = groups.setdefault(syntax, tmp_path / PROPOSE[syntax])
        folder.mkdir(exist_ok=True)
        (folder / path.name).symlink_to(path)
    for syntax, folder in groups.items():
        run = subprocess.run(
            [
                "storescu",
                "-R",
                PROPOSE[syntax],
                "-aec",
                "FILMLESS",
                "-aet",
                "MODALITY",
                "+sd",
                "+r",
                "127.0.0.1",
                str(dimse_server.port),
                str(folder),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, f"{syntax}: {run.stderr[-2000:]}"
    records = archive.index.instances()
    assert len(records) == len(corpus)
    seen: dict[str, int] = defaultdict(int)
    for record in records:
        syntax, body = sent[record.SOPInstanceUID]
        with archive.open(record) as stored:
            stored_uid, stored_syntax, stored_body = _data_set(stored.read())
        assert stored_uid == record.SOPInstanceUID
        assert stored_syntax == syntax == record.TransferSyntaxUID
        assert stored_body == body
        seen[syntax] += 1
    assert set(seen) == set(PROPOSE)
