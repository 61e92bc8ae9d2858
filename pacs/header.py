"""Read the attributes the index keeps from a staged file, without touching pixel data.

The data set is first walked for structural soundness (every length inside the file).
For Explicit VR Little Endian the walk also collects the header's elements, which become
DICOM JSON straight from their bytes; pydicom parses the header (up to the pixel data,
large values deferred) only for other encodings or for an element that needs it. The
cost of indexing a 20 MB mammogram is the cost of its header. Values are kept as the
text the modality sent (DICOM keywords as names); only person names get an extra
normalised form for case- and accent-insensitive matching.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from pacs.attributes import collected_json, dataset_json, pack
from pacs.errors import InvalidInstance, SOPClassMismatch
from pacs.inflate import inflated
from pacs.part10 import FileMeta
from pacs.stored import read_staged
from pacs.structure import Elements, check_structure, collect_header
from pacs.uids import require_uid

# Values longer than this stay on disk while the header is parsed.
_DEFER_SIZE = 4096
# Largest data set taken, after inflation (max_instance_bytes).
MAX_INSTANCE_BYTES = 4 << 30


@dataclass(frozen=True, slots=True)
class PatientAttributes:
    PatientID: str
    IssuerOfPatientID: str
    PatientName: str
    PatientBirthDate: str
    PatientSex: str


@dataclass(frozen=True, slots=True)
class StudyAttributes:
    StudyInstanceUID: str
    StudyDate: str
    StudyTime: str
    AccessionNumber: str
    StudyID: str
    StudyDescription: str
    ReferringPhysicianName: str
    TimezoneOffsetFromUTC: str


@dataclass(frozen=True, slots=True)
class SeriesAttributes:
    SeriesInstanceUID: str
    Modality: str
    SeriesNumber: int | None
    SeriesDescription: str
    BodyPartExamined: str
    Laterality: str
    PerformedProcedureStepStartDate: str
    PerformedProcedureStepStartTime: str
    ScheduledProcedureStepID: str
    RequestedProcedureID: str


@dataclass(frozen=True, slots=True)
class InstanceAttributes:
    SOPClassUID: str
    SOPInstanceUID: str
    InstanceNumber: int | None
    Rows: int | None
    Columns: int | None
    BitsAllocated: int | None
    NumberOfFrames: int | None
    ContentDate: str
    ContentTime: str
    ImageType: str
    ViewPosition: str
    ImageLaterality: str
    PresentationIntentType: str
    PhotometricInterpretation: str
    SpecificCharacterSet: str


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    patient: PatientAttributes
    study: StudyAttributes
    series: SeriesAttributes
    instance: InstanceAttributes
    # Every attribute of the header as packed DICOM JSON (pacs.attributes), for the keys
    # the index has no column for.
    attributes: bytes = b""


def normalise_name(name: str) -> str:
    """Lower case, accents removed, component separators as spaces: the fuzzy-match form."""
    decomposed = unicodedata.normalize("NFKD", name)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.replace("^", " ").replace("=", " ").casefold().split())


def read_header(
    path: Path, data_set_offset: int, meta: FileMeta, *, max_bytes: int = MAX_INSTANCE_BYTES
) -> InstanceHeader:
    """Validate the staged file at ``path`` and extract what the index stores.

    The identity the data set carries is returned as it is; whether it must equal the
    one announced for it (``meta``) is the caller's decision. A deflated data set is
    inflated to a file beside ``path`` (at most ``max_bytes``) and read from there.
    """
    syntax = UID(meta.TransferSyntaxUID)
    if not syntax.is_transfer_syntax:
        raise InvalidInstance(f"transfer syntax {meta.TransferSyntaxUID} is not supported")
    if meta.MediaStorageSOPClassUID == MediaStorageDirectoryStorage:
        raise InvalidInstance(
            "a DICOMDIR (Media Storage Directory) indexes files; it is not an instance "
            "to archive: store the files it lists"
        )
    if syntax == DeflatedExplicitVRLittleEndian:
        with inflated(path, data_set_offset, meta, path.parent, max_bytes) as (copy, offset):
            elements = collect_header(copy, offset, defer_size=_DEFER_SIZE)
            return _parse(copy, offset, ExplicitVRLittleEndian, elements)
    elements = _check_encoding(path, data_set_offset, syntax)
    return _parse(path, data_set_offset, syntax, elements)


def _parse(path: Path, offset: int, syntax: UID, elements: Elements | None) -> InstanceHeader:
    try:
        if elements is None:
            attributes = dataset_json(
                read_staged(path, offset, syntax, defer_size=_DEFER_SIZE), None
            )
        else:
            attributes = collected_json(
                elements,
                lambda: read_staged(
                    path, offset, syntax, defer_size=_DEFER_SIZE, elements=elements
                ),
            )
        header = _extract(attributes)
    except (InvalidInstance, SOPClassMismatch):
        raise
    except (Exception, RecursionError) as exc:  # pydicom raises many types on bad input
        raise InvalidInstance(f"data set cannot be parsed: {exc}") from exc
    return header


def _check_encoding(path: Path, offset: int, syntax: UID) -> Elements | None:
    """The length-checked walk, and for Explicit VR Little Endian the header's elements
    found on the way; when it fails, name the real cause if the data set is sound in
    the other VR encoding (a writer that declared the wrong transfer syntax)."""
    explicit = not syntax.is_implicit_VR
    try:
        if explicit and syntax.is_little_endian:
            return collect_header(path, offset, defer_size=_DEFER_SIZE)
        check_structure(path, offset, explicit=explicit, little=syntax.is_little_endian)
        return None
    except InvalidInstance as exc:
        try:
            check_structure(path, offset, explicit=not explicit, little=syntax.is_little_endian)
        except InvalidInstance:
            raise exc from None
        declared, actual = ("explicit", "implicit") if explicit else ("implicit", "explicit")
        raise InvalidInstance(
            f"the data set is encoded with {actual} VR, but its transfer syntax "
            f"{syntax.name or syntax} says {declared} VR"
        ) from None


def _extract(attributes: dict[str, Any]) -> InstanceHeader:
    """What the index keeps, read from the header's DICOM JSON: the values the index
    matches are those that queries return for unindexed keys, converted once."""
    request = _first_item(attributes, "RequestAttributesSequence")

    def text(keyword: str) -> str:
        return _text(attributes, keyword)

    def integer(keyword: str) -> int | None:
        return _integer(attributes, keyword)

    return InstanceHeader(
        attributes=pack(attributes),
        patient=PatientAttributes(
            PatientID=text("PatientID"),
            IssuerOfPatientID=text("IssuerOfPatientID"),
            PatientName=text("PatientName"),
            PatientBirthDate=text("PatientBirthDate"),
            PatientSex=text("PatientSex"),
        ),
        study=StudyAttributes(
            StudyInstanceUID=require_uid(text("StudyInstanceUID"), "StudyInstanceUID"),
            StudyDate=text("StudyDate"),
            StudyTime=text("StudyTime"),
            AccessionNumber=text("AccessionNumber"),
            StudyID=text("StudyID"),
            StudyDescription=text("StudyDescription"),
            ReferringPhysicianName=text("ReferringPhysicianName"),
            TimezoneOffsetFromUTC=text("TimezoneOffsetFromUTC"),
        ),
        series=SeriesAttributes(
            SeriesInstanceUID=require_uid(text("SeriesInstanceUID"), "SeriesInstanceUID"),
            Modality=text("Modality"),
            SeriesNumber=integer("SeriesNumber"),
            SeriesDescription=text("SeriesDescription"),
            BodyPartExamined=text("BodyPartExamined"),
            Laterality=text("Laterality"),
            PerformedProcedureStepStartDate=text("PerformedProcedureStepStartDate"),
            PerformedProcedureStepStartTime=text("PerformedProcedureStepStartTime"),
            ScheduledProcedureStepID=_text(request, "ScheduledProcedureStepID"),
            RequestedProcedureID=_text(request, "RequestedProcedureID"),
        ),
        instance=InstanceAttributes(
            SOPClassUID=require_uid(text("SOPClassUID"), "SOPClassUID"),
            SOPInstanceUID=require_uid(text("SOPInstanceUID"), "SOPInstanceUID"),
            InstanceNumber=integer("InstanceNumber"),
            Rows=integer("Rows"),
            Columns=integer("Columns"),
            BitsAllocated=integer("BitsAllocated"),
            NumberOfFrames=integer("NumberOfFrames"),
            ContentDate=text("ContentDate"),
            ContentTime=text("ContentTime"),
            ImageType=text("ImageType"),
            ViewPosition=text("ViewPosition"),
            ImageLaterality=text("ImageLaterality"),
            PresentationIntentType=text("PresentationIntentType"),
            PhotometricInterpretation=text("PhotometricInterpretation"),
            SpecificCharacterSet=text("SpecificCharacterSet"),
        ),
    )


@cache
def _key(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


def _values(attributes: Mapping[str, Any] | None, keyword: str) -> list[Any]:
    if attributes is None:
        return []
    element = attributes.get(_key(keyword))
    found = None if element is None else element.get("Value")
    return found if isinstance(found, list) else []


def _first_item(attributes: Mapping[str, Any], keyword: str) -> Mapping[str, Any] | None:
    items = _values(attributes, keyword)
    return items[0] if items and isinstance(items[0], dict) else None


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # PN (F.2.2): its component groups, "=" between them
        groups = [value.get(group) for group in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and groups[-1] is None:
            groups.pop()
        return "=".join(group or "" for group in groups)
    return str(value)


def _text(attributes: Mapping[str, Any] | None, keyword: str) -> str:
    """An attribute as text: multiple values joined by backslash, empty when absent."""
    values = _values(attributes, keyword)
    if not values:
        return ""
    if len(values) == 1:
        return _as_text(values[0]).strip("\x00 ")
    return "\\".join(_as_text(v).strip() for v in values)


def _integer(attributes: Mapping[str, Any], keyword: str) -> int | None:
    """IS/US values as int; an unreadable number is left out rather than failing the store."""
    values = _values(attributes, keyword)
    if not values or values[0] is None or values[0] == "":
        return None
    try:
        return int(values[0])
    except (TypeError, ValueError):
        return None
