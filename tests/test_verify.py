"""Startup reconciliation and `filmless verify` against what a crash or a disk can do."""

from __future__ import annotations

from pathlib import Path

import pytest

from filmless.cli import main
from filmless.settings import load_settings
from filmless.wiring import build_archive
from pacs.archive import Archive, Origin
from pacs.store import FsBlobStore
from pacs.verify import reconcile, verify
from tests.support.instances import ct_instance, source


def _store(archive: Archive, count: int) -> list[str]:
    uids = []
    for n in range(count):
        ds = ct_instance(patient_id="VERIFY", seed=n)
        archive.ingest(source(ds), Origin.DIMSE)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def test_reconcile_both_ways_and_verify(archive: Archive) -> None:
    uids = _store(archive, 4)
    records = {r.SOPInstanceUID: r for r in archive.index.instances()}
    store = archive.store
    assert isinstance(store, FsBlobStore)
    (store.staging / "deadbeef.part").write_bytes(b"half a file")  # killed while receiving
    orphan = store.objects / "ab" / "cd" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.0123.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"renamed, never committed")
    store.path(records[uids[0]].path).unlink()  # lost by the disk
    corrupt = store.path(records[uids[1]].path)
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    result = reconcile(archive)
    assert result.staging_removed == 1
    assert [Path(p).name for p in result.orphans_moved] == [orphan.name]
    assert not orphan.exists()
    assert (store.root / "orphans").is_dir()
    assert result.missing == [uids[0]]
    assert list(store.staging.iterdir()) == []

    seen: list[int] = []
    checked = verify(archive, seen.append)
    assert checked.checked == 4
    assert checked.missing == [uids[0]]
    assert checked.corrupt == [uids[1]]
    assert not checked.ok
    assert sum(seen) == sum(records[u].size for u in uids[1:])


def test_verify_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FILMLESS_DATA_DIR", str(tmp_path / "data"))
    archive = build_archive(load_settings())
    uids = _store(archive, 2)
    assert main(["verify"]) == 0
    assert "2 instance(s) checked: 0 missing, 0 differing" in capsys.readouterr().err
    record = archive.index.instance(uids[1])
    assert record is not None
    assert isinstance(archive.store, FsBlobStore)
    archive.store.path(record.path).write_bytes(b"not what was stored")
    archive.index.dispose()
    assert main(["verify"]) == 1
    err = capsys.readouterr().err
    assert "1 differing from the index" in err
    assert uids[1] in err
