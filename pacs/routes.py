"""Routing rules: which stored instances go on to which other archive, and when.

A rule matches on the stored header's attributes by DICOM keyword, with the matching
of a C-FIND key (PS3.4 C.2.2.2): one of several values, ``*`` and ``?`` wildcards, and a
range ``from-to`` (either end open) for dates and times. Two keys are not in the header
but in the change that stored the instance: ``SourceApplicationEntityTitle`` (the
calling AE of the C-STORE) and ``origin`` (``dimse``, ``stow``, ``import``,
``inference``: the archive's own AI reports). An attribute the instance lacks matches
nothing but an empty value (``""``). All keys of a rule must match.

The trigger says when: ``instance``, as each instance is stored (and again when it is
replaced), or ``stable``, once its study had no change for ``study_stable_seconds``,
then every instance of the study that matches. Pure functions over values, tested
without files or sockets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword

Trigger = Literal["instance", "stable"]
CHANGE_KEYS = ("SourceApplicationEntityTitle", "origin")
_RANGED = {"DA", "TM", "DT"}
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,48}$")


@dataclass(frozen=True)
class Route:
    """One rule: ``match`` (keyword -> accepted values) and a destination by name."""

    name: str
    match: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    trigger: Trigger = "instance"


def check_route(name: str, match: Mapping[str, list[str]], trigger: Trigger = "instance") -> Route:
    """A rule with its keys checked; ``ValueError`` with the reason otherwise."""
    if not _NAME.match(name):
        raise ValueError(f"route name {name!r}: 1-48 letters, digits, '.', '_' or '-'")
    for keyword, values in match.items():
        if keyword not in CHANGE_KEYS and tag_for_keyword(keyword) is None:
            raise ValueError(f"route {name}: {keyword!r} is not a DICOM keyword")
        if not values:
            raise ValueError(f"route {name}: {keyword} lists no value")
    return Route(name, {k: tuple(v) for k, v in match.items()}, trigger)


@cache
def _ranged(keyword: str) -> bool:
    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VR(tag) in _RANGED


@cache
def _wildcard(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def value_matches(keyword: str, pattern: str, value: str) -> bool:
    """One accepted value against one stored value (several stored values: any)."""
    candidates = [value, *value.split("\\")] if "\\" in value else [value]
    if _ranged(keyword) and "-" in pattern:
        low, _, high = pattern.partition("-")
        return any(c and (not low or c >= low) and (not high or c <= high) for c in candidates)
    if "*" in pattern or "?" in pattern:
        regex = _wildcard(pattern)
        return any(regex.fullmatch(c) for c in candidates)
    return pattern in candidates


def matches(route: Route, values: Mapping[str, str | None]) -> bool:
    """Whether an instance with header and change ``values`` is for ``route``."""
    for keyword, accepted in route.match.items():
        stored = values.get(keyword)
        value = "" if stored is None else stored.strip()
        if not any(value_matches(keyword, pattern, value) for pattern in accepted):
            return False
    return True
