"""The blob store's contract, for the folder store and for object storage (SeaweedFS)."""

from __future__ import annotations

import errno
import hashlib
import io
from pathlib import Path

import pytest

from pacs import writeback
from pacs.errors import InvalidUID, StorageFailure
from pacs.store import FsBlobStore
from tests.conftest import StoreFactory

EVERY_BLOB_STORE = True
STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_stage_commit_read_delete(tmp_path: Path, blob_stores: StoreFactory) -> None:
    store = blob_stores(tmp_path)
    staged = store.stage(b"head", io.BytesIO(b"body" * 1000))
    assert staged.size == 4004
    assert staged.sha256 == hashlib.sha256(b"head" + b"body" * 1000).hexdigest()
    relative = store.relative_path(STUDY, SERIES, SOP, staged.sha256)
    assert relative.endswith(f"{STUDY}/{SERIES}/{SOP}.{staged.sha256[:16]}.dcm")
    store.commit(staged, relative)
    with store.open(relative) as stream:
        assert stream.read() == b"head" + b"body" * 1000
        stream.seek(4000)  # a seekable reader: the archive reads frames at their offsets
        assert stream.read(10) == b"body"
        assert stream.tell() == 4004
    with store.local(relative) as copy:
        assert copy.read_bytes() == b"head" + b"body" * 1000
    assert [(b.relative, b.size) for b in store.listing()] == [(relative, 4004)]
    assert list(store.staging.iterdir()) == []
    store.delete(relative)
    store.delete(relative)  # already gone: not an error
    assert list(store.listing()) == []
    with pytest.raises(FileNotFoundError):
        store.open(relative)
    if isinstance(store, FsBlobStore):  # emptied folders go too, the store root stays
        assert list(store.objects.iterdir()) == []


def test_a_blob_set_aside_leaves_the_store(tmp_path: Path, blob_stores: StoreFactory) -> None:
    store = blob_stores(tmp_path)
    staged = store.stage(b"", io.BytesIO(b"never indexed"))
    relative = store.relative_path(STUDY, SERIES, SOP, staged.sha256)
    store.commit(staged, relative)
    where = store.set_aside(relative)
    assert "orphans/" in where
    assert where.endswith(relative)
    assert list(store.listing()) == []


@pytest.mark.parametrize(
    ("study", "series", "sop"),
    [
        ("..", SERIES, SOP),
        (STUDY, "../..", SOP),
        (STUDY, SERIES, "1.2/../../x"),
        ("/etc", SERIES, SOP),
    ],
)
def test_paths_only_from_valid_uids(tmp_path: Path, study: str, series: str, sop: str) -> None:
    store = FsBlobStore(tmp_path)
    with pytest.raises(InvalidUID):
        store.relative_path(study, series, sop, "0" * 64)


def test_no_path_escapes_the_store(tmp_path: Path) -> None:
    store = FsBlobStore(tmp_path / "data")
    for hostile in ("../../etc/passwd", "/etc/passwd", "ab/../../../etc/passwd", "a\0b"):
        with pytest.raises(ValueError, match="escapes"):
            store.path(hostile)
    assert store.path("ab/cd/1.2/3.4/5.6.dcm") == store.objects / "ab/cd/1.2/3.4/5.6.dcm"
    assert store.path("ab/cd/1.2/3.4/5.6.dcm").is_absolute()
    assert store.path("") == store.objects  # an index row without a file (benchmarks)


def test_disk_full_is_a_storage_failure_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FsBlobStore(tmp_path)

    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pacs.store.os.fsync", no_space)
    # The staging file's fsync runs beside the caller; the commit waits for it and fails.
    staged = store.stage(b"head", io.BytesIO(b"body"))
    with pytest.raises(StorageFailure, match="no space left"):
        store.commit(staged, "aa/bb/1.2.3/1.2.3.4/1.2.3.4.5.0123456789abcdef.dcm")
    assert list(store.staging.iterdir()) == []
    assert list(store.objects.rglob("*.dcm")) == []


@pytest.mark.skipif(not writeback.available(), reason="sync_file_range is Linux's")
def test_the_writeback_hint_reaches_the_kernel(tmp_path: Path) -> None:
    """The C binding's argument types are right: the kernel takes the request for a file
    just written and refuses a closed descriptor (EBADF), which the caller ignores."""
    path = tmp_path / "piece.bin"
    with path.open("wb") as out:
        out.write(b"x" * (1 << 20))
        out.flush()
        assert writeback.start_writeback(out.fileno(), 0, 1 << 20)
        fd = out.fileno()
    assert not writeback.start_writeback(fd, 0, 1 << 20)
    assert not writeback.start_writeback(fd, 0, 0)


def test_a_staging_file_written_in_pieces_is_the_bytes_and_hash_sent(tmp_path: Path) -> None:
    """Pieces past the writeback step ask for writeback as they go; what is staged and
    committed is still every byte in order, durable, with the hash of all of them."""
    store = FsBlobStore(tmp_path)
    pieces = [bytes([n]) * (700 << 10) for n in range(12)]  # 8.2 MiB in uneven steps
    writer = store.open_staging(b"head")
    for piece in pieces:
        writer.write(piece)
    staged = writer.finish()
    expected = b"head" + b"".join(pieces)
    assert staged.size == len(expected)
    assert staged.sha256 == hashlib.sha256(expected).hexdigest()
    relative = "ab/cd/1.2.3/1.2.3.4/1.2.3.4.5.0123456789abcdef.dcm"
    store.commit(staged, relative)
    assert store.path(relative).read_bytes() == expected
    assert list(store.staging.iterdir()) == []
