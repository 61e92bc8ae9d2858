"""The SQL index: patient / study / series / instance, SQLAlchemy Core, SQLite or PostgreSQL.

Columns are named by DICOM keyword and hold what C-FIND and QIDO-RS match or return by
default (PS3.18 tables 10.6.3-3 to -5, PS3.4 C.6 unique and required keys). The derived
attributes (ModalitiesInStudy, NumberOf...Related...) are kept up to date inside the
same transaction that adds or removes an instance, so queries never count rows.

Concurrency: on SQLite every write transaction starts with ``BEGIN IMMEDIATE`` (one
writer at a time, no lock upgrade deadlocks; WAL lets readers go on); on PostgreSQL the
study row is locked ``FOR UPDATE`` so that instances of one study commit one after the
other while different studies commit in parallel. A transaction that loses a race
(a unique key taken meanwhile, a lock timeout) is retried from the start.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy import (
    Index as SqlIndex,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from pacs.attributes import StoredValues, unpack
from pacs.errors import (
    DuplicateRejected,
    IndexFailure,
    PatientConflict,
    SeriesConflict,
    SourceGone,
)
from pacs.header import InstanceHeader, normalise_name
from pacs.prepared import Prepared

DuplicatePolicy = Literal["reject", "overwrite"]
PatientPolicy = Literal["reject", "update"]
DERIVED_ORIGIN = "inference"

metadata = MetaData()


def _uid(name: str, **kwargs: Any) -> Column[str]:
    return Column(name, String(64), nullable=False, **kwargs)


def _text(name: str) -> Column[str]:
    return Column(name, Text, nullable=False, default="")


def _count(name: str) -> Column[int]:
    return Column(name, Integer, nullable=False, default=0)


# Bumped whenever a table changes: an index made by another version is refused with the
# command that rebuilds it from the stored files (``filmless reindex``), unless the step
# from it only adds tables (``_ADDS_TABLES``), which ``create_schema`` then makes.
SCHEMA_VERSION = 3
_ADDS_TABLES = {2}  # 2 -> 3: the change log, its cursors and the settling studies

schema = Table("filmless_schema", metadata, Column("version", Integer, nullable=False))

# PATIENT-level C-FIND groups studies by PatientID + IssuerOfPatientID (PatientKey); a
# study without a PatientID is a patient of its own, never grouped with another. The
# attributes here are those of the latest instance stored for the patient; every study
# keeps its own copy of what its instances said (see ``study``).
patient = Table(
    "patient",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("PatientKey", Text, nullable=False, unique=True),
    _text("PatientID"),
    _text("IssuerOfPatientID"),
    _text("PatientName"),
    _text("PatientNameSearch"),
    _text("PatientBirthDate"),
    _text("PatientSex"),
    _count("NumberOfPatientRelatedStudies"),
    _count("NumberOfPatientRelatedSeries"),
    _count("NumberOfPatientRelatedInstances"),
    # Prefix matching (``Smith*``) can use these: SQLite with case_sensitive_like, and
    # PostgreSQL through the pattern operator class.
    SqlIndex("ix_patient_name", "PatientName", postgresql_ops={"PatientName": "text_pattern_ops"}),
    SqlIndex(
        "ix_patient_name_search",
        "PatientNameSearch",
        postgresql_ops={"PatientNameSearch": "text_pattern_ops"},
    ),
)

study = Table(
    "study",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", ForeignKey("patient.id"), nullable=False, index=True),
    _uid("StudyInstanceUID", unique=True),
    # The patient as this study's instances named it (the latest of them).
    _text("PatientID"),
    _text("IssuerOfPatientID"),
    _text("PatientName"),
    _text("PatientNameSearch"),
    _text("PatientBirthDate"),
    _text("PatientSex"),
    _text("StudyDate"),
    _text("StudyTime"),
    _text("AccessionNumber"),
    _text("StudyID"),
    _text("StudyDescription"),
    _text("ReferringPhysicianName"),
    _text("ReferringPhysicianNameSearch"),
    _text("TimezoneOffsetFromUTC"),
    _text("ModalitiesInStudy"),
    _count("NumberOfStudyRelatedSeries"),
    _count("NumberOfStudyRelatedInstances"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    SqlIndex("ix_study_date", "StudyDate"),
    SqlIndex("ix_study_accession", "AccessionNumber"),
    SqlIndex("ix_study_patient_date", "patient_id", "StudyDate"),
    SqlIndex("ix_study_patient_identifier", "PatientID"),
    SqlIndex(
        "ix_study_patient_name", "PatientName", postgresql_ops={"PatientName": "text_pattern_ops"}
    ),
    SqlIndex(
        "ix_study_patient_name_search",
        "PatientNameSearch",
        postgresql_ops={"PatientNameSearch": "text_pattern_ops"},
    ),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", ForeignKey("study.id"), nullable=False, index=True),
    _uid("SeriesInstanceUID", unique=True),
    _text("Modality"),
    Column("SeriesNumber", Integer),
    _text("SeriesDescription"),
    _text("BodyPartExamined"),
    _text("Laterality"),
    _text("PerformedProcedureStepStartDate"),
    _text("PerformedProcedureStepStartTime"),
    _text("ScheduledProcedureStepID"),
    _text("RequestedProcedureID"),
    _count("NumberOfSeriesRelatedInstances"),
    SqlIndex("ix_series_modality", "Modality"),
)

instance = Table(
    "instance",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_id", ForeignKey("series.id"), nullable=False, index=True),
    _uid("SOPInstanceUID", unique=True),
    _uid("SOPClassUID", index=True),
    Column("InstanceNumber", Integer),
    Column("Rows", Integer),
    Column("Columns", Integer),
    Column("BitsAllocated", Integer),
    Column("NumberOfFrames", Integer),
    _text("ContentDate"),
    _text("ContentTime"),
    _text("ImageType"),
    _text("ViewPosition"),
    _text("ImageLaterality"),
    _text("PresentationIntentType"),
    _text("PhotometricInterpretation"),
    _text("SpecificCharacterSet"),
    _uid("TransferSyntaxUID"),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("path", Text, nullable=False),
    _text("origin"),
    _text("SourceApplicationEntityTitle"),
    Column("received_at", DateTime(timezone=True), nullable=False),
    # Every attribute of the header, packed DICOM JSON (pacs.attributes).
    Column("attributes", LargeBinary, nullable=False, default=b""),
)


# The inference pipeline's durable queue; the logic is in pacs.jobs.
job = Table(
    "job",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(64), nullable=False),
    Column("StudyInstanceUID", String(64), nullable=False),
    Column("SOPInstanceUID", String(64), nullable=False, default=""),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("not_before", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True)),
    Column("worker", String(128), nullable=False, default=""),
    Column("reason", Text, nullable=False, default=""),
    Column("result", String(64), nullable=False, default=""),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # One job per model and target: an instance (SOPInstanceUID) or a study ("").
    UniqueConstraint("model", "StudyInstanceUID", "SOPInstanceUID", name="uq_job_target"),
)


# The change log (pacs.changes): one row per stored, replaced or deleted instance, and
# per study that became stable, appended in the transaction of the change itself.
# ``seq`` is never reused (AUTOINCREMENT on SQLite), so a consumer's cursor stays true
# across deletions and ``reindex``.
change = Table(
    "change",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("StudyInstanceUID", String(64), nullable=False),
    Column("SeriesInstanceUID", String(64), nullable=False, default=""),
    Column("SOPInstanceUID", String(64), nullable=False, default=""),
    Column("SOPClassUID", String(64), nullable=False, default=""),
    Column("origin", Text, nullable=False, default=""),
    Column("SourceApplicationEntityTitle", Text, nullable=False, default=""),
    Column("time", DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

# How far each consumer of the change log got: the last ``seq`` it finished.
change_cursor = Table(
    "change_cursor",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


# Studies that changed and are not yet stable: when each becomes stable if nothing else
# arrives (pacs.changes.StudyStability). Kept here, not in a process, so that stability
# holds across processes, nodes and restarts.
settling = Table(
    "settling",
    metadata,
    Column("StudyInstanceUID", String(64), primary_key=True),
    Column("due", DateTime(timezone=True), nullable=False, index=True),
)


class ChangeKind(StrEnum):
    STORED = "stored"
    REPLACED = "replaced"
    DELETED = "deleted"
    STABLE = "stable"


class IndexAction(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    OVERWRITTEN = "overwritten"


@dataclass(frozen=True, slots=True)
class BlobFacts:
    """What the store knows about the bytes of one instance."""

    TransferSyntaxUID: str
    size: int
    sha256: str
    path: str
    origin: str
    SourceApplicationEntityTitle: str


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """An indexed instance with the keys a caller needs to find its bytes."""

    id: int
    SOPInstanceUID: str
    SOPClassUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str
    TransferSyntaxUID: str
    size: int
    sha256: str
    path: str
    received_at: datetime

    def __post_init__(self) -> None:
        # SQLite hands back naive datetimes; every time stored is UTC.
        if self.received_at.tzinfo is None:
            object.__setattr__(self, "received_at", self.received_at.replace(tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class StoredFacts:
    """An indexed instance as rules see it: its stored header and how it arrived."""

    StudyInstanceUID: str
    SOPInstanceUID: str
    attributes: bytes
    origin: str
    SourceApplicationEntityTitle: str

    def values(self) -> Mapping[str, str | None]:
        """Header values by keyword, and the two facts of its arrival."""
        arrival = {
            "origin": self.origin,
            "SourceApplicationEntityTitle": self.SourceApplicationEntityTitle,
        }
        return _Over(arrival, StoredValues(unpack(self.attributes)))


class _Over(Mapping[str, str | None]):
    """``first``'s values, then ``then``'s (a read-only ChainMap)."""

    def __init__(self, first: Mapping[str, str | None], then: Mapping[str, str | None]) -> None:
        self.first, self.then = first, then

    def __getitem__(self, key: str) -> str | None:
        return self.first[key] if key in self.first else self.then[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.first
        yield from (k for k in self.then if k not in self.first)

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass(frozen=True, slots=True)
class IndexOutcome:
    action: IndexAction
    record: InstanceRecord
    replaced: InstanceRecord | None = None
    # The patient attributes of an existing study changed (a correction, or the study
    # moved to another patient under patient_conflict = "update").
    patient_updated: bool = False


_RETRIES = 8


class Index:
    """The archive's database; one per process, safe to share between threads."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.writer = self._sqlite_engine(url, echo, begin="BEGIN IMMEDIATE")
            self.reader = self._sqlite_engine(url, echo, begin="BEGIN")
        else:
            self.writer = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10)
            self.reader = self.writer

    @staticmethod
    def _sqlite_engine(url: str, echo: bool, begin: str) -> Engine:
        engine = create_engine(url, echo=echo, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
            # Hand transaction control to the "begin" hook below (SQLAlchemy's recipe).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            # DICOM matching is case-sensitive unless fuzzy; SQLite's LIKE is not by default.
            cursor.execute("PRAGMA case_sensitive_like=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            # On the driver's connection: every transaction starts here, and SQLAlchemy's
            # execution path cost more than the BEGIN itself.
            driver = connection.connection.dbapi_connection
            try:
                driver.execute(begin)  # type: ignore[union-attr]
            except sqlite3.Error as exc:
                raise DBAPIError.instance(begin, (), exc, sqlite3.Error) from exc

        return engine

    def create_schema(self) -> None:
        """Create what is missing; refuse an index that another schema version made."""
        version = self.schema_version()
        if version in _ADDS_TABLES:
            metadata.create_all(self.writer)
            with self.writer.begin() as conn:
                conn.execute(update(schema).values(version=SCHEMA_VERSION))
            version = SCHEMA_VERSION
        if version is not None and version != SCHEMA_VERSION:
            raise IndexFailure(
                f"the index {self.url.render_as_string(hide_password=True)} has schema "
                f"version {version}, this filmless needs {SCHEMA_VERSION}: rebuild it from "
                "the stored files with `filmless reindex`"
            )
        metadata.create_all(self.writer)
        with self.writer.begin() as conn:
            if conn.execute(select(func.count()).select_from(schema)).scalar_one() == 0:
                conn.execute(insert(schema).values(version=SCHEMA_VERSION))

    def schema_version(self) -> int | None:
        """None for an empty database; 1 for an index from before versions were kept."""
        with self.reader.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            if "instance" not in tables:
                return None
            if schema.name not in tables:
                return 1
            found = conn.execute(select(func.max(schema.c.version))).scalar_one()
            return None if found is None else int(found)

    def drop_schema(self) -> None:
        metadata.drop_all(self.writer)

    def drop_archive_tables(self) -> None:
        """The patient, study, series and instance tables (not the jobs, nor the change
        log and its cursors: what consumers saw stays seen): ``reindex``."""
        with self.writer.begin() as conn:
            for name in ("instance", "series", "study", "patient", schema.name):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")

    def dispose(self) -> None:
        self.writer.dispose()
        self.reader.dispose()

    # -- reads -----------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        try:
            with self.reader.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise IndexFailure(f"the index cannot be read: {_reason(exc)}") from exc

    def instance(self, SOPInstanceUID: str) -> InstanceRecord | None:
        with self.reading() as conn:
            return _find_instance(conn, SOPInstanceUID)

    def by_uid(self, SOPInstanceUIDs: Sequence[str]) -> dict[str, InstanceRecord]:
        """The records of those of the instances that are indexed, in one query."""
        statement = record_query().where(instance.c.SOPInstanceUID.in_(list(SOPInstanceUIDs)))
        with self.reading() as conn:
            rows = conn.execute(statement).mappings()
            return {row["SOPInstanceUID"]: InstanceRecord(**row) for row in rows}

    def blob_paths(self) -> dict[str, str]:
        """Every instance's blob path and SOP Instance UID: what the startup
        reconciliation needs, without a record per row (an index of millions)."""
        statement = select(instance.c.path, instance.c.SOPInstanceUID)
        with self.reading() as conn:
            return {row.path: row.SOPInstanceUID for row in conn.execute(statement)}

    def instances(self) -> list[InstanceRecord]:
        with self.reading() as conn:
            rows = conn.execute(record_query().order_by(instance.c.id)).mappings()
            return [InstanceRecord(**row) for row in rows]

    def stored_facts(
        self,
        *,
        SOPInstanceUIDs: Sequence[str] | None = None,
        StudyInstanceUID: str | None = None,
    ) -> dict[str, StoredFacts]:
        """What routing decides by, for the given instances (those still indexed) or
        every instance of a study, by SOP Instance UID."""
        statement = _facts_query()
        if SOPInstanceUIDs is not None:
            statement = statement.where(instance.c.SOPInstanceUID.in_(list(SOPInstanceUIDs)))
        if StudyInstanceUID is not None:
            statement = statement.where(study.c.StudyInstanceUID == StudyInstanceUID)
        with self.reading() as conn:
            return {
                row.SOPInstanceUID: StoredFacts(**row._mapping)
                for row in conn.execute(statement.order_by(instance.c.id))
            }

    def count_instances(self, *, since: datetime | None = None) -> int:
        statement = select(func.count()).select_from(instance)
        if since is not None:
            statement = statement.where(instance.c.received_at >= since)
        with self.reading() as conn:
            return int(conn.execute(statement).scalar_one())

    def walk_facts(
        self, *, since: datetime | None = None, page: int = 500
    ) -> Iterator[list[StoredFacts]]:
        """:meth:`stored_facts` of every instance (received since ``since``), a page at
        a time in the order they were stored; keyset paging, so that an instance stored
        meanwhile is seen once or not at all, never twice, and no page holds a read
        transaction open while its caller works."""
        last = 0
        while True:
            statement = (
                _facts_query(instance.c.id)
                .where(instance.c.id > last)
                .order_by(instance.c.id)
                .limit(page)
            )
            if since is not None:
                statement = statement.where(instance.c.received_at >= since)
            with self.reading() as conn:
                rows = conn.execute(statement).all()
            if not rows:
                return
            yield [
                StoredFacts(**{k: v for k, v in row._mapping.items() if k != "id"}) for row in rows
            ]
            last = rows[-1].id

    def records(
        self,
        StudyInstanceUID: str,
        SeriesInstanceUID: str | None = None,
        SOPInstanceUID: str | None = None,
    ) -> list[InstanceRecord]:
        """The instances of a study, series or one instance, in series and instance order."""
        statement = record_query().where(study.c.StudyInstanceUID == StudyInstanceUID)
        if SeriesInstanceUID is not None:
            statement = statement.where(series.c.SeriesInstanceUID == SeriesInstanceUID)
        if SOPInstanceUID is not None:
            statement = statement.where(instance.c.SOPInstanceUID == SOPInstanceUID)
        statement = statement.order_by(
            series.c.SeriesNumber, series.c.id, instance.c.InstanceNumber, instance.c.id
        )
        with self.reading() as conn:
            return [InstanceRecord(**row) for row in conn.execute(statement).mappings()]

    # -- writes ----------------------------------------------------------------------

    def add(
        self,
        header: InstanceHeader,
        blob: BlobFacts,
        policy: DuplicatePolicy,
        patient_policy: PatientPolicy = "reject",
        requires: Sequence[str] = (),
        *,
        logged: bool = True,
    ) -> IndexOutcome:
        """Index one instance under ``policy`` in one transaction, retrying lost races.

        ``requires``: SOP Instance UIDs that must still be stored when it commits (the
        images a report was made from); otherwise :class:`SourceGone`. ``logged``: the
        change goes to the change log (not when ``reindex`` rebuilds what was there).
        """
        for attempt in range(_RETRIES):
            try:
                with self.writer.begin() as conn:
                    return _add(
                        conn, header, blob, policy, patient_policy, requires=requires, logged=logged
                    )
            except (IntegrityError, OperationalError) as exc:
                if attempt == _RETRIES - 1 or not _retryable(exc):
                    raise IndexFailure(f"the index cannot commit: {_reason(exc)}") from exc
                time.sleep(0.01 * (attempt + 1))
            except DBAPIError as exc:
                raise IndexFailure(f"the index cannot commit: {_reason(exc)}") from exc
        raise AssertionError("unreachable")

    def remove(self, SOPInstanceUID: str) -> InstanceRecord | None:
        """Drop an instance and the parents it leaves empty; returns what was removed."""
        removed = self.remove_all([SOPInstanceUID])
        return removed[0] if removed else None

    def remove_records(
        self,
        StudyInstanceUID: str,
        SeriesInstanceUID: str | None = None,
        SOPInstanceUID: str | None = None,
    ) -> list[InstanceRecord]:
        """Drop a study, series or instance as it is at the moment of the transaction:
        what is stored into it meanwhile (a report being written) goes too, or waits."""
        try:
            with self.writer.begin() as conn:
                # Lock the study first: an instance of it commits before or after, whole.
                conn.execute(
                    select(study.c.id)
                    .where(study.c.StudyInstanceUID == StudyInstanceUID)
                    .with_for_update()
                ).first()
                statement = record_query().where(study.c.StudyInstanceUID == StudyInstanceUID)
                if SeriesInstanceUID is not None:
                    statement = statement.where(series.c.SeriesInstanceUID == SeriesInstanceUID)
                if SOPInstanceUID is not None:
                    statement = statement.where(instance.c.SOPInstanceUID == SOPInstanceUID)
                found = [InstanceRecord(**row) for row in conn.execute(statement).mappings()]
                for record in found:
                    _remove(conn, record)
                return found
        except SQLAlchemyError as exc:
            raise IndexFailure(f"the index cannot commit: {_reason(exc)}") from exc

    def remove_all(self, SOPInstanceUIDs: Iterable[str]) -> list[InstanceRecord]:
        """Drop instances in one transaction: all of them go, or none."""
        try:
            with self.writer.begin() as conn:
                removed = []
                for uid in SOPInstanceUIDs:
                    record = _find_instance(conn, uid)
                    if record is not None:
                        _remove(conn, record)
                        removed.append(record)
                return removed
        except SQLAlchemyError as exc:
            raise IndexFailure(f"the index cannot commit: {_reason(exc)}") from exc


def _retryable(exc: DBAPIError) -> bool:
    if isinstance(exc, IntegrityError):
        return True
    text = str(exc.orig).lower()
    return any(word in text for word in ("locked", "deadlock", "serialize", "busy"))


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]


def record_query() -> Any:
    """Instances with the keys needed to read their bytes, joined up to the study."""
    return (
        select(
            instance.c.id,
            instance.c.SOPInstanceUID,
            instance.c.SOPClassUID,
            series.c.SeriesInstanceUID,
            study.c.StudyInstanceUID,
            instance.c.TransferSyntaxUID,
            instance.c.size,
            instance.c.sha256,
            instance.c.path,
            instance.c.received_at,
        )
        .join(series, instance.c.series_id == series.c.id)
        .join(study, series.c.study_id == study.c.id)
    )


# Built once: SQLAlchemy then only binds values and finds the compiled form by the
# statement's memoised cache key. Run when an instance is stored again.
_INSTANCE_BY_UID = record_query().where(instance.c.SOPInstanceUID == bindparam("b_sop"))
# The statements every stored instance runs, on the driver's cursor (pacs.prepared).
_INSTANCE_EXISTS = Prepared(
    select(instance.c.id).where(instance.c.SOPInstanceUID == bindparam("b_sop"))
)
_SERIES_BY_UID = Prepared(
    select(series.c.id, series.c.study_id).where(
        series.c.SeriesInstanceUID == bindparam("b_series")
    )
)
_INSERT_INSTANCE = Prepared(instance.insert().returning(instance.c.id))
_COUNT_SERIES = Prepared(
    update(series)
    .where(series.c.id == bindparam("b_id"))
    .values(NumberOfSeriesRelatedInstances=series.c.NumberOfSeriesRelatedInstances + 1)
)
_COUNT_STUDY = Prepared(
    update(study)
    .where(study.c.id == bindparam("b_id"))
    .values(
        NumberOfStudyRelatedInstances=study.c.NumberOfStudyRelatedInstances + 1,
        NumberOfStudyRelatedSeries=study.c.NumberOfStudyRelatedSeries + bindparam("b_series"),
        updated_at=bindparam("b_now"),
    )
)
_COUNT_PATIENT = Prepared(
    update(patient)
    .where(patient.c.id == bindparam("b_id"))
    .values(
        NumberOfPatientRelatedInstances=patient.c.NumberOfPatientRelatedInstances + 1,
        NumberOfPatientRelatedSeries=patient.c.NumberOfPatientRelatedSeries + bindparam("b_series"),
        NumberOfPatientRelatedStudies=patient.c.NumberOfPatientRelatedStudies
        + bindparam("b_study"),
    )
)


def _facts_query(*extra: Any) -> Select[Any]:
    return select(
        *extra,
        study.c.StudyInstanceUID,
        instance.c.SOPInstanceUID,
        instance.c.attributes,
        instance.c.origin,
        instance.c.SourceApplicationEntityTitle,
    ).select_from(
        instance.join(series, instance.c.series_id == series.c.id).join(
            study, series.c.study_id == study.c.id
        )
    )


def _values(record: Any) -> dict[str, Any]:
    """A flat dataclass's fields by name: ``dataclasses.asdict`` deep-copies each value,
    which the ingest transaction paid for on every instance."""
    names = _FIELD_NAMES.get(type(record))
    if names is None:
        names = _FIELD_NAMES[type(record)] = tuple(f.name for f in fields(record))
    return {name: getattr(record, name) for name in names}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _find_instance(conn: Connection, SOPInstanceUID: str) -> InstanceRecord | None:
    if _INSTANCE_EXISTS.scalar(conn, {"b_sop": SOPInstanceUID}) is None:
        return None  # the usual case at ingest: a new instance
    row = conn.execute(_INSTANCE_BY_UID, {"b_sop": SOPInstanceUID}).mappings().first()
    return None if row is None else InstanceRecord(**row)


def _insert_ignore(conn: Connection, table: Table, values: dict[str, Any]) -> int | None:
    """INSERT unless the unique key exists; the new row's id, None when it existed."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    if conn.dialect.name not in ("postgresql", "sqlite"):
        raise IndexFailure(f"unsupported index database {conn.dialect.name}")
    statement = (
        dialect.insert(table).values(**values).on_conflict_do_nothing().returning(table.c.id)
    )
    created = conn.execute(statement).first()
    return None if created is None else int(created[0])


def _add(
    conn: Connection,
    header: InstanceHeader,
    blob: BlobFacts,
    policy: DuplicatePolicy,
    patient_policy: PatientPolicy,
    *,
    requires: Sequence[str] = (),
    logged: bool = True,
) -> IndexOutcome:
    if requires:
        # The study is locked first, as a DELETE of it does: either the sources are
        # there when this commits, or the deletion already went through.
        _study_for_update(conn, header.study.StudyInstanceUID)
        present = set(
            conn.execute(
                select(instance.c.SOPInstanceUID).where(instance.c.SOPInstanceUID.in_(requires))
            ).scalars()
        )
        gone = [uid for uid in requires if uid not in present]
        if gone:
            raise SourceGone(f"what it was made from was deleted meanwhile: {gone[0]}")
    existing = _find_instance(conn, header.instance.SOPInstanceUID)
    replaced = None
    if existing is not None:
        if existing.sha256 == blob.sha256:
            return IndexOutcome(IndexAction.DUPLICATE, existing)
        if policy == "reject":
            raise DuplicateRejected(
                f"SOP Instance {existing.SOPInstanceUID} is already stored with different "
                "content and the duplicate policy is 'reject'"
            )
        _remove(conn, existing, logged=False)  # one "replaced" change, below
        replaced = existing
    now = datetime.now(UTC)
    incoming = _patient_values(header)
    # What the archive derives from a study (AI reports) never changes who it belongs to.
    derived = blob.origin == DERIVED_ORIGIN

    # The study row is locked first: instances of one study commit one after the other.
    study_row = _study_for_update(conn, header.study.StudyInstanceUID)
    new_study = False
    patient_changed = False
    if study_row is None:
        patient_id = _patient_row(conn, header, incoming)
        study_values = _values(header.study)
        study_values.update(
            incoming,
            patient_id=patient_id,
            ReferringPhysicianNameSearch=normalise_name(header.study.ReferringPhysicianName),
            created_at=now,
            updated_at=now,
        )
        new_study = _insert_ignore(conn, study, study_values) is not None
        study_row = _study_for_update(conn, header.study.StudyInstanceUID)
        assert study_row is not None
    elif derived:
        pass  # a report on the study's own images: it names the patient as they did
    elif (conflict := patient_conflict(study_row, incoming)) is not None:
        if patient_policy == "reject":
            raise PatientConflict(
                f"the study is another patient's ({conflict}): study "
                f"{header.study.StudyInstanceUID}; refused (patient_conflict = 'reject')"
            )
        _move_study(conn, study_row, _patient_row(conn, header, incoming))
        study_row = _study_for_update(conn, header.study.StudyInstanceUID)
        assert study_row is not None
        patient_changed = True
    study_id, owner = study_row["id"], study_row["patient_id"]
    # The latest instance names the patient (a corrected name, a birth date added); an
    # attribute it leaves empty does not erase what the others said.
    changes = {} if derived else {k: v for k, v in incoming.items() if v and study_row[k] != v}
    if changes:
        conn.execute(update(study).where(study.c.id == study_id).values(**changes))
        conn.execute(update(patient).where(patient.c.id == owner).values(**changes))
        patient_changed = True

    series_key = {"b_series": header.series.SeriesInstanceUID}
    series_row = _SERIES_BY_UID.first(conn, series_key)
    new_series = False
    if series_row is None:
        series_values = _values(header.series)
        series_values["study_id"] = study_id
        new_series = _insert_ignore(conn, series, series_values) is not None
        series_row = _SERIES_BY_UID.first(conn, series_key)
        assert series_row is not None
    series_id, series_study = series_row["id"], series_row["study_id"]
    if series_study != study_id:
        raise SeriesConflict(
            f"the series belongs to another study: series {header.series.SeriesInstanceUID} "
            f"is not in study {header.study.StudyInstanceUID}"
        )
    instance_values = _values(header.instance)
    instance_values.update(
        _values(blob), series_id=series_id, received_at=now, attributes=header.attributes
    )
    instance_id = int(_INSERT_INSTANCE.scalar(conn, instance_values))
    _COUNT_SERIES.run(conn, {"b_id": series_id})
    _COUNT_STUDY.run(conn, {"b_id": study_id, "b_series": int(new_series), "b_now": now})
    _COUNT_PATIENT.run(
        conn, {"b_id": owner, "b_series": int(new_series), "b_study": int(new_study)}
    )
    if new_series:
        _refresh_modalities(conn, study_id)
    if logged:
        append_change(
            conn,
            ChangeKind.STORED if replaced is None else ChangeKind.REPLACED,
            header.study.StudyInstanceUID,
            SeriesInstanceUID=header.series.SeriesInstanceUID,
            SOPInstanceUID=header.instance.SOPInstanceUID,
            SOPClassUID=header.instance.SOPClassUID,
            origin=blob.origin,
            SourceApplicationEntityTitle=blob.SourceApplicationEntityTitle,
            time=now,
        )
    record = InstanceRecord(
        id=instance_id,
        SOPInstanceUID=header.instance.SOPInstanceUID,
        SOPClassUID=header.instance.SOPClassUID,
        SeriesInstanceUID=header.series.SeriesInstanceUID,
        StudyInstanceUID=header.study.StudyInstanceUID,
        TransferSyntaxUID=blob.TransferSyntaxUID,
        size=blob.size,
        sha256=blob.sha256,
        path=blob.path,
        received_at=now,
    )
    action = IndexAction.STORED if replaced is None else IndexAction.OVERWRITTEN
    return IndexOutcome(action, record, replaced, patient_changed and not new_study)


_PATIENT_COLUMNS = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientNameSearch",
    "PatientBirthDate",
    "PatientSex",
)


_STUDY_FOR_UPDATE = Prepared(
    select(
        study.c.id,
        study.c.patient_id,
        study.c.NumberOfStudyRelatedSeries,
        study.c.NumberOfStudyRelatedInstances,
        *(study.c[name] for name in _PATIENT_COLUMNS),
    )
    .where(study.c.StudyInstanceUID == bindparam("b_study"))
    .with_for_update()
)


def _study_for_update(conn: Connection, StudyInstanceUID: str) -> Mapping[str, Any] | None:
    return _STUDY_FOR_UPDATE.first(conn, {"b_study": StudyInstanceUID})


def _patient_values(header: InstanceHeader) -> dict[str, str]:
    values = _values(header.patient)
    values["PatientNameSearch"] = normalise_name(header.patient.PatientName)
    return values


def patient_key(PatientID: str, IssuerOfPatientID: str, StudyInstanceUID: str) -> str:
    """Who a study belongs to for PATIENT-level grouping; no ID groups nothing."""
    if PatientID:
        return f"{PatientID}\\{IssuerOfPatientID}"  # a backslash never occurs in an LO value
    return f"\\study\\{StudyInstanceUID}"


def patient_conflict(stored: Mapping[str, Any], incoming: Mapping[str, str]) -> str | None:
    """Why an instance's patient is not the patient of the study it names, or None.

    Another PatientID (or issuer) is another patient. With the same ID, a different name
    alone is a correction, and so is a birth date alone; both at once is another person.
    """
    for key in ("PatientID", "IssuerOfPatientID"):
        if stored[key] != incoming[key]:
            return f"{key} {stored[key]!r}, not {incoming[key]!r}"
    name_differs = stored["PatientNameSearch"] != incoming["PatientNameSearch"]
    birth_differs = stored["PatientBirthDate"] != incoming["PatientBirthDate"]
    if (
        name_differs
        and birth_differs
        and stored["PatientBirthDate"]
        and incoming["PatientBirthDate"]
    ):
        return (
            f"PatientName {stored['PatientName']!r} born {stored['PatientBirthDate']}, not "
            f"{incoming['PatientName']!r} born {incoming['PatientBirthDate']}"
        )
    return None


def _patient_row(conn: Connection, header: InstanceHeader, values: Mapping[str, str]) -> int:
    key = patient_key(
        header.patient.PatientID,
        header.patient.IssuerOfPatientID,
        header.study.StudyInstanceUID,
    )
    created = _insert_ignore(conn, patient, {**values, "PatientKey": key})
    if created is not None:
        return created
    row = (
        conn.execute(
            select(patient.c.id, *(patient.c[k] for k in values)).where(patient.c.PatientKey == key)
        )
        .mappings()
        .one()
    )
    # A new study names the patient as they are known now.
    changes = {k: v for k, v in values.items() if v and row[k] != v}
    if changes:
        conn.execute(update(patient).where(patient.c.id == row["id"]).values(**changes))
    found: int = row["id"]
    return found


def _move_study(conn: Connection, row: Mapping[str, Any], to_patient: int) -> None:
    """The study, with its counts, from the patient it was under to ``to_patient``."""
    series_count = row["NumberOfStudyRelatedSeries"]
    instance_count = row["NumberOfStudyRelatedInstances"]
    for patient_id, sign in ((row["patient_id"], -1), (to_patient, 1)):
        conn.execute(
            update(patient)
            .where(patient.c.id == patient_id)
            .values(
                NumberOfPatientRelatedStudies=patient.c.NumberOfPatientRelatedStudies + sign,
                NumberOfPatientRelatedSeries=patient.c.NumberOfPatientRelatedSeries
                + sign * series_count,
                NumberOfPatientRelatedInstances=patient.c.NumberOfPatientRelatedInstances
                + sign * instance_count,
            )
        )
    conn.execute(update(study).where(study.c.id == row["id"]).values(patient_id=to_patient))
    conn.execute(
        delete(patient).where(
            patient.c.id == row["patient_id"], patient.c.NumberOfPatientRelatedStudies == 0
        )
    )


def _refresh_modalities(conn: Connection, study_id: int) -> None:
    modalities = conn.execute(
        select(series.c.Modality)
        .where(series.c.study_id == study_id, series.c.Modality != "")
        .distinct()
        .order_by(series.c.Modality)
    ).scalars()
    conn.execute(
        update(study).where(study.c.id == study_id).values(ModalitiesInStudy="\\".join(modalities))
    )


# Any constant: the key of the PostgreSQL lock that orders the change log's appends.
_CHANGE_LOCK = 0x66696C6D


def append_change(
    conn: Connection,
    kind: ChangeKind,
    StudyInstanceUID: str,
    *,
    SeriesInstanceUID: str = "",
    SOPInstanceUID: str = "",
    SOPClassUID: str = "",
    origin: str = "",
    SourceApplicationEntityTitle: str = "",
    time: datetime | None = None,
) -> None:
    """One row of the change log, in the caller's transaction.

    A consumer reads "everything after the last ``seq`` I saw", so no row may become
    visible after one with a higher ``seq``. SQLite has one writer at a time; on
    PostgreSQL two transactions could commit in the other order than they drew their
    numbers, so appends take a transaction lock first: the number is drawn and committed
    by one transaction at a time (its other statements still run in parallel).
    """
    if conn.dialect.name == "postgresql":
        _CHANGE_APPEND_LOCK.run(conn, {})
    _INSERT_CHANGE.run(
        conn,
        {
            "kind": str(kind),
            "StudyInstanceUID": StudyInstanceUID,
            "SeriesInstanceUID": SeriesInstanceUID,
            "SOPInstanceUID": SOPInstanceUID,
            "SOPClassUID": SOPClassUID,
            "origin": origin,
            "SourceApplicationEntityTitle": SourceApplicationEntityTitle,
            "time": time or datetime.now(UTC),
        },
    )


_INSERT_CHANGE = Prepared(change.insert())
_CHANGE_APPEND_LOCK = Prepared(select(func.pg_advisory_xact_lock(_CHANGE_LOCK)))


def _remove(conn: Connection, record: InstanceRecord, *, logged: bool = True) -> None:
    series_row = conn.execute(
        select(series.c.id, series.c.study_id, study.c.patient_id)
        .join(study, series.c.study_id == study.c.id)
        .where(series.c.SeriesInstanceUID == record.SeriesInstanceUID)
    ).one()
    conn.execute(
        select(study.c.id).where(study.c.id == series_row.study_id).with_for_update()
    ).scalar_one()
    conn.execute(delete(instance).where(instance.c.id == record.id))
    left = conn.execute(
        update(series)
        .where(series.c.id == series_row.id)
        .values(NumberOfSeriesRelatedInstances=series.c.NumberOfSeriesRelatedInstances - 1)
        .returning(series.c.NumberOfSeriesRelatedInstances)
    ).scalar_one()
    series_gone = left == 0
    if series_gone:
        conn.execute(delete(series).where(series.c.id == series_row.id))
    study_left = conn.execute(
        update(study)
        .where(study.c.id == series_row.study_id)
        .values(
            NumberOfStudyRelatedInstances=study.c.NumberOfStudyRelatedInstances - 1,
            NumberOfStudyRelatedSeries=study.c.NumberOfStudyRelatedSeries - int(series_gone),
            updated_at=datetime.now(UTC),
        )
        .returning(study.c.NumberOfStudyRelatedInstances)
    ).scalar_one()
    study_gone = study_left == 0
    if study_gone:
        conn.execute(delete(study).where(study.c.id == series_row.study_id))
    elif series_gone:
        _refresh_modalities(conn, series_row.study_id)
    patient_left = conn.execute(
        update(patient)
        .where(patient.c.id == series_row.patient_id)
        .values(
            NumberOfPatientRelatedInstances=patient.c.NumberOfPatientRelatedInstances - 1,
            NumberOfPatientRelatedSeries=patient.c.NumberOfPatientRelatedSeries - int(series_gone),
            NumberOfPatientRelatedStudies=patient.c.NumberOfPatientRelatedStudies - int(study_gone),
        )
        .returning(patient.c.NumberOfPatientRelatedInstances)
    ).scalar_one()
    if patient_left == 0:
        conn.execute(delete(patient).where(patient.c.id == series_row.patient_id))
    if logged:
        append_change(
            conn,
            ChangeKind.DELETED,
            record.StudyInstanceUID,
            SeriesInstanceUID=record.SeriesInstanceUID,
            SOPInstanceUID=record.SOPInstanceUID,
            SOPClassUID=record.SOPClassUID,
        )


def count_rows(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
