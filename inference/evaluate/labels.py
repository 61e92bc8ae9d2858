"""The reference standard of an evaluation: a CSV of labels, matched to the images.

One row per unit, keyed by one of SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID,
PatientID or path (the first of these columns the file has); one column per label the
model reports, each 1 (present), 0 (absent) or empty (unknown: the unit is left out of
that label's metrics, not counted as negative); any other column is a subgroup (site,
reader, scanner...). Nothing is dropped silently: rows whose key no image has, images
that no row labels, columns that look like labels (only 1, 0 or empty) but name none of
the model's, labels of the model with no column, and keys given twice are all listed,
as STARD asks for the flow of participants.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KEYS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "path")
_PRESENT = {"1", "1.0", "true", "yes", "present"}
_ABSENT = {"0", "0.0", "false", "no", "absent"}
_SIDE_COLUMNS = ("laterality", "imagelaterality", "side", "eye", "breast")


class LabelsError(ValueError):
    """The labels file cannot be used; the message says why and where."""


@dataclass(frozen=True)
class Labels:
    """What the file says: its key column, each key's labels (None: unknown) and its
    subgroup values."""

    key: str
    names: tuple[str, ...]  # the label columns, in the file's order
    subgroups: tuple[str, ...]  # the other columns
    values: dict[str, dict[str, int | None]]
    groups: dict[str, dict[str, str]]
    repeated: tuple[str, ...] = ()  # keys given in more than one row (the first is kept)
    label_like: tuple[str, ...] = ()  # subgroup columns holding only 1, 0 or empty


@dataclass(frozen=True)
class Matching:
    """The labels matched to the units an evaluation has images for."""

    matched: list[str]  # unit keys with both a row and an image, in the images' order
    unlabelled: list[str] = field(default_factory=list)  # images no row names
    missing: list[str] = field(default_factory=list)  # rows no image has
    unknown_columns: list[str] = field(default_factory=list)  # label-like, not the model's
    absent_labels: list[str] = field(default_factory=list)  # model labels with no column


def read(
    path: Path, model_labels: Sequence[str], *, key: str | None = None, sided: bool = False
) -> Labels:
    """Read a labels file; columns named as a model label (case and spaces aside) are
    labels, the key column is ``key`` or else the first of :data:`KEYS` present, the
    rest subgroups. ``sided`` (eyes, breasts): a Laterality column (R or L) is part of
    the key, which becomes ``<key>/<R|L>``."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.DictReader(stream))
            header = list(rows[0].keys()) if rows else _header(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"{path}: {exc}") from exc
    if key is not None and key not in header:
        raise LabelsError(f"{path}: no column {key!r}")
    key = key or next((k for k in KEYS if k in header), None)
    if key is None:
        raise LabelsError(f"{path}: no key column; one of {', '.join(KEYS)} is needed")
    side = next((c for c in header if _folded(c) in _SIDE_COLUMNS), None) if sided else None
    if sided and side is None:
        raise LabelsError(f"{path}: eyes and breasts are labelled with a Laterality column (R, L)")
    wanted = {_folded(n): n for n in model_labels}
    names = tuple(wanted[_folded(c)] for c in header if _folded(c) in wanted)
    columns = {wanted[_folded(c)]: c for c in header if _folded(c) in wanted}
    subgroups = tuple(c for c in header if c not in (key, side) and _folded(c) not in wanted)
    values: dict[str, dict[str, int | None]] = {}
    groups: dict[str, dict[str, str]] = {}
    repeated = []
    for line, row in enumerate(rows, start=2):
        unit = (row.get(key) or "").strip()
        if not unit:
            raise LabelsError(f"{path}:{line}: no {key}")
        if side is not None:
            unit = f"{unit}/{_side(row.get(side), path, line)}"
        if unit in values:
            repeated.append(unit)
            continue
        values[unit] = {name: _value(row.get(columns[name]), path, line, name) for name in names}
        groups[unit] = {c: (row.get(c) or "").strip() for c in subgroups}
    calls = _PRESENT | _ABSENT
    label_like = tuple(
        c
        for c in subgroups
        if any(g[c] for g in groups.values())
        and all(not g[c] or g[c].casefold() in calls for g in groups.values())
    )
    return Labels(key, names, subgroups, values, groups, tuple(repeated), label_like)


def _side(text: str | None, path: Path, line: int) -> str:
    folded = (text or "").strip().casefold()
    if folded in ("r", "right"):
        return "R"
    if folded in ("l", "left"):
        return "L"
    raise LabelsError(f"{path}:{line}: Laterality is {text!r}; R or L expected")


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as stream:
        return next(csv.reader(stream), [])


def _folded(name: str) -> str:
    return " ".join(name.split()).casefold()


def _value(text: str | None, path: Path, line: int, name: str) -> int | None:
    folded = (text or "").strip().casefold()
    if not folded:
        return None
    if folded in _PRESENT:
        return 1
    if folded in _ABSENT:
        return 0
    raise LabelsError(f"{path}:{line}: {name} is {text!r}; 1, 0 or empty (unknown) expected")


def match(labels: Labels, units: Iterable[str], model_labels: Sequence[str]) -> Matching:
    """Which units (keys of the images, in the labels' key) are labelled, and what does
    not match either way."""
    seen = list(dict.fromkeys(units))
    have = set(seen)
    return Matching(
        matched=[u for u in seen if u in labels.values],
        unlabelled=[u for u in seen if u not in labels.values],
        missing=[u for u in labels.values if u not in have],
        unknown_columns=list(labels.label_like),
        absent_labels=[n for n in model_labels if n not in labels.names],
    )
