"""Stored instances sent on to other systems: a DICOM peer by C-STORE or a DICOMweb
server by STOW-RS, the file as it is stored.

Each send is a job of its own in the queue (``forward:<name>`` for the screening
reports, ``route:<name>`` for the routing rules), so a peer that is down costs retries
of the send only, and a send that keeps failing stays visible with its reason.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from pacs.dimse.store_scu import StoreAnswer, StoreAssociation, StoreRefused
from pacs.jobs import JobKind, job_model
from pacs.part10 import FileMeta, read_file_meta
from pacs.stored import read_stored

_AE_ADDRESS = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,48}$")
# Accepted by a STOW-RS server: 200 stored, 202 stored with warnings (PS3.18 10.5.3).
_STOW_OK = (200, 202)


class ForwardFailed(RuntimeError):
    """The destination did not take the instance; the message says why."""


@dataclass(frozen=True)
class Destination:
    """``AE@host:port`` for a C-STORE SCP, or the base URL of a DICOMweb service."""

    name: str
    address: str
    # A DICOMweb server's bearer token, sent with each STOW-RS request.
    token: str = ""

    @property
    def job_model(self) -> str:
        return job_model(JobKind.FORWARD, self.name)

    @property
    def is_stow(self) -> bool:
        return self.address.startswith(("http://", "https://"))


def destination(name: str, address: str, token: str = "") -> Destination:
    """A checked destination; ``ValueError`` with the reason for a malformed one."""
    if not _NAME.match(name):
        raise ValueError(f"destination name {name!r}: 1-48 letters, digits, '.', '_' or '-'")
    if address.startswith(("http://", "https://")):
        return Destination(name, address.rstrip("/"), token)
    if token:
        raise ValueError(f"destination {name}: a token is for a DICOMweb server, not {address}")
    found = _AE_ADDRESS.match(address)
    if found is None or not 0 < int(found["port"]) < 65536 or not found["ae"].strip():
        raise ValueError(
            f"destination {name}: {address!r} is neither AE@host:port nor an http(s) URL"
        )
    return Destination(name, address)


def send(target: Destination, stream: BinaryIO, *, calling_ae: str, timeout: float = 30) -> None:
    """One Part 10 instance to ``target``; raises :class:`ForwardFailed` unless accepted."""
    sender = Sender(target, calling_ae=calling_ae, timeout=timeout)
    try:
        sender.send(stream)
    finally:
        sender.close()


class Sender:
    """Sends to one destination, one instance at a time (one per thread).

    ``keep``: seconds a C-STORE association stays open after a send, for the next
    instance of the same SOP Class and transfer syntax (the rest of a study): an
    association per instance costs more than the C-STORE of a small one.
    """

    def __init__(
        self, target: Destination, *, calling_ae: str, timeout: float = 30, keep: float = 0.0
    ) -> None:
        self.target = target
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.keep = keep
        self._assoc: StoreAssociation | None = None
        self._key: tuple[str, str] = ("", "")
        self._idle_since = 0.0

    def send(self, stream: BinaryIO) -> None:
        """A Part 10 file from a stream at its start."""
        if self.target.is_stow:
            _stow(self.target, stream.read(), self.timeout)
            return
        meta = read_file_meta(stream)
        self._deliver(meta, stream)

    def send_file(self, path: Path) -> None:
        """A stored Part 10 file; its data set is sent as it is encoded, never decoded
        (unless the peer needs it in another transfer syntax)."""
        with open(path, "rb") as stream:
            self.send(stream)

    def _deliver(self, meta: FileMeta, stream: BinaryIO) -> None:
        """The data set from ``stream`` (just past its meta group) to the peer."""
        key = (meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        start = stream.tell()
        reused = self._reusable(key)
        try:
            if not reused:
                self.close()
                self._open(key)
            try:
                answer = self._store(meta, stream)
            except ForwardFailed:
                if not reused:
                    raise
                # The peer ended the association while it was idle: again, on a new one.
                self.close()
                self._open(key)
                stream.seek(start)
                answer = self._store(meta, stream)
        except BaseException:
            self.close()
            raise
        if self.keep <= 0:
            self.close()
        else:
            self._idle_since = time.monotonic()
        # Success, or one of the warnings of PS3.4 B.2.3 (the instance is stored).
        if answer.Status != 0 and answer.Status not in (0x0001, 0xB000, 0xB006, 0xB007):
            raise ForwardFailed(
                f"{self.target.address} answered C-STORE with 0x{answer.Status:04X} "
                f"{answer.ErrorComment}".rstrip()
            )

    def close(self) -> None:
        if self._assoc is not None:
            self._assoc.release()
            self._assoc = None

    def _reusable(self, key: tuple[str, str]) -> bool:
        """The open association was made for this SOP Class and syntax (or accepts
        them), and has not been idle too long."""
        assoc = self._assoc
        return (
            assoc is not None
            and assoc.open
            and (self._key == key or assoc.accepts(*key))
            and time.monotonic() - self._idle_since < self.keep
        )

    def _open(self, key: tuple[str, str]) -> None:
        found = _AE_ADDRESS.match(self.target.address)
        assert found is not None  # checked by destination()
        sop_class, syntax = key
        # The stored syntax first; a peer that does not take it gets Explicit VR Little
        # Endian (decompressed if it must be), as Orthanc and dcm4chee fall back.
        proposed = [(sop_class, syntax)]
        if syntax != ExplicitVRLittleEndian:
            proposed.append((sop_class, ExplicitVRLittleEndian))
        try:
            assoc = StoreAssociation.open_to(
                found["host"],
                int(found["port"]),
                called=found["ae"],
                calling=self.calling_ae,
                proposed=proposed,
                timeout=self.timeout,
            )
        except (OSError, StoreRefused) as exc:
            raise ForwardFailed(f"{self.target.address} cannot be reached: {exc}") from exc
        if not assoc.contexts:
            assoc.release()
            raise ForwardFailed(
                f"{self.target.address} accepts {sop_class} in neither {syntax} nor "
                "Explicit VR Little Endian"
            )
        self._assoc, self._key = assoc, key

    def _store(self, meta: FileMeta, stream: BinaryIO) -> StoreAnswer:
        assoc = self._assoc
        assert assoc is not None
        sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
        if not assoc.accepts(sop_class, syntax):
            stream = _fall_back(stream, self.target)
            syntax = ExplicitVRLittleEndian
        try:
            return assoc.store(sop_class, meta.MediaStorageSOPInstanceUID, syntax, stream)
        except StoreRefused as exc:
            raise ForwardFailed(f"{self.target.address}: {exc}") from exc


def _fall_back(stream: BinaryIO, target: Destination) -> BinaryIO:
    """The data set of the Part 10 file ``stream`` in Explicit VR Little Endian, for a
    peer that accepted only that (decompressed if need be)."""
    ds = read_stored(stream, pixels=True)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)  # the same instance, re-encoded
        except Exception as exc:
            raise ForwardFailed(
                f"{target.address} does not accept {ds.file_meta.TransferSyntaxUID.name} "
                f"and the instance cannot be decompressed here: {exc}"
            ) from exc
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    return BytesIO(encoded.getvalue())


def _stow(target: Destination, data: bytes, timeout: float) -> None:
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    request = urllib.request.Request(
        f"{target.address}/studies",
        data=body,
        method="POST",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            **({"Authorization": f"Bearer {target.token}"} if target.token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status not in _STOW_OK:
                raise ForwardFailed(f"{target.address} answered STOW-RS with {response.status}")
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode("utf-8", "replace")
        raise ForwardFailed(f"{target.address} answered STOW-RS with {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ForwardFailed(f"{target.address} cannot be reached: {exc}") from exc
