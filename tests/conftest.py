"""Shared fixtures: a generated corpus, archives on SQLite or a real PostgreSQL, a DIMSE server."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs.archive import Archive
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.index import DuplicatePolicy, Index
from pacs.store import FsBlobStore
from scripts.synthetic_corpus import write_corpus
from tests.support.postgres import PostgresServer, find_postgres_binaries


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A few hundred small instances: DX, OP, MG, CT in every syntax the generator writes."""
    out = tmp_path_factory.mktemp("corpus")
    return write_corpus(out, patients=24, seed=7, scale=0.05, ct_slices=4)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three demo models, built once for every test that screens."""
    from models.build import build_demo  # noqa: PLC0415 (torch: only for the tests that need it)
    from models.zoo import CHEST_XRAY, FUNDUS, MAMMOGRAPHY  # noqa: PLC0415

    root = tmp_path_factory.mktemp("demo-models")
    for task in (CHEST_XRAY, FUNDUS, MAMMOGRAPHY):
        build_demo(root, task)
    return root


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    binaries = find_postgres_binaries()
    if binaries is None:
        if os.environ.get("FILMLESS_REQUIRE_POSTGRESQL") == "1":
            pytest.fail("PostgreSQL binaries (initdb, pg_ctl) are required but not installed")
        pytest.skip("PostgreSQL is not installed (Debian package 'postgresql')")
    server = PostgresServer(binaries, port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.fresh_database()


@pytest.fixture
def index(index_url: str) -> Iterator[Index]:
    idx = Index(index_url)
    idx.create_schema()
    try:
        yield idx
    finally:
        idx.dispose()


def make_archive(root: Path, index: Index, policy: DuplicatePolicy = "reject") -> Archive:
    return Archive(FsBlobStore(root), index, duplicate_policy=policy)


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    idx = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    idx.create_schema()
    try:
        yield make_archive(tmp_path / "data", idx)
    finally:
        idx.dispose()


@pytest.fixture
def dimse_config() -> DimseConfig:
    return DimseConfig(ae_title="FILMLESS", port=free_port(), acse_timeout=10, dimse_timeout=30)


@pytest.fixture
def dimse_server(archive: Archive, dimse_config: DimseConfig) -> Iterator[DimseConfig]:
    server = start_dimse(archive, dimse_config)
    try:
        yield dimse_config
    finally:
        server.shutdown()
