"""Storage and query associations served without pynetdicom answer exactly as pynetdicom.

The same requests, sent by a raw client over loopback to a server that serves them on
its own path (:mod:`pacs.dimse.direct`) and to one that gives every association to
pynetdicom, must get the same A-ASSOCIATE-AC and, message for message, the same command
sets (statuses, error comments, UIDs; PS3.7 9.3) and identifiers, byte for byte. The
instances are pydicom's test files (many vendors, transfer syntaxes and oddities, some
sharing UIDs), each stored twice (the second a duplicate), with refusals on purpose;
the queries cover both models at every level, wildcards, a bad level and C-CANCEL.
"""

from __future__ import annotations

import io
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from pacs.archive import Archive, InstanceSource
from pacs.dimse.server import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, DimseConfig, start_dimse
from pacs.dimse.transport import FilmlessServer
from pacs.index import Index
from tests.conftest import free_port, make_archive

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Instance:
    SOPClassUID: str
    SOPInstanceUID: str
    TransferSyntaxUID: str
    StudyInstanceUID: str
    data_set: bytes


def _instances() -> list[Instance]:
    """pydicom's files that name a storage SOP class and a syntax the server accepts."""
    found = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            with path.open("rb") as stream:
                source = InstanceSource.from_part10(stream)
                body = stream.read()
            study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        except Exception:
            continue
        meta = source.meta
        if (
            meta.MediaStorageSOPClassUID not in STORAGE_SOP_CLASSES
            or meta.TransferSyntaxUID not in TRANSFER_SYNTAXES
            or not meta.MediaStorageSOPInstanceUID
            or len(body) > 4 << 20
        ):
            continue
        found.append(
            Instance(
                meta.MediaStorageSOPClassUID,
                meta.MediaStorageSOPInstanceUID,
                meta.TransferSyntaxUID,
                study,
                body,
            )
        )
    return found


class RawClient:
    """An association requestor that sends PDUs exactly as built here and returns the
    answers as (command set, data set) bytes, whatever PDUs carried them."""

    def __init__(self, port: int, contexts: list[tuple[str, str]], max_pdu: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.max_pdu = max_pdu
        self.ids: dict[tuple[str, str], int] = {}
        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title = "RAWSCU"
        primitive.called_ae_title = "FILMLESS"
        proposed = []
        for n, (sop_class, syntax) in enumerate(contexts):
            context = PresentationContext()
            context.context_id = 2 * n + 1
            context.abstract_syntax = sop_class
            context.transfer_syntax = [syntax]
            proposed.append(context)
            self.ids[(sop_class, syntax)] = 2 * n + 1
        primitive.presentation_context_definition_list = proposed
        length = MaximumLengthNotification()
        length.maximum_length_received = max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
        primitive.user_information = [length, implementation]
        request = A_ASSOCIATE_RQ()
        request.from_primitive(primitive)
        self.sock.sendall(request.encode())
        self.accept = self._pdu()

    def _recv(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError("closed")
            data += chunk
        return data

    def _pdu(self) -> bytes:
        header = self._recv(6)
        return header + self._recv(struct.unpack(">L", header[2:])[0])

    def send(self, message: object, context_id: int) -> None:
        for primitive in message.encode_msg(context_id, self.max_pdu):  # type: ignore[attr-defined]
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            self.sock.sendall(pdu.encode())

    def messages(self) -> Iterator[tuple[bytes, bytes]]:
        """Answers until a final one (status not pending)."""
        command = data = b""
        while True:
            pdu = self._pdu()
            assert pdu[0] == 0x04, f"PDU type 0x{pdu[0]:02X} instead of P-DATA-TF"
            position = 6
            while position < len(pdu):
                length = struct.unpack(">L", pdu[position : position + 4])[0]
                control = pdu[position + 5]
                fragment = pdu[position + 6 : position + 4 + length]
                position += 4 + length
                if control & 1:
                    command += fragment
                else:
                    data += fragment
                if control & 2 and (not control & 1 or _data_set_type(command) == 0x0101):
                    yield command, data
                    if _status(command) not in (0xFF00, 0xFF01):
                        return
                    command = data = b""

    def release(self) -> bytes:
        self.sock.sendall(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        answer = self._pdu()
        self.sock.close()
        return answer


def _element(command: bytes, tag: int) -> bytes | None:
    position = 0
    while position + 8 <= len(command):
        group, element, length = struct.unpack("<HHL", command[position : position + 8])
        if (group << 16 | element) == tag:
            return command[position + 8 : position + 8 + length]
        position += 8 + length
    return None


def _status(command: bytes) -> int:
    return int(struct.unpack("<H", _element(command, 0x00000900) or b"\0\0")[0])


def _data_set_type(command: bytes) -> int:
    return int(struct.unpack("<H", _element(command, 0x00000800) or b"\1\1")[0])


def _store(sop_class: str, sop_instance: str, data_set: bytes, message_id: int) -> object:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


def _find(sop_class: str, identifier: Dataset, message_id: int, syntax: str) -> object:
    primitive = C_FIND()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Priority = 2
    encoded = encode(identifier, syntax == IMPLICIT, True)
    assert encoded is not None
    primitive.Identifier = io.BytesIO(encoded)
    message = C_FIND_RQ()
    message.primitive_to_message(primitive)
    return message


def _queries(study: str) -> list[tuple[str, Dataset]]:
    def query(level: str, **keys: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    study_root = StudyRootQueryRetrieveInformationModelFind
    patient_root = PatientRootQueryRetrieveInformationModelFind
    return [
        (study_root, query("STUDY", StudyInstanceUID="", PatientName="", StudyDate="")),
        (study_root, query("STUDY", PatientName="*", ModalitiesInStudy="", AccessionNumber="")),
        (study_root, query("SERIES", StudyInstanceUID=study, SeriesInstanceUID="", Modality="")),
        (study_root, query("SERIES", StudyInstanceUID="", BodyPartExamined="")),  # refused
        (
            study_root,
            query("IMAGE", StudyInstanceUID=study, SOPInstanceUID="", SOPClassUID="", Rows=""),
        ),
        (patient_root, query("PATIENT", PatientID="", PatientName="", PatientBirthDate="")),
        (study_root, query("STUDY", StudyDate="19000101-20991231", StudyDescription="")),
        (study_root, query("STUDY", PatientName="ANON*", SpecificCharacterSet="ISO_IR 100")),
        (study_root, query("NOT-A-LEVEL", StudyInstanceUID="")),
        (patient_root, query("STUDY", StudyInstanceUID="")),  # no PatientID: refused
    ]


def _exchange(port: int, instances: list[Instance], max_pdu: int) -> list[object]:
    """Everything the server answers to one fixed sequence of requests."""
    contexts = sorted({(i.SOPClassUID, i.TransferSyntaxUID) for i in instances})
    contexts += [
        (Verification, IMPLICIT),
        (StudyRootQueryRetrieveInformationModelFind, EXPLICIT),
        (PatientRootQueryRetrieveInformationModelFind, IMPLICIT),
    ]
    client = RawClient(port, contexts, max_pdu)
    answers: list[object] = [client.accept]
    message_id = 0

    def ask(message: object, context: tuple[str, str]) -> None:
        client.send(message, client.ids[context])
        answers.append(list(client.messages()))

    for repeat in range(2):  # the second time, every instance is a duplicate
        for instance in instances:
            message_id += 1
            ask(
                _store(
                    instance.SOPClassUID, instance.SOPInstanceUID, instance.data_set, message_id
                ),
                (instance.SOPClassUID, instance.TransferSyntaxUID),
            )
        if repeat == 0:
            first = instances[0]
            wrong = next(i for i in instances if i.SOPClassUID != first.SOPClassUID)
            message_id += 1  # SOP Class of the command differs from the context's
            ask(
                _store(wrong.SOPClassUID, "1.2.3.4", first.data_set, message_id),
                (first.SOPClassUID, first.TransferSyntaxUID),
            )
            message_id += 1  # an invalid SOP Instance UID
            ask(
                _store(first.SOPClassUID, "1.2.03.x", first.data_set, message_id),
                (first.SOPClassUID, first.TransferSyntaxUID),
            )
            message_id += 1  # a data set that is not one
            ask(
                _store(first.SOPClassUID, "1.2.3.999", b"\xff" * 37, message_id),
                (first.SOPClassUID, first.TransferSyntaxUID),
            )
    echo = C_ECHO()
    echo.MessageID = message_id = message_id + 1
    echo.AffectedSOPClassUID = Verification
    echo_message = C_ECHO_RQ()
    echo_message.primitive_to_message(echo)
    ask(echo_message, (Verification, IMPLICIT))
    queries = _queries(instances[0].StudyInstanceUID)
    for sop_class, identifier in queries:
        syntax = EXPLICIT if sop_class == StudyRootQueryRetrieveInformationModelFind else IMPLICIT
        message_id += 1
        ask(_find(sop_class, identifier, message_id, syntax), (sop_class, syntax))
    # C-CANCEL sent right behind its C-FIND: the answer ends with Cancel or Success,
    # depending on when it is read; only its final status is compared.
    message_id += 1
    context = (StudyRootQueryRetrieveInformationModelFind, EXPLICIT)
    client.send(_find(context[0], queries[0][1], message_id, EXPLICIT), client.ids[context])
    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = message_id
    cancel_message = C_CANCEL_RQ()
    cancel_message.primitive_to_message(cancel)
    client.send(cancel_message, client.ids[context])
    final = list(client.messages())[-1][0]
    answers.append(_status(final) in (0x0000, 0xFE00))
    answers.append(client.release())
    return answers


@pytest.fixture(scope="module")
def instances() -> list[Instance]:
    found = _instances()
    assert len(found) >= 40, "pydicom's test files are not where they were"
    return found


def _serve(tmp_path: Path, direct: bool) -> tuple[FilmlessServer, Archive, DimseConfig]:
    tmp_path.mkdir()
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(tmp_path / "data", index)
    config = DimseConfig(port=free_port(), direct_associations=direct)
    return start_dimse(archive, config), archive, config


@pytest.mark.parametrize("max_pdu", [16384, 0])
def test_direct_answers_are_pynetdicoms_byte_for_byte(
    tmp_path: Path, instances: list[Instance], max_pdu: int
) -> None:
    results = []
    for direct in (False, True):
        server, archive, config = _serve(tmp_path / f"direct-{direct}", direct)
        try:
            assert (server.direct is not None) is direct
            results.append(_exchange(config.port, instances, max_pdu))
        finally:
            server.shutdown()
            archive.index.dispose()
    pynetdicom_answers, direct_answers = results
    for n, (ours, theirs) in enumerate(zip(direct_answers, pynetdicom_answers, strict=True)):
        assert ours == theirs, f"answer {n} differs"
    finals = [m[-1][0] for m in direct_answers if isinstance(m, list)]
    statuses = {_status(command) for command in finals}
    # Success, duplicates with other content (0x0111), a SOP Class mismatch and refused
    # queries (0xA900), unreadable data sets (0xC000), and queries with matches.
    assert statuses == {0x0000, 0x0111, 0xA900, 0xC000}, sorted(hex(s) for s in statuses)
    pending = [m for m in direct_answers if isinstance(m, list) and len(m) > 1]
    assert len(pending) >= 4
