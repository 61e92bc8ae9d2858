"""The one ingest path: durability order, duplicates, and nothing left behind on failure;
with blobs in a folder and in object storage."""

from __future__ import annotations

import errno
import io
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from pacs.archive import Archive, InstanceSource, Origin
from pacs.errors import (
    DuplicateRejected,
    IndexFailure,
    InvalidInstance,
    InvalidUID,
    SOPClassMismatch,
    StorageFailure,
)
from pacs.events import InstanceStored
from pacs.index import IndexAction, count_rows, instance
from pacs.part10 import PREAMBLE, read_file_meta
from pacs.store import FsBlobStore
from tests.conftest import with_policy
from tests.support.instances import ct_instance, part10, source

EVERY_BLOB_STORE = True


def _leftovers(archive: Archive) -> tuple[list[Path], list[str], int]:
    staged = list(archive.store.staging.iterdir())
    blobs = [blob.relative for blob in archive.store.listing()]
    with archive.index.reading() as conn:
        rows = count_rows(conn, instance)
    return staged, blobs, rows


def test_ingest_stores_bytes_and_row(archive: Archive) -> None:
    events: list[InstanceStored] = []
    archive.events.subscribe(events.append)
    ds = ct_instance()
    data = part10(ds)
    outcome = archive.ingest(InstanceSource.from_part10(io.BytesIO(data)), Origin.IMPORT)
    assert outcome.action == IndexAction.STORED
    with archive.open(outcome.record) as stored:
        stored_bytes = stored.read()
    # Same data set bytes after our own meta group.
    original = io.BytesIO(data)
    read_file_meta(original)
    copy = io.BytesIO(stored_bytes)
    read_file_meta(copy)
    assert copy.read() == original.read()
    parsed = pydicom.dcmread(io.BytesIO(stored_bytes))
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID
    assert len(events) == 1
    assert events[0].record.SOPInstanceUID == ds.SOPInstanceUID
    assert _leftovers(archive)[0] == []


def test_preamble_is_zeroed(archive: Archive) -> None:
    """A PE/ELF header hidden in the preamble must never be served back."""
    data = bytearray(part10(ct_instance()))
    data[:4] = b"MZ\x90\x00"
    data[64:68] = b"\x7fELF"
    outcome = archive.ingest(InstanceSource.from_part10(io.BytesIO(bytes(data))), Origin.IMPORT)
    with archive.open(outcome.record) as stored:
        assert stored.read(128) == PREAMBLE


def test_identical_copy_is_success_with_one_copy(archive: Archive) -> None:
    ds = ct_instance()
    first = archive.ingest(source(ds), Origin.DIMSE)
    again = archive.ingest(source(ds), Origin.DIMSE)
    assert again.action == IndexAction.DUPLICATE
    assert again.record == first.record
    staged, blobs, rows = _leftovers(archive)
    assert (staged, len(blobs), rows) == ([], 1, 1)


def test_different_copy_is_rejected_by_default(archive: Archive) -> None:
    ds = ct_instance()
    first = archive.ingest(source(ds), Origin.DIMSE)
    ds.PatientName = "Changed^Name"
    with pytest.raises(DuplicateRejected, match="policy is 'reject'"):
        archive.ingest(source(ds), Origin.DIMSE)
    staged, blobs, rows = _leftovers(archive)
    assert (staged, rows) == ([], 1)
    assert blobs == [first.record.path]


def test_different_copy_replaces_under_overwrite(archive: Archive) -> None:
    overwriting = with_policy(archive, "overwrite")
    ds = ct_instance()
    first = overwriting.ingest(source(ds), Origin.DIMSE)
    ds.PatientName = "Changed^Name"
    second = overwriting.ingest(source(ds), Origin.DIMSE)
    assert second.action == IndexAction.OVERWRITTEN
    assert second.record.sha256 != first.record.sha256
    staged, blobs, rows = _leftovers(overwriting)
    assert (staged, rows) == ([], 1)
    assert blobs == [second.record.path]
    with overwriting.open(second.record) as stored:
        assert str(pydicom.dcmread(stored).PatientName) == "Changed^Name"


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), InvalidUID),
        (lambda ds: delattr(ds, "SeriesInstanceUID"), InvalidUID),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.x"), InvalidUID),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.4"), SOPClassMismatch),
        (lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.4.5.6"), InvalidInstance),
    ],
    ids=["no-study", "no-series", "bad-series", "sop-class", "sop-instance"],
)
def test_bad_instances_leave_nothing(
    archive: Archive, mutate: object, error: type[Exception]
) -> None:
    ds = ct_instance()
    part10(ds)  # meta group from the intact data set: the "announced" identity
    assert callable(mutate)
    mutate(ds)
    data = part10(ds, fill_meta=False)
    # As a C-STORE request announces them: the UIDs are a statement of the sender.
    source = replace(InstanceSource.from_part10(io.BytesIO(data)), announced=True)
    with pytest.raises(error):
        archive.ingest(source, Origin.DIMSE)
    assert _leftovers(archive) == ([], [], 0)


def test_a_files_meta_group_does_not_overrule_its_data_set(archive: Archive) -> None:
    """A file is stored under the UIDs of its data set, as dcmtk's storescu would send it
    (pydicom's rtdose.dcm has another SOP Instance UID in its meta group)."""
    ds = ct_instance()
    part10(ds)
    announced = str(ds.file_meta.MediaStorageSOPInstanceUID)
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    data = part10(ds, fill_meta=False)
    outcome = archive.ingest(InstanceSource.from_part10(io.BytesIO(data)), Origin.IMPORT)
    assert outcome.record.SOPInstanceUID == "1.2.3.4.5.6"
    assert any(announced in note for note in outcome.notes)
    with archive.open(outcome.record) as stored:
        assert read_file_meta(stored).MediaStorageSOPInstanceUID == "1.2.3.4.5.6"
    assert archive.index.instance(announced) is None


def test_unparseable_and_truncated_leave_nothing(archive: Archive) -> None:
    data = part10(ct_instance())
    for broken in (data[:-7], data[:400] + b"\xff" * 50):
        with pytest.raises(InvalidInstance):
            archive.ingest(InstanceSource.from_part10(io.BytesIO(broken)), Origin.DIMSE)
    with pytest.raises(InvalidInstance, match="Part 10"):
        archive.ingest(InstanceSource.from_part10(io.BytesIO(b"not dicom at all")), Origin.IMPORT)
    assert _leftovers(archive) == ([], [], 0)


def test_disk_error_on_commit_leaves_nothing(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if isinstance(archive.store, FsBlobStore):
        monkeypatch.setattr("pacs.store.os.replace", fail)
    else:
        monkeypatch.setattr("pacs.objectstore.obstore.put", fail)
    with pytest.raises(StorageFailure, match="Input/output error"):
        archive.ingest(source(ct_instance()), Origin.DIMSE)
    assert _leftovers(archive) == ([], [], 0)


def test_index_failure_removes_the_blob(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_args: object) -> None:
        raise IndexFailure("the index cannot commit: database is locked")

    monkeypatch.setattr(archive.index, "add", down)
    with pytest.raises(IndexFailure):
        archive.ingest(source(ct_instance()), Origin.DIMSE)
    assert _leftovers(archive) == ([], [], 0)


def test_delete_instance(archive: Archive) -> None:
    outcome = archive.ingest(source(ct_instance()), Origin.DIMSE)
    removed = archive.delete_instance(outcome.record.SOPInstanceUID)
    assert removed == outcome.record
    assert _leftovers(archive) == ([], [], 0)


def test_corpus_through_ingest(archive: Archive, corpus: list[Path]) -> None:
    for path in corpus:
        assert archive.ingest_file(path).action == IndexAction.STORED
    with archive.index.reading() as conn:
        assert count_rows(conn, instance) == len(corpus)
