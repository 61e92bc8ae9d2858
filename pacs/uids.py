"""UID validation (PS3.5 9.1), the only gate between peer-supplied strings and file paths."""

from __future__ import annotations

import re

from pacs.errors import InvalidUID

# Components are numbers without leading zeros ("0" alone is fine), joined by single dots.
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )


def require_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID or raise :class:`InvalidUID` naming the attribute."""
    if value is None or value == "":
        raise InvalidUID(f"{keyword} is missing")
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidUID(f"{keyword} {shown} is not a valid UID (digits and dots, at most 64)")
    return str(value)
