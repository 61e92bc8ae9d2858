"""Which model applies to which instance or study, from the rules in the manifests.

Pure functions over header values, so they are tested without files or sockets. The
values come from one place for the scheduler and the worker alike, the stored header as
DICOM JSON (:func:`stored_values`): a rule on any attribute (BodyPartExamined,
StationName) decides the same when an instance is queued and when its study is
screened. The first rule of a manifest (its Modality) says whether a model is concerned
at all; the others decide whether it runs or is skipped, and a skip carries the reason
(a lateral chest view, a FOR PROCESSING mammogram), so that it can be recorded instead
of the instance being silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from models.manifest import Manifest
from pacs.attributes import StoredValues, dataset_json, unpack
from pacs.header import InstanceHeader

Header = Mapping[str, str | None]


@dataclass(frozen=True)
class Decision:
    model: str
    runs: bool
    reason: str = ""


def stored_values(header: InstanceHeader | Dataset) -> StoredValues:
    """What routing reads: the indexed header's stored attributes, or a parsed header's."""
    if isinstance(header, Dataset):
        return StoredValues(dataset_json(header, None))
    return StoredValues(unpack(header.attributes))


# Where an attribute may also be found: the laterality of an image is ImageLaterality,
# or the series' Laterality when all its images show one side (PS3.3 C.7.3.1.1.1).
_FALLBACK = {"ImageLaterality": "Laterality"}


def _value(header: Header, keyword: str) -> str:
    value = header.get(keyword)
    text = "" if value is None else str(value).strip().upper()
    if not text and keyword in _FALLBACK:
        return _value(header, _FALLBACK[keyword])
    return text


def decide(
    header: Header, manifest: Manifest, *, without_view_position: bool = False
) -> Decision | None:
    """None when the model is not concerned (another modality); else run or skip, why.

    ``without_view_position``: an image-level model whose rules name ViewPosition runs on
    an image that has none (the ``screen_without_view_position`` setting).
    """
    rules = list(manifest.routing.match.items())
    if not rules:
        return Decision(manifest.name, runs=True)
    (first, accepted), others = rules[0], rules[1:]
    if _value(header, first) not in {v.upper() for v in accepted}:
        return None
    for keyword, values in others:
        value = _value(header, keyword)
        if (
            not value
            and keyword == "ViewPosition"
            and without_view_position
            and manifest.routing.level == "instance"
        ):
            continue
        if value not in {v.upper() for v in values}:
            shown = value or "absent"
            return Decision(
                manifest.name,
                runs=False,
                reason=f"{keyword} {shown} is not one of {', '.join(values)}",
            )
    return Decision(manifest.name, runs=True)


def route(
    header: Header, manifests: Iterable[Manifest], *, without_view_position: bool = False
) -> list[Decision]:
    """Decisions of every default model concerned by an instance."""
    decisions = []
    for manifest in manifests:
        if not manifest.default:
            continue
        decision = decide(header, manifest, without_view_position=without_view_position)
        if decision is not None:
            decisions.append(decision)
    return decisions


def view(header: Header) -> str:
    """``L-CC``-style name of a mammography view (ImageLaterality-ViewPosition)."""
    return f"{_value(header, 'ImageLaterality')}-{_value(header, 'ViewPosition')}"


def missing_views(headers: Iterable[Header], manifest: Manifest) -> list[str]:
    """Required views of a study-level model that none of the usable instances provides."""
    present = {view(h) for h in headers if (d := decide(h, manifest)) is not None and d.runs}
    return [v for v in manifest.routing.required_views if v not in present]
