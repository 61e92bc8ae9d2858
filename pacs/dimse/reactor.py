"""Associations whose reactor is really paused before a DIMSE exchange.

pynetdicom's ``send_*`` methods (and ``release``) pause the association's reactor thread
by clearing an event and then waiting for a flag that the reactor sets just *before* it
waits on that event. A reactor that has set the flag but not yet blocked, and is then
descheduled (a busy machine), wakes to find the event still set and takes the peer's
answer off the queue itself ("Received unexpected C-STORE service message"): the sender
waits for it until the DIMSE timeout and the exchange fails. On a loaded two-core
machine this was seen in C-STORE and C-FIND clients, and the server's C-MOVE
sub-operations and forwards use the same calls.

:func:`mend` swaps the class of an association's checkpoint event, the same object, so
that clearing it from another thread returns only once the reactor is blocked on it;
pynetdicom's own check then holds. The reactor's own thread (a C-GET handler sending its
C-STOREs) never waits for itself.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

_POLL_S = 0.0001


class PausingCheckpoint(threading.Event):
    """A reactor checkpoint whose :meth:`clear` waits until the reactor waits on it."""

    association: Association

    def clear(self) -> None:
        super().clear()
        assoc = self.association
        if threading.current_thread() is assoc:
            return
        wake = getattr(assoc, "_wake", None)
        if wake is not None:
            wake.set()  # a reactor waiting for messages comes round to the checkpoint now
        waiters = self._cond._waiters  # type: ignore[attr-defined]
        while not waiters and assoc.is_alive() and not assoc._kill and not self.is_set():
            time.sleep(_POLL_S)


def mend(assoc: Association) -> Association:
    """Give ``assoc`` a checkpoint that pauses its reactor for real; returns it."""
    checkpoint = assoc._reactor_checkpoint
    if not isinstance(checkpoint, PausingCheckpoint):
        checkpoint.__class__ = PausingCheckpoint
        assert isinstance(checkpoint, PausingCheckpoint)
        checkpoint.association = assoc
    return assoc


class MendedAE(AE):
    """An AE whose requested associations (including C-MOVE's to a destination) are mended."""

    def associate(self, *args: Any, **kwargs: Any) -> Association:
        return mend(super().associate(*args, **kwargs))
