"""``filmless serve`` as a child process on loopback ports, as ``make serve`` runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.conftest import free_port


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


class LoggedProcess(subprocess.Popen[bytes]):
    """A child whose output goes to a file: a server that logs a lot must never block on
    a full pipe that the test only reads at the end."""

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the process)
        super().__init__(args, stdout=self.log, stderr=subprocess.STDOUT, **kwargs)

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        """Wait for the exit; everything it wrote (and no separate stderr)."""
        del input
        self.wait(timeout)
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        return output, b""


def serve(port: int, http_port: int, **settings: str) -> LoggedProcess:
    """Started in a session of its own (so that a test can kill its whole process
    group), returned once DIMSE and HTTP listen."""
    environment = {
        **os.environ,
        "FILMLESS_DIMSE_PORT": str(port),
        "FILMLESS_HTTP_PORT": str(http_port),
        **settings,
    }
    process = LoggedProcess(
        [sys.executable, "-m", "filmless.cli", "serve"],
        env=environment,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        wait_for_port(http_port)
    except TimeoutError:
        process.kill()
        output, _ = process.communicate(timeout=30)
        raise TimeoutError(output.decode(errors="replace")[-3000:]) from None
    return process


class Server:
    """One data folder, served by successive processes (a restart keeps the ports)."""

    def __init__(self, data_dir: Path, **settings: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.settings = {"FILMLESS_DATA_DIR": str(data_dir), **settings}
        self.process: LoggedProcess | None = None
        self.output = b""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> None:
        self.process = serve(self.port, self.http_port, **self.settings)

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        self.output += output
        return self.process.returncode

    def kill(self, *, whole_group: bool = False) -> None:
        """``kill -9`` of the server process; its DIMSE workers must then exit by
        themselves (they finish their associations first). ``whole_group``: of every
        process at once, so that workers die in the middle of a store too."""
        assert self.process is not None
        if whole_group:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.kill()
        output, _ = self.process.communicate(timeout=30)
        self.output += output
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.killpg(self.process.pid, signal.SIGKILL)
        raise AssertionError("processes of the killed server are still running")


def still_open(sock: socket.socket) -> bool:
    """Not closed by the peer, now (nothing waits to be read on these sockets). A TLS
    socket is looked at below TLS, on a duplicate of its descriptor."""
    with socket.socket(fileno=os.dup(sock.fileno())) as raw:
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False


def closed_by_peer(sock: socket.socket, within: float = 5) -> bool:
    """Closed (EOF, or a reset when our bytes were left unread) rather than still open."""
    sock.settimeout(within)
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True
