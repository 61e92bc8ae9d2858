"""Statements of the ingest transaction, compiled once and run on the DB-API cursor.

Storing a small instance runs about ten statements. Through SQLAlchemy's execution
machinery each costs some 25 µs of Python (parameter processing, an execution context,
result wrapping) for 2 to 3 µs of SQLite: most of the index's share of a C-STORE. A
:class:`Prepared` statement is compiled by SQLAlchemy for the connection's dialect (one
definition of the SQL, the same bind conversions, e.g. of datetimes for SQLite) and then
handed straight to the driver, inside the caller's transaction. Driver errors come back
as SQLAlchemy's exception types, so the index's retry of lost races sees no difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.base import Executable


class Prepared:
    """One statement; its compiled forms by dialect and parameter names."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, tuple[str, ...]], _Form] = {}

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The driver's cursor, the statement executed with ``params``."""
        key = (conn.dialect.name, tuple(params))
        form = self._compiled.get(key)
        if form is None:
            form = self._compiled[key] = _Form(self.statement, conn, params)
        values = form.values(params)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(form.sql, values)
        except conn.dialect.loaded_dbapi.Error as exc:
            cursor.close()
            raise DBAPIError.instance(
                form.sql, values, exc, conn.dialect.loaded_dbapi.Error
            ) from exc
        return cursor

    def first(self, conn: Connection, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first row by column name, or None."""
        cursor = self.execute(conn, params)
        try:
            row = cursor.fetchone()
            if row is None:
                return None
            return dict(zip((d[0] for d in cursor.description), row, strict=True))
        finally:
            cursor.close()

    def scalar(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The first column of the first row, or None."""
        cursor = self.execute(conn, params)
        try:
            row = cursor.fetchone()
            return None if row is None else row[0]
        finally:
            cursor.close()

    def run(self, conn: Connection, params: Mapping[str, Any]) -> None:
        self.execute(conn, params).close()


class _Form:
    """The SQL text for one dialect, and how to turn parameters into its values."""

    def __init__(self, statement: Executable, conn: Connection, params: Mapping[str, Any]) -> None:
        compiled = statement.compile(  # type: ignore[attr-defined]
            dialect=conn.dialect, column_keys=list(params)
        )
        self.sql: str = compiled.string
        self.defaults: dict[str, Any] = compiled.construct_params(dict(params))
        # Columns left out take their Python-side defaults, as SQLAlchemy would fill in.
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            default = column.default if column in compiled.insert_prefetch else column.onupdate
            if default is None or not default.is_scalar:
                raise ValueError(f"{column.key}: only scalar defaults are filled in")
            self.defaults[column.key] = default.arg
        self.processors: Mapping[str, Callable[[Any], Any]] = compiled._bind_processors
        # Positional drivers (SQLite's "?") need the order; named ones take the mapping.
        self.positions: Sequence[str] | None = compiled.positiontup

    def values(self, params: Mapping[str, Any]) -> Any:
        merged = {**self.defaults, **params}
        for name, process in self.processors.items():
            if name in merged and merged[name] is not None:
                merged[name] = process(merged[name])
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)
