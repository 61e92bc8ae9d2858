"""Notifications from the archive to whoever subscribes (the inference scheduler, audit).

Delivery happens after the index commit and never fails the store: a subscriber that
raises is logged and the peer still gets its Success, because the instance is durable.
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
