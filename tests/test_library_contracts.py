"""Where the DIMSE server relies on pynetdicom's internals, a library upgrade that moves
them fails here, loudly, instead of slowing or breaking associations in production.
(highdicom's report pieces are checked by their output: tests/test_report_writer.py
compares every report byte for byte with highdicom's own.)"""

from __future__ import annotations

import hashlib
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, dimse_messages
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from pynetdicom.transport import AssociationSocket

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


@pytest.mark.parametrize(
    ("function", "digest", "relied_on_by"),
    [
        # Chunked receive writes each data set into our spool, made by the module-level
        # NamedTemporaryFile that pacs.dimse.spool.install replaces.
        (DIMSEMessage.decode_msg, "f51c777e841a76be", "pacs/dimse/spool.py"),
        # BoundedSocket takes an AssociationSocket's place by a class swap and replaces
        # these two.
        (AssociationSocket.recv, "6bc20a33b1b7cfe7", "pacs/dimse/transport.py BoundedSocket"),
        (vars(AssociationSocket)["ready"].fget, "3eb58e3d39dc076d", "pacs/dimse/transport.py"),
        # Pending C-FIND responses are queued as P-DATA primitives with it.
        (DULServiceProvider.send_pdu, "7cbce5da8594124e", "pacs/dimse/pending.py"),
    ],
)
def test_the_internals_the_server_relies_on_are_unchanged(
    function: Callable[..., Any], digest: str, relied_on_by: str
) -> None:
    assert _digest(function) == digest, (
        f"pynetdicom's {function.__qualname__} changed: check what {relied_on_by} assumes "
        "of it, then update the digest"
    )


def test_the_objects_swapped_or_patched_have_the_shape_assumed() -> None:
    """A class swap needs the same instance layout (no __slots__ on either side); the
    spool replaces a module attribute that must be looked up at call time."""
    assert not hasattr(AssociationSocket, "__slots__")
    assert not hasattr(PresentationContext, "__slots__")
    assert hasattr(PresentationContext(), "_transfer_syntax")  # SharedPresentationContext
    source = inspect.getsource(DIMSEMessage.decode_msg)
    assert "NamedTemporaryFile(" in source
    assert "STORE_RECV_CHUNKED_DATASET" in source
    assert hasattr(dimse_messages, "NamedTemporaryFile")
    assert "to_provider_queue" in inspect.getsource(DULServiceProvider.__init__)


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
