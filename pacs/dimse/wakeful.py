"""Association threads that sleep until there is something to do, not for a millisecond.

pynetdicom runs two threads per association, and both poll: the DUL thread sleeps 1 ms
whenever a pass over its queues and its socket found nothing, and the association thread
sleeps 1 ms before every look at its queue of DIMSE messages. Each hand-off between them
(a request read, a response to send) can wait up to a millisecond: a C-FIND that the
archive answers in one millisecond spent two or three more in those sleeps, and a small
C-STORE one or two. An idle association also costs two thousand wake-ups a second.

On the associations our server accepts, the DUL thread here waits in ``select`` on its
socket and on a pipe written whenever a primitive is queued for it to send, and the
association thread waits on an event set whenever the DUL hands it a DIMSE message or an
ACSE primitive (release, abort). Both still wake every :data:`IDLE_S` to look at their
timers (ARTIM, the network timeout) and flags. The two loops are pynetdicom 3.0's with
only the sleeps replaced; ``tests/test_library_contracts.py`` holds them to the versions
they were taken from.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

# How long a thread waits for something to happen before it checks its timers anyway.
IDLE_S = 0.05

# pynetdicom's own loggers, so that its messages read as they did.
_DUL_LOG = logging.getLogger("pynetdicom.dul")
_ASSOCIATION_LOG = logging.getLogger("pynetdicom.association")


class _Signalling(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``signal`` after each put: whoever reads it is woken."""

    signal: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.signal()


def _signalling(found: queue.Queue[Any], signal: Callable[[], None]) -> None:
    """Make a (still empty) queue of pynetdicom's signal on put; the same object."""
    found.__class__ = _Signalling
    cast(_Signalling, found).signal = signal


class WakefulDUL(DULServiceProvider):
    """pynetdicom's DUL, waking on socket data or queued primitives instead of polling."""

    # A socket pair, not a pipe: once closed, a late signal fails on the object instead
    # of writing into whatever file reused the descriptor number.
    _wake_r: socket.socket
    _wake_w: socket.socket

    def _signal(self) -> None:
        with contextlib.suppress(OSError):  # full (the reactor wakes anyway) or closed
            self._wake_w.send(b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self._signal()

    def stop_dul(self) -> bool:
        """pynetdicom's, with the reactor woken to see the flag at once."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._signal()
            while self.is_alive():
                time.sleep(0.001)
            return True
        return False

    def _idle_wait(self) -> None:
        """Until the socket has data, a primitive was queued, or IDLE_S passed."""
        sock = self.socket
        if sock is not None and sock.ready:
            return
        waiting: list[Any] = [self._wake_r]
        raw = getattr(sock, "socket", None)
        if raw is not None and raw.fileno() >= 0:
            waiting.append(raw)
        try:
            select.select(waiting, [], [], IDLE_S)
        except (OSError, ValueError):
            time.sleep(0.001)
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def run_reactor(self) -> None:
        try:
            self._run_reactor()
        finally:
            # The association sees the DUL gone at once.
            wake = getattr(self.assoc, "_wake", None)
            if wake is not None:
                wake.set()
            self._wake_r.close()
            self._wake_w.close()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``; the sleep is a wait."""
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._idle_wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # As pynetdicom: bypass the state machine, abort, stop both reactors.
                _DUL_LOG.error("Exception in DUL.run(), aborting association")
                _DUL_LOG.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                assert self.socket is not None
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False


class WakefulAssociation(Association):
    """pynetdicom's acceptor association, waking when the DUL hands it something."""

    _wake: threading.Event

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor``; the sleep is a wait, skipped
        after a message was served (more may be queued)."""
        self._is_paused = False
        served = True
        while not self._kill:
            if not served:
                self._wake.wait(IDLE_S)
            self._wake.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _ASSOCIATION_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                aborted = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    aborted += " (A-P-ABORT)"
                _ASSOCIATION_LOG.info(aborted)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                _ASSOCIATION_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def wakeful(assoc: Association) -> Association:
    """Make a new acceptor association (neither thread started) wake on events; returns it."""
    dul = assoc.dul
    if dul.is_alive() or assoc.is_alive():
        raise RuntimeError("an association's reactors are changed before they start")
    assoc.__class__ = WakefulAssociation
    dul.__class__ = WakefulDUL
    assert isinstance(assoc, WakefulAssociation)
    assert isinstance(dul, WakefulDUL)
    assoc._wake = threading.Event()
    dul._wake_r, dul._wake_w = socket.socketpair()
    dul._wake_r.setblocking(False)
    dul._wake_w.setblocking(False)
    # The thread was made with the old class's bound reactor as its target.
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]
    _signalling(dul.to_provider_queue, dul._signal)
    _signalling(dul.to_user_queue, assoc._wake.set)
    _signalling(assoc.dimse.msg_queue, assoc._wake.set)
    return assoc
