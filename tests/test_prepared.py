"""Statements run on the driver's cursor (pacs.prepared) bind, default and fail exactly
as the same statements run through SQLAlchemy: they rely on its compiled form's bind
processors and prefetched defaults, so this fails loudly if an upgrade changes them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from pacs.index import Index, change, change_cursor
from pacs.prepared import Prepared

INSERT = Prepared(change.insert())
BY_SEQ = Prepared(select(change).where(change.c.seq == bindparam("b_seq")))


def test_a_row_written_on_the_cursor_reads_back_as_sqlalchemy_writes_it(index: Index) -> None:
    moment = datetime(2026, 3, 15, 8, 30, 5, 123456, tzinfo=UTC)
    with index.writer.begin() as conn:
        INSERT.run(conn, {"kind": "stored", "StudyInstanceUID": "1.2.3", "time": moment})
        conn.execute(
            change.insert(), {"kind": "stored", "StudyInstanceUID": "1.2.3", "time": moment}
        )
    with index.reading() as conn:
        ours, theirs = conn.execute(select(change).order_by(change.c.seq)).all()
        assert dict(ours._mapping) | {"seq": 0} == dict(theirs._mapping) | {"seq": 0}
        assert ours.SeriesInstanceUID == ""  # the column's default, filled in
        assert ours.time.replace(tzinfo=UTC) == moment
        row = BY_SEQ.first(conn, {"b_seq": ours.seq})
    assert row is not None
    assert (row["kind"], row["StudyInstanceUID"]) == ("stored", "1.2.3")


def test_a_driver_error_is_sqlalchemys_error_and_the_transaction_rolls_back(
    index: Index,
) -> None:
    """The index retries lost races on SQLAlchemy's IntegrityError."""
    insert = Prepared(change_cursor.insert())

    def twice() -> None:
        with index.writer.begin() as conn:
            insert.run(conn, {"consumer": "c", "seq": 1, "updated_at": datetime.now(UTC)})
            insert.run(conn, {"consumer": "c", "seq": 2, "updated_at": datetime.now(UTC)})

    with pytest.raises(IntegrityError):
        twice()
    with index.reading() as conn:
        assert conn.execute(select(change_cursor)).all() == []
