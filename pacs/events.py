"""In-process notices that an instance was stored: a hint to wake what follows the
change log (:mod:`pacs.changes`) now rather than at its next poll.

Nothing depends on a notice for correctness: it is not sent for what other processes
store, and it is lost with the process. What must happen because something was stored
follows the change log. Delivery happens after the index commit and never fails the
store: a subscriber that raises is logged and the peer still gets its Success.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pacs.header import InstanceHeader
from pacs.index import InstanceRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InstanceStored:
    """A new instance (or a new version of one) is durable and indexed."""

    record: InstanceRecord
    header: InstanceHeader
    origin: str
    replaced: bool


Subscriber = Callable[[InstanceStored], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.remove(subscriber)

    def publish(self, event: InstanceStored) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:
                log.exception("subscriber %r failed on %s", subscriber, event.record.SOPInstanceUID)
