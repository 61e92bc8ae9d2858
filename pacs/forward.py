"""Stored instances sent on to other systems: a DICOM peer by C-STORE or a DICOMweb
server by STOW-RS, the file as it is stored.

Each send is a job of its own in the queue (``forward:<name>`` for the screening
reports, ``route:<name>`` for the routing rules), so a peer that is down costs retries
of the send only, and a send that keeps failing stays visible with its reason.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.association import Association

from pacs.dimse.reactor import MendedAE

PREFIX = "forward:"
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
        return PREFIX + self.name

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
        self._assoc: Association | None = None
        self._key: tuple[str, str] = ("", "")
        self._fallback = False
        self._idle_since = 0.0

    def send(self, stream: BinaryIO) -> None:
        if self.target.is_stow:
            _stow(self.target, stream.read(), self.timeout)
            return
        ds = pydicom.dcmread(stream)
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        reused = self._reusable(key)
        if not reused:
            self.close()
            self._open(ds, key)
        try:
            status = self._store(ds)
        except ForwardFailed:
            if not reused:
                raise
            # The peer ended the association while it was idle: once more, on a new one.
            self.close()
            self._open(ds, key)
            status = self._store(ds)
        if self.keep <= 0:
            self.close()
        else:
            self._idle_since = time.monotonic()
        code = int(status.get("Status", -1))
        # Success, or one of the warnings of PS3.4 B.2.3 (the instance is stored).
        if code != 0 and code not in (0x0001, 0xB000, 0xB006, 0xB007):
            comment = str(status.get("ErrorComment", ""))
            raise ForwardFailed(
                f"{self.target.address} answered C-STORE with 0x{code:04X} {comment}"
            )

    def close(self) -> None:
        if self._assoc is not None:
            if self._assoc.is_established:
                self._assoc.release()
            self._assoc = None

    def _reusable(self, key: tuple[str, str]) -> bool:
        return (
            self._assoc is not None
            and self._assoc.is_established
            and self._key == key
            and time.monotonic() - self._idle_since < self.keep
        )

    def _open(self, ds: pydicom.Dataset, key: tuple[str, str]) -> None:
        found = _AE_ADDRESS.match(self.target.address)
        assert found is not None  # checked by destination()
        host, port = found["host"], int(found["port"])
        try:
            # pynetdicom leaves its socket open when the connection is refused; a peer
            # that is down is found here instead, without a leaked descriptor per retry.
            socket.create_connection((host, port), timeout=self.timeout).close()
        except OSError as exc:
            raise ForwardFailed(f"{self.target.address} cannot be reached: {exc}") from exc
        sop_class, syntax = key
        ae = MendedAE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        # The stored syntax first; a peer that does not take it gets Explicit VR Little
        # Endian (decompressed if it must be), as Orthanc and dcm4chee fall back.
        ae.add_requested_context(sop_class, [syntax])
        if syntax != ExplicitVRLittleEndian:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
        assoc = ae.associate(host, port, ae_title=found["ae"])
        if not assoc.is_established:
            raise ForwardFailed(f"{self.target.address} did not accept an association")
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        self._assoc, self._key = assoc, key
        self._fallback = syntax not in accepted and ExplicitVRLittleEndian in accepted

    def _store(self, ds: pydicom.Dataset) -> pydicom.Dataset:
        assert self._assoc is not None
        if self._fallback:
            _fall_back(ds, self.target)
        try:
            status = self._assoc.send_c_store(ds)
        except Exception as exc:  # pynetdicom refuses to send on a lost association
            raise ForwardFailed(f"{self.target.address}: the association ended: {exc}") from exc
        if not status:  # no response: aborted or timed out
            raise ForwardFailed(f"{self.target.address} did not answer the C-STORE")
        return status


def _fall_back(ds: pydicom.Dataset, target: Destination) -> None:
    """``ds`` in Explicit VR Little Endian, for a peer that accepted only that."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            ds.decompress()
        except Exception as exc:
            raise ForwardFailed(
                f"{target.address} does not accept {ds.file_meta.TransferSyntaxUID.name} "
                f"and the instance cannot be decompressed here: {exc}"
            ) from exc
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


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
