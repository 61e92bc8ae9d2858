"""Stored instances sent on to other systems: a DICOM peer by C-STORE or a DICOMweb
server by STOW-RS, the file as it is stored.

Each send is a job of its own in the queue (``forward:<name>`` for the screening
reports, ``route:<name>`` for the routing rules), so a peer that is down costs retries
of the send only, and a send that keeps failing stays visible with its reason.
"""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.uid import ExplicitVRLittleEndian

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
    if target.is_stow:
        _stow(target, stream.read(), timeout)
    else:
        _c_store(target, stream, calling_ae, timeout)


def _c_store(target: Destination, stream: BinaryIO, calling_ae: str, timeout: float) -> None:
    found = _AE_ADDRESS.match(target.address)
    assert found is not None  # checked by destination()
    host, port = found["host"], int(found["port"])
    try:
        # pynetdicom leaves its socket open when the connection is refused; a peer that is
        # down is found here instead, without a leaked descriptor per retry.
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ForwardFailed(f"{target.address} cannot be reached: {exc}") from exc
    ds = pydicom.dcmread(stream)
    syntax = ds.file_meta.TransferSyntaxUID
    ae = MendedAE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    # The stored syntax first; a peer that does not take it gets Explicit VR Little
    # Endian (the instance decompressed if it must be), as Orthanc and dcm4chee fall back.
    ae.add_requested_context(str(ds.SOPClassUID), [str(syntax)])
    if syntax != ExplicitVRLittleEndian:
        ae.add_requested_context(str(ds.SOPClassUID), [ExplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=found["ae"])
    if not assoc.is_established:
        raise ForwardFailed(f"{target.address} did not accept an association")
    try:
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        if str(syntax) not in accepted and ExplicitVRLittleEndian in accepted:
            _fall_back(ds, target)
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(status.get("Status", -1)) if status else -1
    # Success, or one of the warnings of PS3.4 B.2.3 (the instance is stored).
    if code != 0 and code not in (0x0001, 0xB000, 0xB006, 0xB007):
        comment = str(status.get("ErrorComment", "")) if status else "no response"
        raise ForwardFailed(f"{target.address} answered C-STORE with 0x{code:04X} {comment}")


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
