"""The change log and the consumers that follow it with durable cursors.

Every stored, replaced and deleted instance appends a row in the transaction of the
index change itself (:func:`pacs.index.append_change`), so a row exists exactly when its
change committed. Whatever must happen because something was stored (screening jobs,
routing to another archive, an outside system's copy) follows the log from a cursor kept
in the index, outside the ingest call: a crash, a ``kill -9`` or a consumer that fails
between the commit and its work loses nothing, and the work is done once the consumer
runs again. This is Orthanc's change log and dcm4chee's export queue in one.

A consumer works in two steps. :meth:`Consumer.prepare` reads and decides, outside any
write transaction, and may fail (the cursor stays where it was, and the same changes
come again after a pause). What it returns writes its outcome in the transaction that
moves the cursor, so the outcome and "these changes are done" commit together, once,
whichever node or thread got there first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from pacs.errors import IndexFailure
from pacs.index import (
    ChangeKind,
    Index,
    append_change,
    change,
    change_cursor,
    settling,
    study,
)

log = logging.getLogger(__name__)

__all__ = [
    "Change",
    "ChangeKind",
    "ChangeLog",
    "Consumer",
    "Follower",
    "StudyStability",
    "Writes",
]


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    kind: ChangeKind
    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    origin: str
    SourceApplicationEntityTitle: str
    time: datetime

    def as_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "kind": str(self.kind),
            "StudyInstanceUID": self.StudyInstanceUID,
            "SeriesInstanceUID": self.SeriesInstanceUID,
            "SOPInstanceUID": self.SOPInstanceUID,
            "SOPClassUID": self.SOPClassUID,
            "origin": self.origin,
            "SourceApplicationEntityTitle": self.SourceApplicationEntityTitle,
            "time": self.time.isoformat(),
        }


def _change(row: Any) -> Change:
    time = row.time
    if time.tzinfo is None:  # SQLite hands back naive datetimes; every time is UTC
        time = time.replace(tzinfo=UTC)
    return Change(
        seq=int(row.seq),
        kind=ChangeKind(row.kind),
        StudyInstanceUID=row.StudyInstanceUID,
        SeriesInstanceUID=row.SeriesInstanceUID,
        SOPInstanceUID=row.SOPInstanceUID,
        SOPClassUID=row.SOPClassUID,
        origin=row.origin,
        SourceApplicationEntityTitle=row.SourceApplicationEntityTitle,
        time=time,
    )


class ChangeLog:
    """Reading the log, and the cursors of its consumers."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def since(self, seq: int, limit: int) -> list[Change]:
        """At most ``limit`` changes after ``seq``, oldest first."""
        statement = select(change).where(change.c.seq > seq).order_by(change.c.seq).limit(limit)
        with self.index.reading() as conn:
            return [_change(row) for row in conn.execute(statement)]

    def last(self) -> int:
        """The newest change's ``seq``; 0 for an empty log."""
        with self.index.reading() as conn:
            return int(conn.execute(select(func.coalesce(func.max(change.c.seq), 0))).scalar_one())

    def cursor(self, consumer: str) -> int:
        """The last ``seq`` ``consumer`` finished; 0 before its first."""
        found = self._cursor(consumer)
        return 0 if found is None else found

    def _cursor(self, consumer: str) -> int | None:
        with self.index.reading() as conn:
            found = conn.execute(
                select(change_cursor.c.seq).where(change_cursor.c.consumer == consumer)
            ).scalar_one_or_none()
        return None if found is None else int(found)

    def begin(self, consumer: str) -> int:
        """Make ``consumer``'s cursor at the end of the log if it has none: a consumer
        started on an archive follows what changes from now on (what was stored before
        it is a backfill's work). Its cursor either way."""
        if (found := self._cursor(consumer)) is not None:
            return found  # the usual case, without the write lock
        try:
            with self.index.writer.begin() as conn:
                found = conn.execute(
                    select(change_cursor.c.seq).where(change_cursor.c.consumer == consumer)
                ).scalar_one_or_none()
                if found is not None:
                    return int(found)
                last = conn.execute(select(func.coalesce(func.max(change.c.seq), 0))).scalar_one()
                conn.execute(
                    insert(change_cursor).values(
                        consumer=consumer, seq=last, updated_at=datetime.now(UTC)
                    )
                )
                return int(last)
        except IntegrityError:
            return self.cursor(consumer)  # another process made it meanwhile
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot make the cursor of {consumer}: {exc}") from exc

    def advance(self, consumer: str, seen: int, to: int, writes: Writes | None = None) -> bool:
        """Move ``consumer`` from ``seen`` to ``to``, with ``writes`` in the same
        transaction; False (and nothing written) if another follower moved it first."""
        now = datetime.now(UTC)
        try:
            with self.index.writer.begin() as conn:
                current = conn.execute(
                    select(change_cursor.c.seq)
                    .where(change_cursor.c.consumer == consumer)
                    .with_for_update()
                ).scalar_one_or_none()
                if current is None:
                    if seen != 0:
                        return False
                    conn.execute(
                        insert(change_cursor).values(consumer=consumer, seq=to, updated_at=now)
                    )
                elif int(current) != seen:
                    return False
                else:
                    conn.execute(
                        update(change_cursor)
                        .where(change_cursor.c.consumer == consumer)
                        .values(seq=to, updated_at=now)
                    )
                if writes is not None:
                    writes(conn)
                return True
        except IntegrityError:
            return False  # another follower made the cursor between the look and the insert
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot move the cursor of {consumer}: {exc}") from exc


# Writes a consumer's outcome in the transaction that moves its cursor.
Writes = Callable[[Connection], None]


class Consumer(Protocol):
    """Follows the change log; ``name`` keys its cursor, so it must stay the same."""

    name: str

    def prepare(self, changes: Sequence[Change]) -> Writes | None:
        """Decide what ``changes`` mean; None when they need no writes."""
        ...

    def committed(self) -> None:
        """What the last ``prepare`` returned to write has committed (a hint: wake a
        worker for the jobs it made). Not called for a batch that needed no writes."""
        ...


class Follower:
    """One consumer's loop over the log: a batch at a time, from its durable cursor.

    Woken by :meth:`wake` (an instance stored in this process) and otherwise looking
    every ``poll`` seconds, for changes other processes made. Once woken it lets
    ``gather`` seconds pass before it reads, so that while instances arrive each batch
    holds what came meanwhile: a step per stored instance would put a transaction of
    its own beside each ingest transaction, waiting for the same write lock. A failure
    leaves the cursor where it was; the batch is tried again after a pause that doubles
    up to ``max_pause`` seconds, and the log says why.
    """

    def __init__(
        self,
        log: ChangeLog,
        consumer: Consumer,
        *,
        batch: int = 100,
        poll: float = 0.25,
        gather: float = 0.2,
        max_pause: float = 30.0,
        also: Callable[[], object] | None = None,
    ) -> None:
        """``also``: work to do after each batch and at each poll (a sweep for what
        became due with time rather than with a change)."""
        self.log = log
        self.consumer = consumer
        self.batch = batch
        self.poll = poll
        self.gather = gather
        self.max_pause = max_pause
        self.also = also
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> int:
        """Handle the next batch; how many changes it held (0: caught up)."""
        seen = self.log.cursor(self.consumer.name)
        changes = self.log.since(seen, self.batch)
        if not changes:
            return 0
        writes = self.consumer.prepare(changes)
        if self.log.advance(self.consumer.name, seen, changes[-1].seq, writes) and writes:
            self.consumer.committed()
        return len(changes)

    def catch_up(self, *_: object) -> None:
        """Every change there is now (tests, and a command run to completion)."""
        while self.step():
            pass

    def wake(self, *_: object) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        pause = self.poll
        while not stop.is_set():
            try:
                handled = self.step()
                if self.also is not None:
                    self.also()
            except Exception as exc:  # kept: the same changes come again after the pause
                log.warning(
                    "%s: changes after #%d wait %.1f s: %s",
                    self.consumer.name,
                    self._cursor_or_zero(),
                    pause,
                    exc,
                    exc_info=not isinstance(exc, IndexFailure),
                )
                stop.wait(pause)
                pause = min(pause * 2, self.max_pause)
                continue
            pause = self.poll
            if handled < self.batch:
                if self._wake.wait(self.poll):
                    stop.wait(self.gather)
                self._wake.clear()

    def _cursor_or_zero(self) -> int:
        try:
            return self.log.cursor(self.consumer.name)
        except IndexFailure:
            return 0

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(
            target=self.run, args=(stop,), name=f"changes-{self.consumer.name}", daemon=True
        )
        thread.start()
        self._thread = thread
        return thread


class StudyStability:
    """The consumer ``stability``: a study is stable once ``seconds`` passed without a
    change to it; the sweep then appends its ``stable`` change.

    Each change (re)sets when its study is due, in the ``settling`` table; the sweep
    takes the studies that are due and appends a ``stable`` change for each, in one
    transaction, so that two nodes sweeping at once announce a study once. A study
    deleted meanwhile is not announced.
    """

    name = "stability"

    def __init__(self, index: Index, seconds: float) -> None:
        self.index = index
        self.seconds = seconds

    def prepare(self, changes: Sequence[Change]) -> Writes | None:
        due: dict[str, datetime] = {}
        for c in changes:
            if c.kind != ChangeKind.STABLE:
                due[c.StudyInstanceUID] = c.time + timedelta(seconds=self.seconds)
        if not due:
            return None

        def writes(conn: Connection) -> None:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            for uid, when in due.items():
                statement = dialect.insert(settling).values(StudyInstanceUID=uid, due=when)
                conn.execute(
                    statement.on_conflict_do_update(
                        index_elements=[settling.c.StudyInstanceUID],
                        set_={"due": statement.excluded.due},
                    )
                )

        return writes

    def committed(self) -> None:
        pass

    def sweep(self, now: datetime | None = None) -> list[str]:
        """Announce the studies due by ``now``; their Study Instance UIDs."""
        now = now or datetime.now(UTC)
        statement = select(settling.c.StudyInstanceUID).where(settling.c.due <= now).limit(500)
        with self.index.reading() as conn:
            if conn.execute(statement.limit(1)).first() is None:
                return []  # the usual answer, without the write lock
        # PostgreSQL: nodes sweeping at once take different studies.
        locked = statement if self.index.is_sqlite else statement.with_for_update(skip_locked=True)
        try:
            with self.index.writer.begin() as conn:
                found = list(conn.execute(locked).scalars())
                if not found:
                    return []
                present = set(
                    conn.execute(
                        select(study.c.StudyInstanceUID).where(study.c.StudyInstanceUID.in_(found))
                    ).scalars()
                )
                for uid in found:
                    if uid in present:
                        append_change(conn, ChangeKind.STABLE, uid, time=now)
                conn.execute(delete(settling).where(settling.c.StudyInstanceUID.in_(found)))
                return [uid for uid in found if uid in present]
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot announce the stable studies: {exc}") from exc
