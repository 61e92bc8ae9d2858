"""Durable work queue in the index: what the inference pipeline must do, and how it went.

A job is one model on one instance (or one study). It is claimed with a lease: a worker
that dies (``kill -9``) leaves a lease that runs out, and another worker takes the job
again. Only the holder of the current lease can finish a job, so a worker that lost its
lease cannot record a second completion. A job that keeps failing stops after
``max_attempts`` and stays visible, with its reason, until someone retries it.

SQLite serialises writers (``BEGIN IMMEDIATE``); PostgreSQL claims with
``FOR UPDATE SKIP LOCKED`` so that workers never wait on each other's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from pacs.errors import IndexFailure
from pacs.index import Index, job

# A job that keeps failing is tried again at least once an hour.
MAX_BACKOFF_S = 3600.0


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobKind(StrEnum):
    """What a job does. A screening job's ``model`` column is the model's name; the
    others are ``<kind>:<name>`` (names never hold a colon), so that one unique key
    covers every kind."""

    SCREEN = "screen"  # a model on an instance or a study
    FORWARD = "forward"  # a report sent to a result destination
    ROUTE = "route"  # an instance sent by a routing rule


_PREFIXED = (JobKind.FORWARD, JobKind.ROUTE)


def job_model(kind: JobKind, name: str) -> str:
    """The ``model`` column of a job of ``kind`` for the model, destination or route
    ``name``."""
    return name if kind == JobKind.SCREEN else f"{kind}:{name}"


def _of_kind(kinds: Sequence[JobKind]) -> Any:
    """A condition on the ``model`` column: jobs of one of ``kinds``."""
    prefixed = [job.c.model.startswith(f"{k}:", autoescape=True) for k in _PREFIXED]
    found = [c for k, c in zip(_PREFIXED, prefixed, strict=True) if k in kinds]
    if JobKind.SCREEN in kinds:
        found.append(and_(*(~c for c in prefixed)))
    return or_(*found)


@dataclass(frozen=True)
class Job:
    id: int
    model: str
    StudyInstanceUID: str
    SOPInstanceUID: str
    state: JobState
    attempts: int
    worker: str
    reason: str
    result: str

    @property
    def kind(self) -> JobKind:
        prefix, colon, _ = self.model.partition(":")
        return JobKind(prefix) if colon and prefix in set(_PREFIXED) else JobKind.SCREEN

    @property
    def name(self) -> str:
        """The model's, destination's or route's name."""
        return self.model if self.kind == JobKind.SCREEN else self.model.partition(":")[2]

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls(
            id=row.id,
            model=row.model,
            StudyInstanceUID=row.StudyInstanceUID,
            SOPInstanceUID=row.SOPInstanceUID,
            state=JobState(row.state),
            attempts=row.attempts,
            worker=row.worker,
            reason=row.reason,
            result=row.result,
        )


def _still_held(claimed: Job) -> tuple[Any, ...]:
    """The job is still this worker's, in this attempt: a lease it lost is not acted on."""
    return (
        job.c.id == claimed.id,
        job.c.state == JobState.RUNNING,
        job.c.worker == claimed.worker,
        job.c.attempts == claimed.attempts,
    )


def _now() -> datetime:
    return datetime.now(UTC)


class JobQueue:
    def __init__(self, index: Index) -> None:
        self.index = index

    def enqueue(
        self,
        model: str,
        StudyInstanceUID: str,
        SOPInstanceUID: str = "",
        *,
        delay: float = 0.0,
    ) -> None:
        """Ask for ``model`` on a target; asking again re-runs it (and a pending study job
        waits ``delay`` seconds more: the study is not stable yet)."""
        self._put(
            model, StudyInstanceUID, SOPInstanceUID, state=JobState.PENDING, reason="", delay=delay
        )

    def record_skip(
        self, model: str, StudyInstanceUID: str, SOPInstanceUID: str, reason: str
    ) -> None:
        """A model concerned by an instance that cannot use it: kept, with the reason."""
        self._put(
            model, StudyInstanceUID, SOPInstanceUID, state=JobState.SKIPPED, reason=reason, delay=0
        )

    def add_missing(
        self,
        model: str,
        StudyInstanceUID: str,
        SOPInstanceUID: str = "",
        *,
        reason: str = "",
    ) -> bool:
        """A job for a target that has none (pending, or skipped with ``reason``); a
        target that already has one, in any state, is left as it is. True when added:
        asked twice, by one process or two, a target gets one job."""
        target = and_(
            job.c.model == model,
            job.c.StudyInstanceUID == StudyInstanceUID,
            job.c.SOPInstanceUID == SOPInstanceUID,
        )
        now = _now()
        try:
            with self.index.writer.begin() as conn:
                if conn.execute(select(job.c.id).where(target)).first() is not None:
                    return False
                conn.execute(
                    job.insert().values(
                        model=model,
                        StudyInstanceUID=StudyInstanceUID,
                        SOPInstanceUID=SOPInstanceUID,
                        state=JobState.SKIPPED if reason else JobState.PENDING,
                        attempts=0,
                        not_before=now,
                        lease_until=None,
                        worker="",
                        reason=reason,
                        result="",
                        updated_at=now,
                    )
                )
                return True
        except IntegrityError:
            return False  # another process added it between the look and the insert
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot queue the job: {exc}") from exc

    def _put(
        self,
        model: str,
        StudyInstanceUID: str,
        SOPInstanceUID: str,
        *,
        state: JobState,
        reason: str,
        delay: float,
    ) -> None:
        """Insert or reset the job of a target, in one transaction."""
        try:
            with self.index.writer.begin() as conn:
                put_job(
                    conn,
                    model,
                    StudyInstanceUID,
                    SOPInstanceUID,
                    state=state,
                    reason=reason,
                    delay=delay,
                )
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot queue the job: {exc}") from exc

    def claim(
        self,
        worker: str,
        *,
        lease: float = 300.0,
        models: Sequence[str] = (),
        kinds: Sequence[JobKind] = (),
        max_attempts: int | None = None,
        in_study_order: bool = False,
    ) -> Job | None:
        """The oldest due job (or one whose lease ran out), now leased to ``worker``.

        ``in_study_order``: not while an earlier job of the same model and study waits
        (a send that failed and waits to be tried again) or another one runs, so that
        the instances of a study reach a peer one at a time, in the order they came.

        The attempt is counted here, when the job starts: a job whose worker died while
        running it (an image that crashes the process) has used its attempt, and one
        found with ``max_attempts`` used up that way is failed, not run once more.
        """
        now = _now()
        expired = and_(job.c.state == JobState.RUNNING, job.c.lease_until < now)
        abandoned = None
        if max_attempts is not None:
            abandoned = and_(expired, job.c.attempts >= max_attempts)
            expired = and_(expired, job.c.attempts < max_attempts)
        due = or_(and_(job.c.state == JobState.PENDING, job.c.not_before <= now), expired)
        if models:
            due = and_(due, job.c.model.in_(list(models)))
        if kinds:
            due = and_(due, _of_kind(kinds))
        if in_study_order:
            other = job.alias("other")
            ahead = (
                select(other.c.id)
                .where(
                    other.c.model == job.c.model,
                    other.c.StudyInstanceUID == job.c.StudyInstanceUID,
                    other.c.id != job.c.id,
                    or_(
                        and_(other.c.state == JobState.RUNNING, other.c.lease_until >= now),
                        and_(
                            other.c.state.in_([JobState.PENDING, JobState.RUNNING]),
                            other.c.id < job.c.id,
                        ),
                    ),
                )
                .exists()
            )
            due = and_(due, ~ahead)
        statement = select(job.c.id).where(due).order_by(job.c.id).limit(1)
        # Idle workers look often: one read finds that nothing is due (and nothing is to be
        # failed) without taking the database's write lock away from the archive.
        look = due if abandoned is None else or_(due, abandoned)
        with self.index.reading() as conn:
            if conn.execute(select(job.c.id).where(look).limit(1)).first() is None:
                return None
        if not self.index.is_sqlite:
            statement = statement.with_for_update(skip_locked=True)
        try:
            with self.index.writer.begin() as conn:
                if abandoned is not None:
                    _fail_abandoned(conn, abandoned, max_attempts or 0, now)
                found = conn.execute(statement).scalar_one_or_none()
                if found is None:
                    return None
                row = conn.execute(
                    update(job)
                    .where(job.c.id == found)
                    .values(_leased(worker, lease, now))
                    .returning(*job.c)
                ).one()
                return Job.from_row(row)
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot claim a job: {exc}") from exc

    def claim_run(
        self,
        worker: str,
        model: str,
        *,
        limit: int,
        lease: float = 300.0,
        max_attempts: int | None = None,
    ) -> list[Job]:
        """The oldest due job of ``model`` in study order (see :meth:`claim`) and the
        due jobs queued after it for the same study, up to ``limit`` in all, leased
        together: a sender then sends a run of a study's instances over one
        association and records them in one transaction."""
        first = self.claim(
            worker, lease=lease, models=[model], max_attempts=max_attempts, in_study_order=True
        )
        if first is None:
            return []
        if limit <= 1:
            return [first]
        now = _now()
        try:
            with self.index.writer.begin() as conn:
                # Nobody else takes these meanwhile: the first job, running, holds the study.
                following = conn.execute(
                    select(job.c.id, job.c.state, job.c.not_before)
                    .where(
                        job.c.model == model,
                        job.c.StudyInstanceUID == first.StudyInstanceUID,
                        job.c.id > first.id,
                        job.c.state == JobState.PENDING,
                    )
                    .order_by(job.c.id)
                    .limit(limit - 1)
                ).all()
                due = []
                for row in following:
                    if _aware(row.not_before) > now:
                        break  # waits to be tried again: the rest waits behind it
                    due.append(row.id)
                if not due:
                    return [first]
                rows = conn.execute(
                    update(job)
                    .where(job.c.id.in_(due), job.c.state == JobState.PENDING)
                    .values(_leased(worker, lease, now))
                    .returning(*job.c)
                ).all()
                return [first, *sorted((Job.from_row(r) for r in rows), key=lambda j: j.id)]
        except SQLAlchemyError as exc:
            self._finish(first, state=JobState.PENDING, attempts=first.attempts - 1)
            raise IndexFailure(f"cannot claim a job: {exc}") from exc

    def complete_all(self, claimed: Sequence[Job]) -> int:
        """Done, each with its SOP Instance UID as the result, in one transaction; how
        many were still held."""
        if not claimed:
            return 0
        try:
            with self.index.writer.begin() as conn:
                done = 0
                for held in claimed:
                    done += conn.execute(
                        update(job)
                        .where(*_still_held(held))
                        .values(
                            state=JobState.DONE,
                            result=held.SOPInstanceUID,
                            reason="",
                            lease_until=None,
                            updated_at=_now(),
                        )
                    ).rowcount
                return done
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot record the job's outcome: {exc}") from exc

    def release(self, claimed: Sequence[Job]) -> None:
        """Back to pending as they were, the attempt not counted: jobs of a run that
        were not tried (one before them failed)."""
        for held in claimed:
            self._finish(held, state=JobState.PENDING, attempts=held.attempts - 1)

    def renew(self, claimed: Job, lease: float) -> bool:
        """Extend the lease of a job still being worked on; False if it was lost."""
        try:
            with self.index.writer.begin() as conn:
                changed = conn.execute(
                    update(job)
                    .where(*_still_held(claimed))
                    .values(lease_until=_now() + timedelta(seconds=lease))
                ).rowcount
                return bool(changed)
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot renew the lease: {exc}") from exc

    def _finish(self, claimed: Job, **values: Any) -> bool:
        """Apply ``values`` if ``claimed`` still holds the lease; False if it lost it."""
        try:
            with self.index.writer.begin() as conn:
                changed = conn.execute(
                    update(job)
                    .where(*_still_held(claimed))
                    .values(lease_until=None, updated_at=_now(), **values)
                ).rowcount
                return bool(changed)
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot record the job's outcome: {exc}") from exc

    def complete(self, claimed: Job, result: str, *, note: str = "") -> bool:
        """Done; ``note`` is kept as the job's reason (a part of the work that could not
        be done, such as an ungradable eye of an exam that was read)."""
        return self._finish(claimed, state=JobState.DONE, result=result, reason=note)

    def skip(self, claimed: Job, reason: str, *, result: str = "") -> bool:
        """The model does not apply after all (an unusable image, missing views); the
        result, if any, is the report that says why (an image not assessable)."""
        return self._finish(claimed, state=JobState.SKIPPED, reason=reason, result=result)

    def fail(self, claimed: Job, reason: str, *, max_attempts: int, backoff: float = 5.0) -> bool:
        """Back to pending after a delay that doubles with the attempts (up to an hour),
        or failed for good."""
        if claimed.attempts >= max_attempts:
            return self._finish(claimed, state=JobState.FAILED, reason=reason)
        delay = timedelta(seconds=min(backoff * 2 ** min(claimed.attempts - 1, 30), MAX_BACKOFF_S))
        return self._finish(
            claimed, state=JobState.PENDING, reason=reason, not_before=_now() + delay
        )

    def expire(self, ids: Sequence[int]) -> int:
        """End the leases of running jobs whose worker is known to be gone (a process of
        this machine that no longer exists), so that they run again now, not once the
        lease runs out."""
        if not ids:
            return 0
        with self.index.writer.begin() as conn:
            return int(
                conn.execute(
                    update(job)
                    .where(job.c.id.in_(list(ids)), job.c.state == JobState.RUNNING)
                    .values(lease_until=_now())
                ).rowcount
            )

    def jobs(self, state: JobState | None = None) -> list[Job]:
        statement = select(job).order_by(job.c.id)
        if state is not None:
            statement = statement.where(job.c.state == state)
        with self.index.reading() as conn:
            return [Job.from_row(row) for row in conn.execute(statement)]

    def states(self, kind: JobKind) -> dict[str, dict[JobState, int]]:
        """How many jobs of ``kind`` there are in each state, by name."""
        statement = (
            select(job.c.model, job.c.state, func.count())
            .where(_of_kind([kind]))
            .group_by(job.c.model, job.c.state)
        )
        found: dict[str, dict[JobState, int]] = {}
        with self.index.reading() as conn:
            for model, state, count in conn.execute(statement):
                name = model if kind == JobKind.SCREEN else model.partition(":")[2]
                found.setdefault(name, {})[JobState(state)] = int(count)
        return found

    def last_reason(self, model: str, state: JobState) -> str:
        """The reason of the latest job of ``model`` in ``state``; "" if none."""
        statement = (
            select(job.c.reason)
            .where(job.c.model == model, job.c.state == state)
            .order_by(job.c.updated_at.desc(), job.c.id.desc())
            .limit(1)
        )
        with self.index.reading() as conn:
            return str(conn.execute(statement).scalar_one_or_none() or "")

    def requeue(self, model: str, states: Sequence[JobState]) -> int:
        """Jobs of ``model`` in ``states`` back to pending, attempts reset."""
        now = _now()
        try:
            with self.index.writer.begin() as conn:
                return int(
                    conn.execute(
                        update(job)
                        .where(job.c.model == model, job.c.state.in_(list(states)))
                        .values(
                            state=JobState.PENDING,
                            attempts=0,
                            not_before=now,
                            lease_until=None,
                            reason="",
                            updated_at=now,
                        )
                    ).rowcount
                )
        except SQLAlchemyError as exc:
            raise IndexFailure(f"cannot queue the jobs again: {exc}") from exc

    def retry(self, ids: Sequence[int] = ()) -> int:
        """Failed (or the given) jobs back to pending with their attempts reset."""
        where = job.c.id.in_(list(ids)) if ids else job.c.state == JobState.FAILED
        now = _now()
        with self.index.writer.begin() as conn:
            return int(
                conn.execute(
                    update(job)
                    .where(where, job.c.state != JobState.RUNNING)
                    .values(
                        state=JobState.PENDING,
                        attempts=0,
                        not_before=now,
                        reason="",
                        updated_at=now,
                    )
                ).rowcount
            )


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A job asked for: ``model`` on a target, due after ``delay`` seconds."""

    model: str
    StudyInstanceUID: str
    SOPInstanceUID: str = ""
    state: JobState = JobState.PENDING
    reason: str = ""
    delay: float = 0.0


def _upsert(dialect_name: str) -> Any:
    """Insert a job, or reset the target's job unless it is running: one statement."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(job).values(
        model=bindparam("p_model"),
        StudyInstanceUID=bindparam("p_study"),
        SOPInstanceUID=bindparam("p_sop"),
        result="",
        state=bindparam("p_state"),
        attempts=0,
        not_before=bindparam("p_not_before"),
        lease_until=None,
        worker="",
        reason=bindparam("p_reason"),
        updated_at=bindparam("p_now"),
    )
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[job.c.model, job.c.StudyInstanceUID, job.c.SOPInstanceUID],
        set_={
            "state": excluded.state,
            "attempts": 0,
            "not_before": excluded.not_before,
            "lease_until": None,
            "worker": "",
            "reason": excluded.reason,
            "updated_at": excluded.updated_at,
        },
        where=job.c.state != JobState.RUNNING,
    )


_UPSERTS = {name: _upsert(name) for name in ("sqlite", "postgresql")}


def put_jobs(conn: Connection, requests: Sequence[JobRequest]) -> None:
    """Insert or reset the job of each target in the caller's transaction, in one
    batch. A running job is left to finish. Two processes asking at once for the same
    target neither fail nor make two jobs."""
    if not requests:
        return
    now = _now()
    conn.execute(
        _UPSERTS["postgresql" if conn.dialect.name == "postgresql" else "sqlite"],
        [
            {
                "p_model": r.model,
                "p_study": r.StudyInstanceUID,
                "p_sop": r.SOPInstanceUID,
                "p_state": r.state,
                "p_not_before": now + timedelta(seconds=r.delay),
                "p_reason": r.reason,
                "p_now": now,
            }
            for r in requests
        ],
    )


def put_job(
    conn: Connection,
    model: str,
    StudyInstanceUID: str,
    SOPInstanceUID: str = "",
    *,
    state: JobState = JobState.PENDING,
    reason: str = "",
    delay: float = 0.0,
) -> None:
    """:func:`put_jobs` of one job."""
    put_jobs(conn, [JobRequest(model, StudyInstanceUID, SOPInstanceUID, state, reason, delay)])


def _leased(worker: str, lease: float, now: datetime) -> dict[str, Any]:
    """What claiming a job writes: running, one attempt more, leased to ``worker``."""
    return {
        "state": JobState.RUNNING,
        "attempts": job.c.attempts + 1,
        "lease_until": now + timedelta(seconds=lease),
        "worker": worker,
        "updated_at": now,
    }


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time stored is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _fail_abandoned(conn: Connection, abandoned: Any, max_attempts: int, now: datetime) -> None:
    """Jobs whose lease ran out after their last allowed attempt: failed, with why."""
    conn.execute(
        update(job)
        .where(abandoned)
        .values(
            state=JobState.FAILED,
            lease_until=None,
            updated_at=now,
            reason=literal(
                "the worker running it stopped (crash or kill) in each of its "
                f"{max_attempts} attempts"
            ),
        )
    )
