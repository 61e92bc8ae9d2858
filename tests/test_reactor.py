"""pynetdicom's reactor is paused for real before a DIMSE exchange (pacs.dimse.reactor).

The race is reproduced step by step: a stand-in reactor thread passes its checkpoint and
is held there (as a descheduled thread would be) before it clears its "paused" flag.
pynetdicom's pause believes the flag and sends; the reactor then wakes and takes the
peer's answer off the queue. A mended checkpoint returns only once the reactor really
waits on it.
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    Verification,
)

from pacs.dimse.reactor import MendedAE, PausingCheckpoint, mend
from tests.conftest import free_port


class StandInReactor(threading.Thread):
    """The loop of ``Association._run_reactor``, with a hold where the race lies."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        self._is_paused = False
        self._kill = False
        self.passed = threading.Event()
        self.descheduled = threading.Event()
        self.answers: list[str] = []  # what the peer sent, for whoever takes it first
        self.answers_taken = 0

    def run(self) -> None:
        while True:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            if self._kill:
                return
            self.passed.set()
            self.descheduled.wait(60)  # through the checkpoint, flag not yet cleared
            self._is_paused = False
            if self.answers:
                self.answers.pop()
                self.answers_taken += 1

    def stop(self) -> None:
        self._kill = True
        self._reactor_checkpoint.set()
        self.join(60)


def _send_from_another_thread(reactor: StandInReactor) -> tuple[threading.Thread, list[str]]:
    """pynetdicom's pause, as every ``send_*`` method does it, then the peer's answer."""
    got: list[str] = []

    def send() -> None:
        reactor._reactor_checkpoint.clear()
        while not reactor._is_paused:
            pass
        reactor.answers.append("C-FIND-RSP")  # the request went out; its answer is in
        reactor.descheduled.set()  # the reactor gets the CPU back
        waiting = reactor._reactor_checkpoint._cond._waiters  # type: ignore[attr-defined]
        if waiting and reactor.answers:  # the reactor waits: the answer is the sender's
            got.append(reactor.answers.pop())

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender, got


def test_without_mending_the_reactor_takes_the_answer() -> None:
    """The fault itself: pynetdicom's pause believes the flag and returns at once."""
    reactor = StandInReactor()
    reactor.start()
    assert reactor.passed.wait(60)
    sender, got = _send_from_another_thread(reactor)
    sender.join(60)
    reactor.stop()
    assert reactor.answers_taken == 1
    assert got == []


def test_a_mended_checkpoint_waits_until_the_reactor_waits() -> None:
    reactor = StandInReactor()
    mend(reactor)  # type: ignore[arg-type]
    reactor.start()
    assert reactor.passed.wait(60)
    sender, got = _send_from_another_thread(reactor)
    sender.join(0.5)
    assert sender.is_alive(), "the pause returned while the reactor could still run"
    reactor.descheduled.set()  # the reactor runs on, round to its checkpoint
    sender.join(60)
    reactor.stop()
    assert reactor.answers_taken == 0
    assert got == ["C-FIND-RSP"]


def test_a_reactor_that_ended_does_not_hold_the_sender() -> None:
    reactor = StandInReactor()
    mend(reactor)  # type: ignore[arg-type]
    reactor._reactor_checkpoint.clear()  # not started: returns at once
    assert isinstance(reactor._reactor_checkpoint, PausingCheckpoint)


def test_mended_associations_exchange_messages_and_c_get_sends_from_its_reactor() -> None:
    """Real pynetdicom associations: C-ECHO over a mended requestor, and a C-GET whose
    C-STORE sub-operation the SCP sends from its own reactor thread (which must not wait
    for itself)."""
    scp = MendedAE(ae_title="SCP")
    scp.add_supported_context(Verification)
    scp.add_supported_context(PatientRootQueryRetrieveInformationModelGet)
    scp.add_supported_context("1.2.840.10008.5.1.4.1.1.7", scp_role=True, scu_role=True)
    instance = Dataset()
    instance.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    instance.SOPInstanceUID = "1.2.3.4"
    instance.PatientID = "P"
    instance.file_meta = FileMetaDataset()
    instance.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    def on_get(event: Any) -> Any:
        mend(event.assoc)
        yield 1
        yield 0xFF00, instance

    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset.SOPInstanceUID)
        return 0

    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, on_get)]
    )
    assert server is not None
    try:
        scu = MendedAE(ae_title="SCU")
        scu.add_requested_context(Verification)
        scu.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
        scu.add_requested_context("1.2.840.10008.5.1.4.1.1.7")
        role = build_role("1.2.840.10008.5.1.4.1.1.7", scp_role=True)
        assoc = scu.associate(
            "127.0.0.1",
            port,
            ae_title="SCP",
            ext_neg=[role],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert assoc.is_established
        assert isinstance(assoc._reactor_checkpoint, PausingCheckpoint)
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "P"
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet)
        ]
        assert statuses[-1] == 0
        assert received == ["1.2.3.4"]
        assoc.release()
    finally:
        server.shutdown()
