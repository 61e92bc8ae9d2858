from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

import pacs.header as header_module
from pacs.errors import InvalidInstance, InvalidUID
from pacs.header import InstanceHeader, normalise_name, read_header
from pacs.part10 import FileMeta, encode_file_meta, read_file_meta
from pacs.structure import check_structure
from tests.support.instances import ct_instance, part10


def _stage(tmp_path: Path, data: bytes, meta: FileMeta | None = None) -> tuple[Path, int, FileMeta]:
    stream = io.BytesIO(data)
    found = read_file_meta(stream)
    meta = meta or found
    head = encode_file_meta(meta)
    path = tmp_path / "staged.dcm"
    path.write_bytes(head + stream.read())
    return path, len(head), meta


def test_reads_every_indexed_level(corpus: list[Path], tmp_path: Path) -> None:
    for source in corpus:
        ds = pydicom.dcmread(source)
        path, offset, meta = _stage(tmp_path, source.read_bytes())
        header = read_header(path, offset, meta)
        assert header.instance.SOPInstanceUID == ds.SOPInstanceUID
        assert header.study.StudyInstanceUID == ds.StudyInstanceUID
        assert header.series.Modality == ds.Modality
        assert header.patient.PatientName == str(ds.PatientName)
        assert header.instance.Rows == ds.Rows
        if ds.Modality == "MG":
            assert header.instance.ViewPosition in ("CC", "MLO")
            assert header.instance.ImageLaterality in ("L", "R")
            assert header.instance.PresentationIntentType == "FOR PRESENTATION"


def test_person_names_normalise_for_fuzzy_matching() -> None:
    assert normalise_name("Müller^Jürgen") == "muller jurgen"
    assert normalise_name("GARÇON^Amélie^^") == "garcon amelie"


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uid_is_refused(tmp_path: Path, keyword: str) -> None:
    ds = ct_instance()
    part10(ds)  # fills the meta group while the data set is still whole
    delattr(ds, keyword)
    path, offset, meta = _stage(tmp_path, part10(ds))
    with pytest.raises(InvalidUID, match=keyword):
        read_header(path, offset, meta)


def test_malformed_uid_is_refused(tmp_path: Path) -> None:
    ds = ct_instance(study="1.2.abc")
    path, offset, meta = _stage(tmp_path, part10(ds))
    with pytest.raises(InvalidUID, match="StudyInstanceUID"):
        read_header(path, offset, meta)


def test_garbage_is_refused(tmp_path: Path) -> None:
    meta = FileMeta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    head = encode_file_meta(meta)
    path = tmp_path / "garbage.dcm"
    path.write_bytes(head + b"\x08\x00\x18\x00UI\xff\x7f" + b"x" * 40)
    with pytest.raises(InvalidInstance):
        read_header(path, len(head), meta)


TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
_INDEXED_INTEGERS = (
    "SeriesNumber",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
_REQUEST_KEYS = ("ScheduledProcedureStepID", "RequestedProcedureID")


def _pydicom_text(ds: pydicom.Dataset | None, keyword: str) -> str:
    """The indexed text as read through pydicom's own value conversion."""
    value = None if ds is None else ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip("\x00 ")


def _pydicom_integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def test_indexed_values_are_pydicoms_for_every_test_file(tmp_path: Path) -> None:
    """The indexed attributes come from the header's DICOM JSON (read from the bytes
    where it can be): for every file pydicom ships that the archive takes, each equals
    what pydicom's own conversion of that element gives."""
    compared = 0
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            with path.open("rb") as stream:
                meta = read_file_meta(stream, lenient=True)
                body = stream.read()
            staged, offset, meta = _stage(tmp_path, encode_file_meta(meta) + body, meta)
            header = read_header(staged, offset, meta)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        levels = (header.patient, header.study, header.series, header.instance)
        request = ds.get("RequestAttributesSequence")
        item = request[0] if request else None
        for level in levels:
            for keyword in level.__slots__:
                found = getattr(level, keyword)
                if keyword in _INDEXED_INTEGERS:
                    expected: object = _pydicom_integer(ds, keyword)
                elif keyword in _REQUEST_KEYS:
                    expected = _pydicom_text(item, keyword)
                else:
                    expected = _pydicom_text(ds, keyword)
                assert found == expected, f"{path.name} {keyword}"
        compared += 1
    assert compared > 50


def test_the_header_collected_on_the_walk_is_the_one_pydicom_reads(
    corpus: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explicit VR Little Endian headers are read from the length-checked walk instead of
    by pydicom's reader; over pydicom's own test files (many vendors, sequences of both
    lengths, deferred values, odd VRs) and the corpus, what is indexed must not change,
    and what is refused must be refused for the same reason."""
    sources = [*sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))]
    sources += corpus
    collected = 0

    def read_both(path: Path, offset: int, meta: FileMeta) -> tuple[object, object]:
        outcomes: list[object] = []
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(header_module, "collect_header", _structure_only)
            try:
                outcomes.append(read_header(path, offset, meta))
            except InvalidInstance as exc:
                outcomes.append(f"refused: {exc}")
            monkeypatch.undo()
        return outcomes[0], outcomes[1]

    for source in sources:
        try:
            path, offset, meta = _stage(tmp_path, source.read_bytes())
        except InvalidInstance:
            continue  # no usable meta group: not a case for the header reader
        syntax = UID(meta.TransferSyntaxUID)
        if not syntax.is_transfer_syntax or syntax.is_implicit_VR or not syntax.is_little_endian:
            continue
        fast, reference = read_both(path, offset, meta)
        assert fast == reference, source.name
        collected += isinstance(fast, InstanceHeader)
    assert collected > 40


def _structure_only(path: Path, offset: int, *, defer_size: int | None) -> None:
    check_structure(path, offset, explicit=True, little=True)
