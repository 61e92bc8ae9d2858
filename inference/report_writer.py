"""Reports of one model, encoded from pieces that highdicom builds once.

:func:`inference.report.build_report` makes a ~5,000-element pydicom tree per report,
and building and encoding it costs several times the inference it reports on. The
content of every report of a model is made of the same few kinds of pieces: a group per
finding (positive with a region, positive, negative), the exam summary with its calls,
and the content around them. :class:`ReportWriter` asks highdicom for each kind once,
with placeholder values, keeps it encoded with holes (:mod:`inference.fragments`), and
fills in UIDs, probabilities and regions per report. The document around the content
(patient, study, evidence, flags) is still made by highdicom for every report. The
bytes are those of ``build_report`` encoded by pydicom, which the tests check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import DigitalXRayImageStorageForPresentation
from pydicom.valuerep import DS

from inference.fragments import Fragments, assemble, compile_dataset, placeholder_key
from inference.geometry import Box, Placement
from inference.readings import Reading
from inference.report import (
    Constant,
    Finding,
    call,
    derived_uid,
    document,
    drawn_first,
    finding_group,
    findings,
    reading_group,
    reading_uid,
    regions,
    report_source,
    summary_calls,
    summary_group,
    summary_identifier,
    whole_image,
)
from models.manifest import Manifest

CONTENT = Tag("ContentSequence")
# Placeholders: valid values that no report contains.
_TRACKING = "2.25.100000000000000000000000000000000001"
_PROBABILITY = 0.271828
_BOX = Box(top=10.5, left=20.25, bottom=30.75, right=40.125)
_MARKER_UID = "2.25.100000000000000000000000000000000002"
_MARKER_UID_2 = "2.25.100000000000000000000000000000000003"
_MARKER_TEXT = "SPLICE TRACKING IDENTIFIER"


def _instance_uid(n: int) -> str:
    return f"2.25.1000000000000000000000000000000{n:05d}1"


@dataclass(frozen=True)
class EncodedReport:
    """A report as an explicit VR little endian data set, ready for the archive."""

    data: bytes
    SOPClassUID: str
    SOPInstanceUID: str


class ReportWriter:
    """Reports of one model by one device; safe to share between worker threads."""

    def __init__(self, manifest: Manifest, device_uid: str, series_number: int = 9001) -> None:
        self.constant = Constant.of(manifest, device_uid)
        self.series_number = series_number
        self._pieces: dict[tuple[Any, ...], Fragments] = {}
        self._lock = threading.Lock()

    def write(
        self,
        sources: Sequence[Dataset],
        outputs: Mapping[str, np.ndarray] | Sequence[Finding],
        *,
        job: str,
        readings: Sequence[Reading] = (),
        placements: Sequence[Placement | None] | None = None,
        evidence: Sequence[Dataset] = (),
        ungradable: Sequence[str] = (),
    ) -> EncodedReport:
        """The report :func:`~inference.report.build_report` makes of the same arguments."""
        manifest = self.constant.manifest
        sources = [report_source(s) for s in sources]
        found = findings(manifest, outputs) if isinstance(outputs, Mapping) else list(outputs)
        located = (
            regions(manifest, outputs, sources, found, placements)
            if isinstance(outputs, Mapping)
            else {}
        )
        for source in sources:  # highdicom's checks of a source image, as build_report has
            hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
        shell = document(
            self.constant, sources, job=job, series_number=self.series_number, evidence=evidence
        )
        del shell.ContentSequence
        # Text in the content (labels, names) is encoded as the document declares.
        charset = tuple(convert_encodings(shell.get("SpecificCharacterSet") or "ISO_IR 6"))
        references = _references(sources)
        classes = tuple(str(s.SOPClassUID) for s in sources)
        # An eye's or a breast's group is one of a kind per report: encoded as it is.
        drawn: list[bytes] = []
        listed: list[bytes] = []
        for reading in readings:
            tree = reading_group(self.constant, reading, reading_uid(job, reading))[0]
            body = assemble(compile_dataset(tree, {}, (), list(charset)), {})
            (drawn if reading.box is not None else listed).append(body)
        for finding in drawn_first(found, located):
            box = located.get(finding.label) if finding.positive else None
            values: dict[str, Any] = dict(references)
            values["tracking"] = derived_uid(job, finding.output, finding.label)
            probability = round(finding.probability, 6)
            values["numeric"] = DS(probability, auto_format=True)
            values["float"] = probability
            if box is not None:
                values["graphic"] = box.polyline().flatten().tolist()
            group = self._group(finding, classes, box is not None, charset)
            (drawn if box is not None else listed).append(assemble(group, values))
        calls = summary_calls(
            found, gated=manifest.quality is not None, task=manifest.task, ungradable=ungradable
        )
        summary_values = {
            **references,
            "tracking": derived_uid(job, "summary"),
            "graphic": whole_image(sources[0]).polyline().flatten().tolist(),
        }
        identifier = hd.sr.TrackingIdentifier(uid=_TRACKING, identifier=summary_identifier(calls))
        summary_spliced = {
            "evaluations": [
                assemble(self._call(name, value, charset), {}) for name, value in calls
            ],
            "identifier": [assemble(compile_dataset(identifier[0], {}, (), list(charset)), {})],
        }
        drawn.append(assemble(self._summary(classes, charset), summary_values, summary_spliced))
        content = assemble(
            self._content(charset, bool(listed)), {}, {"groups": drawn, "listed": listed}
        )
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        pending = True
        for element in shell:
            if pending and element.tag > CONTENT:
                fp.write(content)
                pending = False
            write_data_element(fp, element, list(charset))
        if pending:
            fp.write(content)
        return EncodedReport(fp.getvalue(), str(shell.SOPClassUID), str(shell.SOPInstanceUID))

    def _compiled(self, key: tuple[Any, ...], make: Callable[[], Fragments]) -> Fragments:
        with self._lock:
            if key not in self._pieces:
                self._pieces[key] = make()
            return self._pieces[key]

    def _group(
        self, finding: Finding, classes: tuple[str, ...], boxed: bool, charset: tuple[str, ...]
    ) -> Fragments:
        """The group of one finding, by its label and call and the SOP Classes of its
        sources (highdicom words a region on a multi-frame image differently), with its
        values as holes."""

        def make() -> Fragments:
            # The placeholder probability with a threshold that makes the same call.
            threshold = {None: None, True: _PROBABILITY, False: 1.0}[finding.positive]
            stand_in = Finding(finding.output, finding.label, _PROBABILITY, threshold)
            group = finding_group(
                self.constant,
                stand_in,
                _stand_in_sources(classes),
                _TRACKING,
                _BOX if boxed else None,
            )
            return compile_dataset(group[0], _holes(len(classes), boxed), (), list(charset))

        key = ("finding", finding.output, finding.label, finding.positive, classes, boxed, charset)
        return self._compiled(key, make)

    def _summary(self, classes: tuple[str, ...], charset: tuple[str, ...]) -> Fragments:
        """The exam summary on the first image, its calls and its tracking identifier
        (the reading in words) spliced in where highdicom puts them."""

        def make() -> Fragments:
            marker = _marker_call()
            group = summary_group(
                self.constant,
                _stand_in_sources(classes),
                _TRACKING,
                [marker],
                identifier=_MARKER_TEXT,
                box=_BOX,
            )
            holes = _holes(len(classes), True)
            splices = [
                (_equal_to(marker[0]), "evaluations"),
                (lambda item: item.get("TextValue") == _MARKER_TEXT, "identifier"),
            ]
            return compile_dataset(group[0], holes, splices, list(charset))

        return self._compiled(("summary", classes, charset), make)

    def _call(self, name: str, value: str | Code | None, charset: tuple[str, ...]) -> Fragments:
        """One call of the summary (a CODE item), the same in every report."""

        def make() -> Fragments:
            return compile_dataset(call(name, value)[0], {}, (), list(charset))

        return self._compiled(("call", name, value, charset), make)

    def _content(self, charset: tuple[str, ...], listed: bool) -> Fragments:
        """The root's content: observer context, procedure, the Imaging Measurements
        container, into which the drawn groups are spliced, and, when some groups have
        no region, the Qualitative Evaluations container that holds them."""

        def make() -> Fragments:
            stand_in = _stand_in_sources((DigitalXRayImageStorageForPresentation,))
            marker = summary_group(
                self.constant, stand_in, _MARKER_UID, [], identifier="-", box=_BOX
            )
            groups: list[Any] = [marker]
            splices = [(_equal_to(marker[0]), "groups")]
            if listed:
                other = finding_group(
                    self.constant, Finding("-", "-", 0.0, None), stand_in, _MARKER_UID_2, None
                )
                groups.append(other)
                splices.append((_equal_to(other[0]), "listed"))
            holder = Dataset()
            holder.ContentSequence = self.constant.report(groups)
            return compile_dataset(holder, {}, splices, list(charset))

        return self._compiled(("content", charset, listed), make)


def _stand_in_sources(classes: Sequence[str]) -> list[Dataset]:
    sources = []
    for index, sop_class in enumerate(classes):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, _instance_uid(index)
        ds.Modality, ds.Rows, ds.Columns = "OT", 1, 1  # what highdicom checks of an image
        sources.append(ds)
    return sources


def _holes(sources: int, boxed: bool) -> dict[tuple[str, Any], str]:
    holes = {
        placeholder_key("UI", _TRACKING): "tracking",
        placeholder_key("DS", _PROBABILITY): "numeric",  # NumericValue
        placeholder_key("FD", _PROBABILITY): "float",  # FloatingPointValue
    }
    for index in range(sources):
        holes[placeholder_key("UI", _instance_uid(index))] = f"instance{index}"
    if boxed:
        holes[placeholder_key("FL", _BOX.polyline().flatten().tolist())] = "graphic"
    return holes


def _references(sources: Sequence[Dataset]) -> dict[str, str]:
    values = {}
    for index, source in enumerate(sources):
        values[f"instance{index}"] = str(source.SOPInstanceUID)
    return values


def _equal_to(marker: Dataset) -> Callable[[Dataset], bool]:
    """highdicom copies what it is given, so a marker is found by value."""
    return lambda item: bool(item == marker)


def _marker_call() -> hd.sr.QualitativeEvaluation:
    concept = hd.sr.CodedConcept(value="SPLICE", scheme_designator="99SPLICE", meaning="splice")
    return hd.sr.QualitativeEvaluation(name=concept, value=concept)


def encoded(sr: Dataset) -> EncodedReport:
    """A report that highdicom built whole (the rare kinds, such as "not assessable"),
    encoded as the writer encodes its reports."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, sr)
    return EncodedReport(fp.getvalue(), str(sr.SOPClassUID), str(sr.SOPInstanceUID))
