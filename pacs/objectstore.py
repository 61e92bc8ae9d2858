"""Blobs in S3-compatible object storage (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...).

An instance is received into a staging file on this node, as with the folder store; its
``commit`` is one PUT (a multipart upload for a large one), and S3 answers a PUT only
once the object is durable and complete, so the index commits after that, as after the
folder store's rename. A failed upload leaves no object: a single PUT is atomic, and a
multipart upload that fails is aborted. Objects live under ``{prefix}objects/`` with the
same names as the folder store's files; ``filmless verify`` lists and hashes them, and
blobs without an index row go to ``{prefix}orphans/``.

Reads are ranged GETs through a buffered, seekable reader: a header or one frame costs
the bytes it needs, not the object. The client is obstore (the Rust ``object_store``
crate that Apache Arrow and DataFusion use): its requests run without the GIL, so
uploads and reads of concurrent associations overlap, and it ships type information.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, cast

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from pacs.errors import StorageFailure
from pacs.store import BlobStore, StagedBlob, StoredBlob, check_relative

# One PUT up to this size; above it, a multipart upload of parts this size.
_PART = 8 << 20
# Bytes a reader asks for at least (the first request too): most instances are
# whole after one.
_BUFFER = 1 << 20
_OBJECTS = "objects/"
_ORPHANS = "orphans/"


class S3BlobStore(BlobStore):
    """Objects in ``bucket`` under ``prefix``; staging under ``root/staging`` on this node."""

    shared = True

    def __init__(
        self,
        root: Path,
        *,
        bucket: str,
        endpoint: str = "",
        prefix: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        timeout_seconds: float = 60.0,
    ) -> None:
        # Durability is the upload's: the staging file is scratch, not fsynced.
        super().__init__(root, sync_staging=False)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint
            # A private endpoint names the bucket in the path (SeaweedFS, MinIO).
            config["virtual_hosted_style_request"] = False
        if region:
            config["region"] = region
        if access_key_id:
            config["access_key_id"] = access_key_id
            config["secret_access_key"] = secret_access_key
        self.client = S3Store(
            bucket,
            prefix=self.prefix or None,
            client_options={
                "allow_http": endpoint.startswith("http://"),
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(seconds=timeout_seconds),
            },
            retry_config={
                "max_retries": 3,
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=2),
                    "base": 2,
                },
                "retry_timeout": timedelta(seconds=timeout_seconds),
            },
            **config,
        )

    @property
    def location(self) -> str:
        return self._url(_OBJECTS)

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}{key}"

    def key(self, relative: str) -> str:
        """The object key of a blob, refused when the name could lead elsewhere."""
        if not relative:
            raise ValueError("an object needs a name")
        return _OBJECTS + check_relative(relative)

    def commit(self, staged: StagedBlob, relative: str) -> None:
        key = self.key(relative)
        try:
            staged.durable()
            with open(staged.path, "rb") as source:
                if staged.size <= _PART:
                    obstore.put(self.client, key, source.read(), use_multipart=False)
                else:
                    obstore.put(self.client, key, source, use_multipart=True, chunk_size=_PART)
        except (OSError, BaseError) as exc:
            # Nothing to remove: a PUT that failed wrote nothing, a failed multipart
            # upload is aborted, and the key (content hash in it) may be another node's
            # upload of the same bytes.
            raise StorageFailure(f"cannot store the instance in object storage: {exc}") from exc
        finally:
            self.discard(staged)

    def open(self, relative: str) -> BinaryIO:
        return cast(BinaryIO, RangeReader(self.client, self.key(relative)))

    def delete(self, relative: str) -> None:
        try:
            obstore.delete(self.client, self.key(relative))
        except (FileNotFoundError, NotFoundError):
            return
        except BaseError as exc:
            raise StorageFailure(f"cannot delete {relative} from object storage: {exc}") from exc

    @contextmanager
    def local(self, relative: str) -> Iterator[Path]:
        copy = self.staging / f"fetched-{uuid.uuid4().hex}"
        try:
            with open(copy, "xb") as out:
                try:
                    for chunk in obstore.get(self.client, self.key(relative)):
                        out.write(chunk)
                except NotFoundError as exc:
                    raise FileNotFoundError(relative) from exc
                except BaseError as exc:  # as the folder store's: an OSError
                    raise OSError(f"cannot read {relative} from object storage: {exc}") from exc
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def listing(self) -> Iterator[StoredBlob]:
        for page in obstore.list(self.client, prefix=_OBJECTS):
            for meta in page:
                yield StoredBlob(meta["path"].removeprefix(_OBJECTS), meta["size"])

    def set_aside(self, relative: str) -> str:
        key = self.key(relative)
        target = _ORPHANS + relative
        obstore.copy(self.client, key, target)
        obstore.delete(self.client, key)
        return self._url(target)


class RangeReader(io.RawIOBase):
    """An object read with ranged GETs of at least ``_BUFFER`` bytes, the last one kept;
    the first request also tells its size (and FileNotFoundError at once when there is
    no such object).

    Buffered itself rather than wrapped in ``io.BufferedReader``: pydicom takes any
    BufferedReader for a file on disk and reopens it by name for deferred values.
    """

    def __init__(self, client: S3Store, key: str) -> None:
        super().__init__()
        self.client = client
        self.key = key
        try:
            first = obstore.get(client, key, options={"range": (0, _BUFFER)})
        except NotFoundError as exc:  # obstore raises its own or the built-in one
            raise FileNotFoundError(key) from exc
        except BaseError as exc:
            raise OSError(f"cannot read {key} from object storage: {exc}") from exc
        self.size: int = first.meta["size"]
        self._block = bytes(first.bytes())
        self._block_start = 0
        self._position = 0
        self.fetched = len(self._block)  # bytes requested from the store so far

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start = self._position
        end = min(self.size, start + len(view))
        if start >= end:
            return 0
        block_end = self._block_start + len(self._block)
        if not (self._block_start <= start and end <= block_end):
            fetch_end = min(self.size, max(end, start + _BUFFER))
            try:
                fetched = obstore.get_range(self.client, self.key, start=start, end=fetch_end)
            except BaseError as exc:
                raise OSError(f"cannot read {self.key} from object storage: {exc}") from exc
            self._block, self._block_start = bytes(fetched), start
            self.fetched += len(self._block)
        offset = start - self._block_start
        count = end - start
        view[:count] = memoryview(self._block)[offset : offset + count]
        self._position = start + count
        return count
