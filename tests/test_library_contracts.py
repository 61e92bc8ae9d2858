"""Where the DIMSE server relies on pynetdicom's internals, a library upgrade that moves
them fails here, loudly, instead of slowing or breaking associations in production."""

from __future__ import annotations

import hashlib
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from pacs.archive import Archive
from pacs.dimse.server import DimseConfig
from pacs.dimse.wakeful import WakefulAssociation, WakefulDUL


def _digest(function: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("function", "digest"),
    [
        # pacs.dimse.wakeful copies these loops with their sleeps replaced by waits.
        (DULServiceProvider.run_reactor, "e3a10eb3a0931e48"),
        (DULServiceProvider.stop_dul, "28a7e0be126e7b30"),
        (Association._run_reactor, "f28838c5559e462a"),
    ],
)
def test_copied_reactor_loops_are_the_ones_installed(
    function: Callable[..., Any], digest: str
) -> None:
    assert _digest(function) == digest, (
        f"pynetdicom's {function.__qualname__} changed: compare it with its copy in "
        "pacs/dimse/wakeful.py and update both"
    )


def test_the_queues_and_thread_target_the_wakeful_reactors_replace() -> None:
    """A new association's queues are plain queues (their class is swapped) and the DUL
    thread runs the target it was created with (replaced by the wakeful reactor)."""
    ae = AE()
    assoc = Association(ae, "acceptor")
    for found in (assoc.dul.to_provider_queue, assoc.dul.to_user_queue, assoc.dimse.msg_queue):
        assert type(found) is queue.Queue
    assert callable(getattr(assoc.dul, "_target", None))
    assert isinstance(assoc._reactor_checkpoint, threading.Event)


def test_served_associations_wake_on_events(archive: Archive, dimse_server: DimseConfig) -> None:
    """The association the server accepted runs the wakeful reactors, and requests sent
    back to back on it, C-ECHOs interleaved with C-FINDs, are all answered: no wake-up
    is lost between the DUL thread and the association thread. (A retrieve context in
    the proposal makes it pynetdicom's: see pacs.dimse.direct.)"""
    ae = AE(ae_title="CONTRACT")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", dimse_server.port, ae_title=dimse_server.ae_title)
    assert assoc.is_established
    try:
        served = [
            t
            for t in threading.enumerate()
            if isinstance(t, WakefulAssociation) and t.requestor.ae_title == "CONTRACT"
        ]
        assert len(served) == 1
        assert isinstance(served[0].dul, WakefulDUL)
        for n in range(100):
            assert assoc.send_c_echo().Status == 0x0000
            if n % 10 == 0:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = ""
                found = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
                assert found[-1][0].Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
