"""Hostile and unlucky peers against ``filmless serve`` as deployed (a child process with
its DIMSE worker processes): idle sockets, absurd length claims, TLS, many associations."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from benchmarks.support import session_memory
from filmless.wiring import configure_logging
from pacs.dimse.reactor import MendedAE
from tests.support.server import Server, closed_by_peer, still_open
from tests.support.tls import Pki, make_pki

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
]

_QUIET = {"FILMLESS_SCREENING": "false", "FILMLESS_DIMSE_WORKERS": "2"}
# Hostile peers connect from other loopback addresses than the modality's.
IDLER = "127.0.0.2"
GREEDY = "127.0.0.3"
# A handshake timeout far beyond the test, so that a stalled peer holds its place
# throughout: a modality served meanwhile was served despite it, not after it.
HELD_S = "600"


def _small_file(corpus: list[Path]) -> Path:
    for path in corpus:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and ds.Modality == "DX":
            return path
    raise AssertionError("the corpus has no Explicit VR Little Endian DX image")


def _storescu(port: int, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = ["storescu", "-aet", "MODALITY", "-aec", "FILMLESS", *options]
    return subprocess.run(
        [*command, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _stored(server: Server, path: Path) -> bool:
    uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    answer = httpx.get(f"{server.url}/instances", params={"SOPInstanceUID": uid}, timeout=30)
    return answer.status_code == 200 and len(answer.json()) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_idle_sockets_and_huge_claims_do_not_stop_storescu(
    tmp_path: Path, corpus: list[Path], workers: int
) -> None:
    """50 idle sockets, a 512 MiB A-ASSOCIATE-RQ and a 512 MiB P-DATA-TF claim; measured
    on pynetdicom alone, 11 idle sockets refused every association and one such claim
    took memory from 49 MiB to over 1 GiB. One DIMSE process (the server is then one
    process) or two worker processes behind the acceptor."""
    server = Server(
        tmp_path / "data",
        FILMLESS_SCREENING="false",
        FILMLESS_DIMSE_WORKERS=str(workers),
        FILMLESS_HANDSHAKE_TIMEOUT=HELD_S,
    )
    server.start()
    try:
        _attack(server, corpus, single_process=workers == 1)
    finally:
        server.stop()


def _attack(server: Server, corpus: list[Path], *, single_process: bool) -> None:
    """The attackers connect from other loopback addresses than storescu's, as hostile
    hosts would: one address's connections are capped (max_pending_per_host), so that
    they cannot take the places of the others."""
    baseline = session_memory(server.process.pid)[1]  # type: ignore[union-attr]
    address = ("127.0.0.1", server.port)
    idle = [socket.create_connection(address, source_address=(IDLER, 0)) for _ in range(50)]
    claims: list[socket.socket] = []
    greedy = None
    raw = None
    try:
        for _ in range(3):
            claim = socket.create_connection(address, source_address=(GREEDY, 0))
            claims.append(claim)
            claim.sendall(struct.pack(">BBL", 0x01, 0, 512 << 20) + bytes(1 << 16))
        ae = MendedAE(ae_title="GREEDY")
        ae.add_requested_context(Verification)
        greedy = ae.associate(*address, ae_title="FILMLESS", bind_address=(GREEDY, 0))
        assert greedy.is_established
        raw = greedy.dul.socket.socket  # type: ignore[union-attr]
        assert raw is not None
        raw.sendall(struct.pack(">BBL", 0x04, 0, 512 << 20) + bytes(1 << 16))
        path = _small_file(corpus)
        run = _storescu(server.port, path)
        assert run.returncode == 0, run.stdout + run.stderr
        # Served while the idle ones held their places (the handshake timeout, which
        # would have freed them, is far away): at least one address's worth.
        assert sum(still_open(sock) for sock in idle) >= 32
        assert _stored(server, path)
        rss = session_memory(server.process.pid)[1]  # type: ignore[union-attr]
        assert rss - baseline < 32 << 20, f"{rss >> 20} MiB, at rest {baseline >> 20} MiB"
        if single_process:
            assert rss < 300 << 20
        # The claimants were cut off, not served.
        deadline = time.monotonic() + 10
        while greedy.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not greedy.is_established
        for claim in claims:
            assert closed_by_peer(claim)
    finally:
        for sock in idle + claims:
            sock.close()
        if greedy is not None:
            greedy.abort()
        if raw is not None:
            raw.close()  # pynetdicom leaves it open once the peer has cut the association


def test_storescu_over_tls_while_a_tls_peer_stalls(tmp_path: Path, corpus: list[Path]) -> None:
    """pynetdicom alone runs the handshake on the accepting thread: one idle TLS socket
    blocked every new association."""
    pki = make_pki(tmp_path)
    tls = Server(
        tmp_path / "data",
        FILMLESS_TLS_CERT=str(pki.server_cert),
        FILMLESS_TLS_KEY=str(pki.server_key),
        FILMLESS_TLS_CLIENT_CA=str(pki.ca),
        FILMLESS_HANDSHAKE_TIMEOUT=HELD_S,
        **_QUIET,
    )
    tls.start()
    stalled = _stalled_tls_peers(tls.port, pki)
    try:
        path = _small_file(corpus)
        client = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        run = _storescu(tls.port, path, *client)
        assert run.returncode == 0, run.stdout + run.stderr
        # Served while the stalled peers were still connected, not after they timed out.
        assert all(still_open(sock) for sock in stalled)
        assert _stored(tls, path)
        # Without a client certificate, or without TLS, nothing is stored.
        other = corpus[-1]
        run = _storescu(tls.port, other, "+tla", "+cf", str(pki.ca))
        assert run.returncode != 0
        run = _storescu(tls.port, other)
        assert run.returncode != 0
        assert not _stored(tls, other)
    finally:
        for sock in stalled:
            sock.close()
        tls.stop()


def _stalled_tls_peers(port: int, pki: Pki) -> list[socket.socket]:
    """A silent TCP socket, half a ClientHello, and a finished handshake with no PDU."""
    silent = socket.create_connection(("127.0.0.1", port))
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]))
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    done = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    )
    return [silent, half, done]


def test_values_from_peers_cannot_forge_log_lines(capfd: pytest.CaptureFixture[str]) -> None:
    """A UID or AE title with a newline (or a terminal escape) stays on its own line."""
    configure_logging(verbose=False)
    try:
        logging.getLogger("pacs.dimse.store").warning(
            "C-STORE %s from %s refused", "1.2.3\n2026-01-01 INFO forged", "AE\r\x1b[31m"
        )
        err = capfd.readouterr().err
    finally:
        logging.getLogger().handlers.clear()
    (line,) = [line for line in err.splitlines() if "C-STORE" in line]
    assert "1.2.3\\x0a2026-01-01 INFO forged from AE\\x0d\\x1b[31m refused" in line
    assert "forged" not in err.replace(line, "")


def test_requests_for_other_host_names_are_refused(tmp_path: Path) -> None:
    """DNS rebinding: a page elsewhere sends requests to a name it controls that points
    at 127.0.0.1. Their Host names the attacker's host: 421, nothing read or deleted."""
    server = Server(tmp_path / "data", FILMLESS_SCREENING="false")
    server.start()
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        assert httpx.get(f"{base}/dicom-web/studies").status_code == 200
        localhost = httpx.get(f"{base}/dicom-web/studies", headers={"Host": "localhost"})
        assert localhost.status_code == 200
        for path in ("/dicom-web/studies", "/viewer/", "/docs"):
            rebound = httpx.get(base + path, headers={"Host": "attacker.example:8080"})
            assert rebound.status_code == 421, path
            assert "allowed_hosts" in rebound.json()["error"]
        deleted = httpx.delete(
            f"{base}/dicom-web/studies/1.2.3", headers={"Host": "attacker.example"}
        )
        assert deleted.status_code == 421
    finally:
        assert server.stop() == 0


def test_forwarded_addresses_are_believed_only_from_named_proxies(tmp_path: Path) -> None:
    """X-Forwarded-For from anyone would let a client name any address in the audit
    trail; without trusted_proxies the address is the connection's."""
    server = Server(tmp_path / "data", FILMLESS_SCREENING="false")
    server.start()
    try:
        forged = {"X-Forwarded-For": "203.0.113.66", "X-Forwarded-Proto": "https"}
        answer = httpx.get(f"{server.url}/studies", headers=forged)
        assert answer.status_code == 200
    finally:
        assert server.stop() == 0
    lines = (tmp_path / "data" / "audit.jsonl").read_text().splitlines()
    addresses = {json.loads(line)["ActiveParticipant"]["NetworkAccessPointID"] for line in lines}
    assert addresses == {"127.0.0.1"}
