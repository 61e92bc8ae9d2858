"""DICOM the project did not write: every file of pydicom's bundled test files.

Each file goes through the three ways in (C-STORE from a pynetdicom SCU, STOW-RS, and
``filmless import``), each into an archive of its own, and must get the same outcome on
every route: stored, or refused with the same DICOM status. Each stored one is then read
back as a viewer would: as stored (the data set byte for byte), by default retrieve
(complete, or refused before the first byte: PS3.18 8.7.3.5), as metadata (pydicom's
``to_json_dict`` apart from the differences ``docs/conformance.md`` lists), rendered
(close to pydicom's own decoding), frame by frame, and found by QIDO-RS and C-FIND.

The files vary vendors, transfer syntaxes (big endian, deflated, every compression),
character sets and malformations (truncated, wrong VR, meta UIDs that differ from the
data set, no meta at all); pydicom ships them, so they are on every machine that runs
the tests, and none of them is downloaded.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicomweb.app import create_app
from filmless.cli import import_one
from pacs.archive import Archive
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.equivalence import LOSSLESS
from pacs.index import Index
from pacs.part10 import FileMeta, encode_file_meta
from pacs.store import FsBlobStore
from tests.conftest import free_port
from tests.support.reference import grey64
from tests.support.scu import store
from tests.support.web import serving

pytestmark = pytest.mark.slow

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    status: int  # 0 when stored; the DICOM status (C-STORE, STOW FailureReason) otherwise
    SOPInstanceUID: str = ""
    reason: str = ""


# -- the three routes ------------------------------------------------------------------


def _as_a_modality_sends_it(path: Path, folder: Path) -> tuple[Path, Dataset] | None:
    """The file as an SCU puts it on the wire: its data set's bytes as they are, under
    the UIDs of the data set (what dcmtk's storescu announces), in the transfer syntax
    its meta names (or its encoding shows). None when no SCU could send it."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    except Exception:
        return None
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        syntax = (
            pydicom.uid.ImplicitVRLittleEndian
            if ds.original_encoding[0]
            else pydicom.uid.ExplicitVRLittleEndian
        )
    raw = path.read_bytes()
    offset = _data_set_offset(raw)
    if offset is None:
        return None
    sent = folder / f"{path.name}.sent"
    head = encode_file_meta(FileMeta(sop_class, sop_instance, str(syntax)))
    sent.write_bytes(head + raw[offset:])
    return sent, ds


def _data_set_offset(raw: bytes) -> int | None:
    if raw[128:132] != b"DICM":
        return None
    position = 132
    while position + 8 <= len(raw):
        group = struct.unpack_from("<H", raw, position)[0]
        if group != 0x0002:
            return position
        vr = raw[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            position += 12 + struct.unpack_from("<L", raw, position + 8)[0]
        else:
            position += 8 + struct.unpack_from("<H", raw, position + 6)[0]
    return None


def _c_store(port: int, path: Path, folder: Path) -> Outcome:
    prepared = _as_a_modality_sends_it(path, folder)
    if prepared is None:
        return Outcome(False, -1, reason="not a data set an SCU can send")
    sent, ds = prepared
    meta = pydicom.dcmread(sent, stop_before_pixels=True).file_meta
    ae = MendedAE(ae_title="MODALITY")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
    assert assoc.is_established, path.name
    try:
        status = store(assoc, sent)
    finally:
        assoc.release()
    code = int(status.Status)
    if code == 0:
        return Outcome(True, 0, str(ds.SOPInstanceUID))
    return Outcome(False, code, reason=str(status.get("ErrorComment", "")))


def _stow(url: str, path: Path) -> Outcome:
    boundary = "real-world-boundary-7f3a"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    answer = httpx.post(
        f"{url}/studies", content=body, headers={"Content-Type": content_type}, timeout=120
    )
    result = answer.json()
    stored = result.get("00081199", {}).get("Value", [])
    failed = result.get("00081198", {}).get("Value", [])
    if stored:
        return Outcome(True, 0, stored[0]["00081155"]["Value"][0])
    assert failed, (path.name, answer.status_code, result)
    return Outcome(False, failed[0]["00081197"]["Value"][0], reason=str(result.get("error", "")))


@dataclass
class Routes:
    """Each file's outcome per route, and what reading it back found (per check)."""

    dimse: dict[Path, Outcome]
    stow: dict[Path, Outcome]
    imported: dict[Path, Outcome]
    problems: dict[str, list[str]]
    checked: dict[str, int]


def _archive(folder: Path) -> Archive:
    index = Index(f"sqlite:///{folder / 'index.sqlite'}")
    index.create_schema()
    return Archive(FsBlobStore(folder / "data"), index)


def _emptied(archive: Archive) -> None:
    """Back to a fresh archive: every file is stored into an empty one (pydicom's files
    share SOP Instance UIDs across different content)."""
    archive.delete_all(r.SOPInstanceUID for r in archive.index.instances())


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routes]:
    folders = {name: tmp_path_factory.mktemp(name) for name in ("dimse", "stow", "import")}
    archives = {name: _archive(folder) for name, folder in folders.items()}
    config = DimseConfig(port=free_port(), acse_timeout=30, dimse_timeout=60)
    dimse_server = start_dimse(archives["dimse"], config)
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, not re-encoded
    result = Routes({}, {}, {}, {name: [] for name in CHECKS}, dict.fromkeys(CHECKS, 0))
    try:
        with serving(create_app(archives["stow"])) as url:
            scratch = Path(tempfile.mkdtemp(dir=folders["dimse"]))
            finder = _Finder(archives["stow"])
            for path in FILES:
                result.dimse[path] = _c_store(config.port, path, scratch)
                result.stow[path] = stowed = _stow(url, path)
                got = import_one(archives["import"], path)
                result.imported[path] = Outcome(
                    got.refused is None, got.status, got.SOPInstanceUID, got.refused or ""
                )
                if stowed.accepted:
                    read_back = ReadBack(path, archives["stow"], url, stowed.SOPInstanceUID)
                    for name, check in CHECKS.items():
                        result.checked[name] += 1
                        result.problems[name] += check(read_back, finder)
                for archive in archives.values():
                    _emptied(archive)
            finder.close()
            yield result
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        dimse_server.shutdown()
        for archive in archives.values():
            archive.index.dispose()


def test_every_file_gets_the_same_outcome_on_every_route(routes: Routes) -> None:
    differing = []
    for path in FILES:
        name = str(path.relative_to(TEST_FILES))
        dimse, stow, imported = routes.dimse[path], routes.stow[path], routes.imported[path]
        if dimse.status == -1:
            # No SCU can put it on the wire (no data set, no SOP Instance UID): the
            # routes that take files must refuse it too.
            same = not stow.accepted and not imported.accepted and stow.status == imported.status
        else:
            same = (
                dimse.accepted == stow.accepted == imported.accepted
                and dimse.status == stow.status == imported.status
                and dimse.SOPInstanceUID == stow.SOPInstanceUID == imported.SOPInstanceUID
            )
        if not same:
            differing.append(f"{name}: C-STORE {dimse}, STOW-RS {stow}, import {imported}")
    assert differing == [], "\n".join(differing)
    stored = [p for p in FILES if routes.imported[p].accepted]
    refused = [p for p in FILES if not routes.imported[p].accepted]
    # Sanity: the corpus is mostly storable, and what is refused says why.
    assert len(stored) > 100
    assert all(routes.imported[p].reason for p in refused)


def test_a_refusal_names_the_real_cause(routes: Routes) -> None:
    reasons = {str(p.relative_to(TEST_FILES)): o.reason for p, o in routes.imported.items()}
    # dcmtk's writer declared Explicit VR but wrote the data set in Implicit VR.
    assert "implicit VR" in reasons["SC_rgb_jpeg.dcm"]
    assert "truncated" in reasons["MR_truncated.dcm"]
    assert "DICOMDIR" in reasons["dicomdirtests/DICOMDIR"]
    assert "Part 10" in reasons["README.txt"]


# -- reading back what was stored -----------------------------------------------------


@dataclass
class ReadBack:
    path: Path
    archive: Archive
    url: str
    sop: str

    @property
    def instance_url(self) -> str:
        record = self.archive.index.instance(self.sop)
        assert record is not None
        return (
            f"{self.url}/studies/{record.StudyInstanceUID}/series/{record.SeriesInstanceUID}"
            f"/instances/{self.sop}"
        )

    @property
    def name(self) -> str:
        return str(self.path.relative_to(TEST_FILES))


class _Finder:
    """A C-FIND SCU on a DIMSE server of the archive that STOW-RS stores into."""

    def __init__(self, archive: Archive) -> None:
        self.config = DimseConfig(port=free_port())
        self.server = start_dimse(archive, self.config)
        ae = MendedAE(ae_title="FINDER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.assoc = ae.associate("127.0.0.1", self.config.port, ae_title="FILMLESS")
        assert self.assoc.is_established

    def images(self, study: str, series: str, sop: str) -> int:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study
        identifier.SeriesInstanceUID = series
        identifier.SOPInstanceUID = sop
        return sum(
            1
            for status, _answer in self.assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            )
            if status.Status in (0xFF00, 0xFF01)
        )

    def close(self) -> None:
        self.assoc.release()
        self.server.shutdown()


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + response.content, policy=email.policy.HTTP)
    out = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((str(part["Content-Type"]).replace('"', ""), payload))
    return out


def _decodable(path: Path) -> bool:
    """Whether pydicom, with the same decoders installed, decodes the pixels."""
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018
    except Exception:
        return False
    return True


def check_as_stored(got: ReadBack, _finder: _Finder) -> list[str]:
    """``transfer-syntax=*``: the data set exactly as it was sent."""
    answer = httpx.get(got.instance_url, headers={"Accept": AS_STORED}, timeout=60)
    ((_content_type, body),) = _parts(answer)
    original = got.path.read_bytes()
    sent = original[_data_set_offset(original) or 0 :]
    if body[_data_set_offset(body) or 0 :] != sent:
        return [f"{got.name}: the data set differs from the one sent"]
    return []


def check_default_retrieve(got: ReadBack, _finder: _Finder) -> list[str]:
    """PS3.18 8.7.3.5.2: without a transfer-syntax the default is Explicit VR Little
    Endian; an instance that cannot be produced in it is a 406, never a cut answer."""
    try:
        answer = httpx.get(
            got.instance_url,
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        return [f"{got.name}: connection dropped: {exc}"]
    if answer.status_code == 406:
        if "can be produced" not in answer.json()["error"]:
            return [f"{got.name}: 406 without its reason"]
        if _decodable(got.path):
            return [f"{got.name}: 406 although pydicom decodes it"]
        return []
    if answer.status_code != 200:
        return [f"{got.name}: {answer.status_code}"]
    ((content_type, body),) = _parts(answer)
    ds = pydicom.dcmread(io.BytesIO(body))
    if "transfer-syntax=1.2.840.10008.1.2.1" not in content_type or (
        str(ds.file_meta.TransferSyntaxUID) != "1.2.840.10008.1.2.1"
    ):
        return [f"{got.name}: sent as {content_type}"]
    if "PixelData" in ds and _decodable(got.path):
        original = pydicom.dcmread(got.path).pixel_array
        if not np.array_equal(ds.pixel_array, original) and not _lossy(got.path):
            return [f"{got.name}: pixels changed on the way to Explicit VR Little Endian"]
    return []


def _lossy(path: Path) -> bool:
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return bool(syntax.is_compressed and syntax not in LOSSLESS)


# Where filmless' metadata is not pydicom's ``to_json_dict`` (docs/conformance.md):
# group lengths are left out (PS3.18 F.2.2), values pydicom cannot convert are kept as
# the text that was sent (F.2.6 allows strings for such numbers), binary values over
# 1 KiB are BulkDataURIs, and an empty value inside a multi-valued element is null
# (F.2.5).
def _expected_metadata(path: Path) -> dict[str, Any]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    expected: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118
        if tag.element == 0:
            continue
        try:
            value = ds[tag].to_json_dict(lambda element: "bulk", 1024)
        except Exception:
            continue  # kept as sent, which pydicom does not do
        expected[f"{tag:08X}"] = value
    return expected


def _comparable(element: dict[str, Any]) -> dict[str, Any]:
    out = dict(element)
    if "BulkDataURI" in out:
        out["BulkDataURI"] = "bulk"
    if out.get("vr") == "SQ":
        out["Value"] = [
            {k: _comparable(v) for k, v in item.items()} for item in out.get("Value", [])
        ]
    values = out.get("Value")
    if isinstance(values, list) and len(values) > 1:
        out["Value"] = [None if v == "" else v for v in values]
    return out


def check_metadata(got: ReadBack, _finder: _Finder) -> list[str]:
    answer = httpx.get(got.instance_url + "/metadata", timeout=60)
    if answer.status_code != 200:
        return [f"{got.name}: {answer.status_code} {answer.text[:200]}"]
    try:
        (metadata,) = answer.json()  # complete JSON: nothing cut off mid-way
    except (ValueError, json.JSONDecodeError) as exc:
        return [f"{got.name}: not JSON: {exc}"]
    metadata.pop("7FE00010", None)
    differing = []
    for tag, element in _expected_metadata(got.path).items():
        if tag not in metadata:
            differing.append(f"{got.name} {tag}: missing")
        elif _comparable(metadata[tag]) != _comparable(element):
            differing.append(f"{got.name} {tag}: {metadata[tag]} != {element}")
    return differing


def _reference_picture(path: Path) -> np.ndarray | None:
    """The first frame as pydicom decodes it, to 8 bits as a display shows it."""
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        return None
    frames = int(ds.get("NumberOfFrames") or 1)
    array = ds.pixel_array
    if frames > 1:
        array = array[0]
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(array, ds), dtype=np.float64)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return np.asarray(rgb / (2**bits - 1) * 255)
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        scaled: np.ndarray = np.asarray(array, dtype=np.float64) / (2 ** int(ds.BitsStored) - 1)
        return scaled * 255
    return np.asarray(grey64(cast(Dataset, _Frame(ds, array))) * 255)


class _Frame:
    """A data set whose pixel_array is one frame (what grey64 reads)."""

    def __init__(self, ds: Dataset, array: np.ndarray) -> None:
        self._ds = ds
        self.pixel_array = array

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._ds

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._ds.get(keyword, default)


def check_rendered(got: ReadBack, _finder: _Finder) -> list[str]:
    try:
        reference = _reference_picture(got.path)
    except Exception:
        reference = None  # pydicom itself cannot decode it: nothing to compare with
    answer = httpx.get(got.instance_url + "/rendered", headers={"Accept": "image/png"}, timeout=60)
    if reference is None:
        if answer.status_code not in (200, 404, 406):
            return [f"{got.name}: {answer.status_code} {answer.text[:200]}"]
        return []
    if answer.status_code != 200:
        return [f"{got.name}: {answer.status_code} {answer.text[:200]}"]
    picture = np.asarray(Image.open(io.BytesIO(answer.content)), dtype=np.float64)
    if picture.shape != reference.shape:
        return [f"{got.name}: shape {picture.shape} != {reference.shape}"]
    difference = float(np.abs(picture - reference).mean())
    if difference > 3.0:
        return [f"{got.name}: mean difference {difference:.1f} of 255"]
    return []


def check_frames(got: ReadBack, _finder: _Finder) -> list[str]:
    ds = pydicom.dcmread(got.path, stop_before_pixels=True)
    if "Rows" not in ds:
        return []
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except ValueError:
        # NumberOfFrames "1A" (badVR.dcm): which frame is where cannot be known.
        answer = httpx.get(got.instance_url + "/frames/1", timeout=60)
        if answer.status_code != 406 or "NumberOfFrames" not in answer.json()["error"]:
            return [f"{got.name}: {answer.status_code} {answer.text[:120]}"]
        return []
    numbers = ",".join(str(n) for n in range(1, frames + 1))
    problems = []
    for accept in (
        'multipart/related; type="application/octet-stream"',
        'multipart/related; type="application/octet-stream"; transfer-syntax=*',
    ):
        answer = httpx.get(
            got.instance_url + f"/frames/{numbers}", headers={"Accept": accept}, timeout=60
        )
        if answer.status_code == 406 and not _decodable(got.path):
            continue
        if answer.status_code != 200:
            problems.append(f"{got.name} ({accept}): {answer.status_code} {answer.text[:120]}")
            continue
        parts = _parts(answer)
        if len(parts) != frames:
            problems.append(f"{got.name} ({accept}): {len(parts)} of {frames} frames")
        declared = answer.headers["content-type"]
        for part_type, _body in parts:
            if "transfer-syntax=" not in part_type and "transfer-syntax" not in declared:
                problems.append(f"{got.name} ({accept}): a part without its transfer syntax")
    return problems


def check_found(got: ReadBack, finder: _Finder) -> list[str]:
    found = httpx.get(f"{got.url}/instances?SOPInstanceUID={got.sop}", timeout=30).json()
    problems = [] if len(found) == 1 else [f"{got.name}: QIDO-RS found {len(found)}"]
    record = got.archive.index.instance(got.sop)
    assert record is not None
    matches = finder.images(record.StudyInstanceUID, record.SeriesInstanceUID, got.sop)
    if matches != 1:
        problems.append(f"{got.name}: C-FIND found {matches}")
    return problems


CHECKS = {
    "as stored": check_as_stored,
    "default retrieve": check_default_retrieve,
    "metadata": check_metadata,
    "rendered": check_rendered,
    "frames": check_frames,
    "found": check_found,
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_every_stored_file_reads_back(routes: Routes, check: str) -> None:
    assert routes.checked[check] > 100
    assert routes.problems[check] == [], "\n".join(routes.problems[check][:40])
