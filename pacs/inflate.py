"""Deflated data sets (PS3.5 A.5) inflated in pieces, to disk, never whole in memory.

A 1 MB deflated data set can inflate to a gigabyte. pydicom inflates one whole into
memory to read even its header, and so did the archive: a handful of such requests took
gigabytes. Here the raw deflate stream is inflated chunk by chunk into a file next to
the store's staging files, up to a limit (``max_instance_bytes``) past which the
instance is refused, and the result is an ordinary Explicit VR Little Endian Part 10
file that the rest of the code reads (and walks, and decodes) frame by frame.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import ExplicitVRLittleEndian

from pacs.errors import InstanceTooLarge, InvalidInstance
from pacs.part10 import FileMeta, encode_file_meta

_CHUNK = 1 << 20
INFLATED_PREFIX = "inflated-"  # cleared from staging at startup after a crash


def inflate_into(source: BinaryIO, target: BinaryIO, limit: int) -> int:
    """Inflate ``source`` (at the data set) into ``target``; the bytes written."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    try:
        while chunk := source.read(_CHUNK):
            while chunk:
                out = inflater.decompress(chunk, _CHUNK)
                written += len(out)
                if written > limit:
                    raise InstanceTooLarge(
                        f"the deflated data set inflates beyond {limit} bytes (max_instance_bytes)"
                    )
                target.write(out)
                chunk = inflater.unconsumed_tail
        tail = inflater.flush()
    except zlib.error as exc:
        raise InvalidInstance(f"the deflated data set is corrupt: {exc}") from exc
    written += len(tail)
    if written > limit:
        raise InstanceTooLarge(
            f"the deflated data set inflates beyond {limit} bytes (max_instance_bytes)"
        )
    target.write(tail)
    if not inflater.eof:
        raise InvalidInstance("the deflated data set is truncated")
    return written


@contextlib.contextmanager
def inflated(
    path: Path, data_set_offset: int, meta: FileMeta, folder: Path, limit: int
) -> Iterator[tuple[Path, int]]:
    """An Explicit VR Little Endian copy of a deflated file, in ``folder``, removed after
    use: its path and the offset of its data set."""
    head = encode_file_meta(
        FileMeta(
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, ExplicitVRLittleEndian
        )
    )
    target = folder / f"{INFLATED_PREFIX}{uuid.uuid4().hex}.dcm"
    try:
        with open(path, "rb") as source, open(target, "wb") as out:
            source.seek(data_set_offset)
            out.write(head)
            inflate_into(source, out, limit)
        yield target, len(head)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
