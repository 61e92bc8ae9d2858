"""Object storage against a real S3 server (SeaweedFS): what only it can get wrong.

The contract shared with the folder store is in ``test_store.py``; the archive, DIMSE,
DICOMweb and durability suites run on both stores (``EVERY_BLOB_STORE``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import obstore
import pytest

from pacs.archive import Archive, Origin
from pacs.errors import StorageFailure
from pacs.index import Index
from pacs.objectstore import RangeReader, S3BlobStore
from pacs.verify import reconcile, verify
from tests.conftest import free_port, s3_store
from tests.support.instances import ct_instance, source
from tests.support.s3 import SeaweedServer

pytestmark = pytest.mark.s3


@pytest.fixture
def store(seaweedfs: SeaweedServer, tmp_path: Path) -> S3BlobStore:
    return s3_store(seaweedfs, tmp_path)


@pytest.fixture
def s3_archive(store: S3BlobStore, tmp_path: Path) -> Archive:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    return Archive(store, index)


def test_reads_are_ranged_not_whole_objects(store: S3BlobStore) -> None:
    """A frame of a large multi-frame object costs its bytes, not the object (a seek and
    a read are one ranged GET)."""
    data = os.urandom(12 << 20)
    staged = store.stage(b"", io.BytesIO(data))
    relative = store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5", staged.sha256)
    store.commit(staged, relative)  # above one part: a multipart upload
    with store.open(relative) as stream:
        stream.seek(10 << 20)
        assert stream.read(4096) == data[10 << 20 : (10 << 20) + 4096]
        assert isinstance(stream, RangeReader)
        assert stream.fetched <= 3 << 20, stream.fetched
    with store.open(relative) as stream:
        assert stream.read() == data  # and whole, when a reader wants it whole


def test_failed_upload_leaves_no_row_no_object_no_staging(
    seaweedfs: SeaweedServer, tmp_path: Path
) -> None:
    """The index commits only after the upload: storage that is down is a failure with
    a reason, and nothing is left behind (PS3.4 B.2.3: 0xA7xx, out of resources)."""
    prefix = seaweedfs.fresh_prefix()
    down = S3BlobStore(
        tmp_path / "data",
        bucket="filmless",
        endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens
        prefix=prefix,
        region="us-east-1",
        access_key_id="x",
        secret_access_key="y",
        timeout_seconds=2,
    )
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    archive = Archive(down, index)
    with pytest.raises(StorageFailure, match="object storage"):
        archive.ingest(source(ct_instance(patient_id="DOWN")), Origin.DIMSE)
    assert index.instances() == []
    assert list(down.staging.iterdir()) == []
    assert list(s3_store(seaweedfs, tmp_path / "other", prefix).listing()) == []


def test_reconcile_and_verify_list_and_hash_the_bucket(
    s3_archive: Archive, store: S3BlobStore
) -> None:
    uids = []
    for n in range(3):
        ds = ct_instance(patient_id="S3VERIFY", seed=n)
        s3_archive.ingest(source(ds), Origin.DIMSE)
        uids.append(str(ds.SOPInstanceUID))
    records = {r.SOPInstanceUID: r for r in s3_archive.index.instances()}
    orphan = "ab/cd/1.2.3/1.2.3.4/1.2.3.4.5.0123456789abcdef.dcm"
    obstore.put(store.client, store.key(orphan), b"uploaded, never committed")
    store.delete(records[uids[0]].path)  # lost by the storage
    obstore.put(store.client, store.key(records[uids[1]].path), b"not what was stored")

    shared = reconcile(s3_archive, orphans=False)  # other nodes may be uploading
    assert shared.orphans_moved == []
    assert shared.missing == [uids[0]]
    alone = reconcile(s3_archive)
    assert [Path(p).name for p in alone.orphans_moved] == [Path(orphan).name]
    assert alone.orphans_moved[0].startswith(f"s3://filmless/{store.prefix}/orphans/")
    assert orphan not in {b.relative for b in store.listing()}

    checked = verify(s3_archive)
    assert (checked.checked, checked.missing, checked.corrupt) == (3, [uids[0]], [uids[1]])
