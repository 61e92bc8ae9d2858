"""A throw-away PostgreSQL server on loopback for the index tests.

The server refuses to run as root, so when the tests run as root (CI containers) the
cluster is created and started as the ``postgres`` system user the Debian package adds.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg


@dataclass(frozen=True)
class PostgresBinaries:
    initdb: Path
    pg_ctl: Path


def find_postgres_binaries() -> PostgresBinaries | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        initdb, pg_ctl = Path(folder) / "initdb", Path(folder) / "pg_ctl"
        if initdb.exists() and pg_ctl.exists():
            return PostgresBinaries(initdb, pg_ctl)
    initdb_path, pg_ctl_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb_path and pg_ctl_path:
        return PostgresBinaries(Path(initdb_path), Path(pg_ctl_path))
    return None


class PostgresServer:
    def __init__(self, binaries: PostgresBinaries, port: int) -> None:
        self.binaries = binaries
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="filmless-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            str(self.binaries.initdb),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        )
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=on"
        self._run(
            str(self.binaries.pg_ctl),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        try:
            self._run(str(self.binaries.pg_ctl), "-D", str(self.data), "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def fresh_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
