"""The audit trail: one JSON line per access to patient data, and per refused login.

Fields follow the DICOM audit message (PS3.15 A.5): what happened (EventID and
EventActionCode), when, with what outcome (EventOutcomeIndicator), who and from where
(ActiveParticipant: user ID, network access point), and which study
(ParticipantObject). Lines are appended with one ``write`` on a file opened with
O_APPEND, so the DIMSE worker processes and the HTTP server share one file without
interleaving. A trail without a path records nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, IntEnum
from pathlib import Path

log = logging.getLogger(__name__)


class AuditEvent(Enum):
    """(EventID code, its meaning, EventActionCode) of PS3.15 A.5.3 / DCM codes."""

    STORE = ("110104", "DICOM Instances Transferred", "C")
    RETRIEVE = ("110104", "DICOM Instances Transferred", "R")
    QUERY = ("110112", "Query", "E")
    DELETE = ("110105", "DICOM Study Deleted", "D")
    LOGIN = ("110114", "User Authentication", "E")


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8


@dataclass(frozen=True)
class Actor:
    """Who acted: a calling AE title or an API token's name, and the peer's address."""

    user: str
    address: str
    protocol: str  # "DIMSE" or "DICOMweb"


class AuditTrail:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def record(
        self,
        event: AuditEvent,
        actor: Actor,
        outcome: Outcome,
        *,
        StudyInstanceUID: str = "",
        detail: str = "",
    ) -> None:
        """Append one message; a trail that cannot be written is logged, never raised, so
        that auditing does not turn a served request into a failed one."""
        if self.path is None:
            return
        code, meaning, action = event.value
        message = {
            "EventDateTime": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "EventID": {"code": code, "scheme": "DCM", "meaning": meaning},
            "EventActionCode": action,
            "EventOutcomeIndicator": int(outcome),
            "ActiveParticipant": {
                "UserID": actor.user,
                "NetworkAccessPointID": actor.address,
                "UserIsRequestor": True,
                "Protocol": actor.protocol,
            },
            "ParticipantObject": {"StudyInstanceUID": StudyInstanceUID},
            "Detail": detail[:500],
        }
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                if self._fd is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.write(self._fd, line)
        except OSError:
            log.exception("the audit trail %s cannot be written", self.path)
