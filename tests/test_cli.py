"""The ``filmless`` command: settings, import, and a real ``serve`` process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from filmless.cli import main
from filmless.settings import load_settings
from pacs.dimse.reactor import MendedAE
from pacs.errors import ArchiveInUse
from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from pacs.lock import ArchiveLock
from scripts.synthetic_corpus import Patient, Rng, chest_dx
from tests.conftest import free_port
from tests.support.instances import ct_instance, write
from tests.support.postgres import PostgresServer
from tests.support.server import serve

CXR_PATIENT = Patient("SERVE", "Serve^Screen", "ISO_IR 192", "19700101", "O")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith("FILMLESS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FILMLESS_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_settings_precedence(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "filmless.toml"
    config.write_text(
        'ae_title = "FROMFILE"\ndimse_port = 2000\nallowed_calling_aets = ["A", "B"]\n'
    )
    settings = load_settings(config)
    assert (settings.ae_title, settings.dimse_port, settings.allowed_calling_aets) == (
        "FROMFILE",
        2000,
        ["A", "B"],
    )
    monkeypatch.setenv("FILMLESS_DIMSE_PORT", "3000")
    monkeypatch.setenv("FILMLESS_ALLOWED_CALLING_AETS", "CT1, MR2")
    settings = load_settings(config)
    assert (settings.ae_title, settings.dimse_port, settings.allowed_calling_aets) == (
        "FROMFILE",
        3000,
        ["CT1", "MR2"],
    )
    assert settings.index_url == f"sqlite:///{(env / 'index.sqlite').resolve()}"


def test_defaults(env: Path) -> None:
    settings = load_settings()
    assert (settings.ae_title, settings.bind_address, settings.dimse_port) == (
        "FILMLESS",
        "127.0.0.1",
        11112,
    )
    assert settings.duplicate_policy == "reject"
    assert settings.allowed_calling_aets == []


def test_relative_paths_are_resolved_once_against_the_starting_folder(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make serve`` runs with ``data_dir = "data"``: every path the parts (and npm, in
    another working directory) are given is absolute, wherever they run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FILMLESS_DATA_DIR", "data")
    monkeypatch.setenv("FILMLESS_AUDIT_LOG", "logs/audit.jsonl")
    monkeypatch.setenv("FILMLESS_INDEX_URL", "sqlite:///db/index.sqlite")
    settings = load_settings()
    assert settings.data_dir == tmp_path / "data"
    assert settings.models_dir == tmp_path / "data" / "models"
    assert settings.viewer_dir == tmp_path / "data" / "viewer"
    assert settings.audit_log == tmp_path / "logs" / "audit.jsonl"
    assert settings.index_url == f"sqlite:///{tmp_path / 'db' / 'index.sqlite'}"


def test_an_optional_viewer_install_that_fails_lets_the_server_start(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    npm = tmp_path / "bin" / "npm"
    npm.parent.mkdir()
    npm.write_text("#!/bin/sh\necho 'npm error network unreachable' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{npm.parent}{os.pathsep}{os.environ['PATH']}")
    assert main(["viewer", "install", "--optional"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # as wrapped by rich
    assert "network unreachable" in err
    assert "runs without the viewer" in err
    assert main(["viewer", "install"]) == 1


def test_config_show_round_trips(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert 'ae_title = "FILMLESS"' in shown
    saved = tmp_path / "shown.toml"
    saved.write_text(shown)
    assert load_settings(saved).model_dump() == load_settings().model_dump()


def test_config_show_hides_tokens_and_passwords_unless_asked(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "secret.toml"
    config.write_text(
        'index_url = "postgresql+psycopg://pacs:s3cret@127.0.0.1:5432/pacs"\n'
        'result_destinations = { ris = "https://bot:hunter2@127.0.0.1:8443/dicomweb" }\n'
        's3_bucket = "pacs"\n'
        's3_access_key_id = "AKIAFILMLESS"\n'
        's3_secret_access_key = "bucket-secret-1"\n'
        "[routes.central]\n"
        'destination = "https://127.0.0.1:9443/dicomweb"\n'
        'token = "route-token-1"\n'
    )
    assert main(["--config", str(config), "config", "show"]) == 0
    shown = capsys.readouterr().out
    for secret in ("s3cret", "hunter2", "route-token-1", "bucket-secret-1"):
        assert secret not in shown
    assert 's3_secret_access_key = "***"' in shown
    assert 's3_access_key_id = "AKIAFILMLESS"' in shown  # an identifier, not a secret
    assert "postgresql+psycopg://pacs:***@127.0.0.1:5432/pacs" in shown
    assert "https://bot:***@127.0.0.1:8443/dicomweb" in shown
    assert main(["--config", str(config), "config", "show", "--secrets"]) == 0
    saved = tmp_path / "shown.toml"
    saved.write_text(capsys.readouterr().out)
    assert load_settings(saved).model_dump() == load_settings(config).model_dump()


@pytest.mark.parametrize(
    "content",
    [
        'ae_title = "WAY_TOO_LONG_AE_TITLE"',
        'duplicate_policy = "keep-both"',
        "dimse_port = 0",
        "unknown = 1",
        # A worker beside other nodes needs an index and a store they share.
        'role = "worker"',
        'role = "worker"\ns3_bucket = "pacs"',
        'role = "worker"\nindex_url = "postgresql+psycopg://pacs@127.0.0.1/pacs"',
    ],
)
def test_invalid_settings_exit_2(
    env: Path, tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content + "\n")
    assert main(["--config", str(config), "config", "show"]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_import_folder(
    env: Path, tmp_path: Path, corpus: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "incoming"
    shutil.copytree(corpus[0].parent.parent, folder)
    (folder / "notes.txt").write_text("not DICOM")
    duplicate = folder / "again.dcm"
    shutil.copy(corpus[0], duplicate)
    assert main(["import", str(folder)]) == 1  # one file refused
    err = capsys.readouterr().err
    assert "notes.txt" in err
    assert "DICM" in err
    index = Index(load_settings().index_url)
    assert len(index.instances()) == len(corpus)
    index.dispose()
    # Importing again: all duplicates, nothing refused besides the text file.
    assert main(["import", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "duplicate" in err


def test_an_index_of_another_schema_is_rebuilt_by_reindex(
    env: Path, tmp_path: Path, corpus: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """An index from an older filmless is refused with the command that rebuilds it;
    ``filmless reindex`` makes it again from the stored files and loses none."""
    assert main(["import", *map(str, corpus[:12])]) == 0
    index = Index(load_settings().index_url)
    before = {r.SOPInstanceUID: r.sha256 for r in index.instances()}
    with index.writer.begin() as conn:
        conn.exec_driver_sql("DROP TABLE filmless_schema")  # what version 1 looked like
    index.dispose()
    capsys.readouterr()
    assert main(["import", str(corpus[12])]) == 1
    assert "rebuild it from the stored files with `filmless reindex`" in " ".join(
        capsys.readouterr().err.split()
    )
    assert main(["reindex"]) == 0
    assert "12 of 12 stored file(s) indexed" in " ".join(capsys.readouterr().err.split())
    index = Index(load_settings().index_url)
    assert {r.SOPInstanceUID: r.sha256 for r in index.instances()} == before
    index.dispose()
    assert main(["import", str(corpus[12])]) == 0


def test_import_missing_path(env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_serve_process(env: Path, tmp_path: Path) -> None:
    """``filmless serve`` as ``make serve`` runs it: C-ECHO, C-STORE, clean SIGTERM."""
    port, http_port = free_port(), free_port()
    process = serve(port, http_port)
    try:
        ae = MendedAE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        path = write(ct_instance(), tmp_path / "ct.dcm")
        assert assoc.send_c_store(dcmread(path)).Status == 0
        assoc.release()
        base = f"http://127.0.0.1:{http_port}/dicom-web"
        found = httpx.get(f"{base}/studies").json()
        assert [s["0020000D"]["Value"] for s in found] == [[dcmread(path).StudyInstanceUID]]
        # DICOMweb in the same process: STOW-RS lands next to the C-STORE'd instance.
        other = write(ct_instance(study=dcmread(path).StudyInstanceUID), tmp_path / "2.dcm")
        body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + other.read_bytes()
        stowed = httpx.post(
            f"{base}/studies",
            content=body + b"\r\n--B--\r\n",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'},
        )
        assert stowed.status_code == 200, stowed.text
        instances = httpx.get(f"{base}/studies/{dcmread(path).StudyInstanceUID}/instances")
        assert len(instances.json()) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output.decode()
    assert b"DIMSE listening" in output
    index = Index(load_settings().index_url)
    assert len(index.instances()) == 2
    index.dispose()


def _second_server_fails(**settings: str) -> str:
    """``filmless serve`` started beside a running one: it must exit 1; its message."""
    second = subprocess.run(
        [sys.executable, "-m", "filmless.cli", "serve"],
        env={
            **os.environ,
            "FILMLESS_DIMSE_PORT": str(free_port()),
            "FILMLESS_HTTP_PORT": str(free_port()),
            **settings,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 1, second.stderr
    return " ".join(second.stderr.split())


def test_a_second_server_on_the_same_data_fails_at_once_and_changes_nothing(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two servers on one data folder: the second would reconcile (move the first's
    files being stored) before failing to bind its ports. It stops first."""
    port, http_port = free_port(), free_port()
    first = serve(port, http_port, FILMLESS_DIMSE_WORKERS="2")
    try:
        ae = MendedAE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
        assert assoc.is_established
        assert assoc.send_c_store(ct_instance()).Status == 0
        assoc.release()
        stored = sorted(p for p in env.rglob("*.dcm"))
        assert "is in use by filmless pid" in _second_server_fails()
        assert sorted(p for p in env.rglob("*.dcm")) == stored
        assert not (env / "orphans").exists() or not any((env / "orphans").rglob("*"))
        assert main(["reindex"]) == 1  # nor may the index be rebuilt under it
        assert "in use" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=60)
    assert first.returncode == 0, output.decode()


def test_serve_spreads_associations_over_workers(env: Path, tmp_path: Path) -> None:
    """With two worker processes, two concurrent associations land on different workers."""
    port = free_port()
    process = serve(port, free_port(), FILMLESS_DIMSE_WORKERS="2")
    try:
        ae = MendedAE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        first = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
        second = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
        assert first.is_established
        assert second.is_established
        for n, assoc in enumerate((first, second)):
            for i in range(3):
                ds = ct_instance(study="1.2.3", series=f"1.2.3.{n}", seed=i)
                assert assoc.send_c_store(ds).Status == 0
        first.release()
        second.release()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    log = output.decode()
    assert process.returncode == 0, log
    accepted = re.findall(r"(filmless-dimse-\d) pacs.dimse.associations: association accepted", log)
    assert sorted(accepted) == ["filmless-dimse-0", "filmless-dimse-1"]
    index = Index(load_settings().index_url)
    assert len(index.instances()) == 6
    index.dispose()


def test_jobs_list_and_retry(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env.mkdir(parents=True)
    index = Index(load_settings().index_url)
    index.create_schema()
    queue = JobQueue(index)
    queue.enqueue("cxr-densenet121", "1.2.3", "1.2.3.4")
    claimed = queue.claim("w")
    assert claimed is not None
    queue.fail(claimed, "decoder missing", max_attempts=1)
    assert main(["jobs", "list", "--state", "failed"]) == 0
    listed = capsys.readouterr().err
    assert "decoder missing" in listed
    assert "1.2.3.4" in listed
    assert main(["jobs", "retry"]) == 0
    assert "1 job(s) queued again" in capsys.readouterr().err
    assert queue.jobs()[0].state == JobState.PENDING
    index.dispose()


@pytest.mark.slow
def test_serve_screens_a_stored_chest_xray(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``filmless serve`` with the demo chest X-ray model: C-STORE in, SR found by QIDO-RS."""
    monkeypatch.setenv("FILMLESS_MODELS_DIR", str(tmp_path / "models"))
    assert main(["models", "build", "--task", "chest-xray"]) == 0
    frontal, _ = chest_dx(Rng(21), CXR_PATIENT, 0.05, "20260101", "SERVE")
    port, http_port = free_port(), free_port()
    process = serve(port, http_port, FILMLESS_DIMSE_WORKERS="2")
    try:
        ae = MendedAE(ae_title="MODALITY")
        ae.add_requested_context(frontal.SOPClassUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
        assert assoc.send_c_store(frontal).Status == 0
        assoc.release()
        url = f"http://127.0.0.1:{http_port}/dicom-web/studies/{frontal.StudyInstanceUID}/series"
        deadline = time.monotonic() + 120
        reports: list[object] = []
        while time.monotonic() < deadline and not reports:
            reports = httpx.get(url, params={"Modality": "SR"}).json()
            time.sleep(0.5)
        assert len(reports) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output.decode()
    assert b"runs on CPUExecutionProvider" in output


def test_token_new_names_the_settings_table(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "new", "--name", "ris", "--scope", "write"]) == 0
    captured = capsys.readouterr()
    assert "add to [api_tokens] in filmless.toml" in captured.err
    token, line = captured.out.splitlines()
    assert line.startswith('ris = "write:')
    assert len(token) > 20


@pytest.mark.postgresql
def test_one_server_per_postgresql_index(
    env: Path, tmp_path: Path, postgres: PostgresServer
) -> None:
    """Two data folders on one PostgreSQL index: each would reconcile the other's files
    away; the second server stops at the index's advisory lock."""
    url = postgres.fresh_database()
    first = serve(free_port(), free_port(), FILMLESS_INDEX_URL=url)
    try:
        failure = _second_server_fails(
            FILMLESS_DATA_DIR=str(tmp_path / "other"), FILMLESS_INDEX_URL=url
        )
        assert "advisory lock" in failure
    finally:
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=60)
    assert first.returncode == 0, output.decode()


@pytest.mark.postgresql
def test_nodes_of_a_shared_store_hold_the_index_lock_together(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """With object storage, nodes share the advisory lock; the first of them holds it
    alone while it sets orphans aside, and reindex still needs every node stopped."""
    index = Index(postgres.fresh_database())
    index.create_schema()
    first = ArchiveLock(tmp_path / "a", index, shared=True)
    second = ArchiveLock(tmp_path / "b", index, shared=True, wait_seconds=0)
    rebuild = ArchiveLock(tmp_path / "c", index)
    try:
        first.acquire()
        assert first.alone
        with pytest.raises(ArchiveInUse, match="reindex"):  # joining waits for alone
            second.acquire()
        first.share()
        assert not first.alone
        second.acquire()
        assert not second.alone
        with pytest.raises(ArchiveInUse, match="advisory lock"):
            rebuild.acquire()
        first.release()
        second.release()
        rebuild.acquire()
        assert rebuild.alone
    finally:
        for lock in (first, second, rebuild):
            lock.release()
        index.dispose()
