"""A model's outputs as a DICOM Structured Report: TID 1500, Comprehensive 3D SR, highdicom.

One measurement group per finding: its probability as a numeric measurement, the call
at the model's operating point as a qualitative evaluation (present / absent), the
source images, a tracking identifier, and the algorithm (name, version, weights sha256,
clinical use). The observer is the device (this server running that model). UIDs are
derived from the job, so running the job again replaces the report instead of adding a
second one.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from inference.geometry import Box, peak_box, to_image
from models.manifest import Manifest

SCHEME = "99FILMLESS"  # private coding scheme for labels that have no standard code
NOT_CLINICAL = "NOT FOR CLINICAL USE"
Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
_ROOT = uuid.UUID("6f0b5c36-9a51-4e8a-9a8f-0b8f3c1d2e4a")


# Type 2 attributes of the modules highdicom copies from the first source into a report
# (Patient, General Study): present in the report, empty when the source lacks them.
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


class UnreportableSource(ValueError):
    """A source image lacks what a report must name (a Type 1 attribute)."""


def report_source(source: Dataset) -> Dataset:
    """The header a report is made from: the source's, with what modalities get wrong
    made into what the SR IOD allows, so that a report is never lost to it.

    Type 2 attributes the source lacks are written empty; values whose form the SR
    cannot carry are made to fit: PatientSex "male" is M (anything else unknown is
    empty), several values in a single-valued name or ID keep the first, a date or time
    that is not one is left empty, and an unknown Specific Character Set leaves the
    report in UTF-8 (the values were read with the default repertoire). The source in
    the archive is not touched.
    """
    ds = Dataset()
    for element in source:  # a shallow copy: the pixel data is not in a header anyway
        ds.add(element)
    for keyword in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        if not str(ds.get(keyword) or "").strip():
            raise UnreportableSource(f"the source image has no {keyword}; no report can name it")
    for keyword in _TYPE_2:
        value = ds.get(keyword)
        if value is None:
            setattr(ds, keyword, "")
        elif isinstance(value, MultiValue):
            setattr(ds, keyword, value[0] if len(value) else "")
    sex = str(ds.get("PatientSex") or "").strip().upper()
    ds.PatientSex = _SEX.get(sex, "")
    for keyword, form in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        text = str(ds.get(keyword) or "").strip()
        if text:
            try:
                form(text)
            except ValueError:
                setattr(ds, keyword, "")
    charset = ds.get("SpecificCharacterSet")
    if charset is not None and not _known_charset(charset):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _known_charset(value: object) -> bool:
    values = [str(v) for v in value] if isinstance(value, MultiValue | list) else [str(value)]
    for term in values:
        try:
            hd.enum.SpecificCharacterSetValues(term or "ISO 2022 IR 6")
        except ValueError:
            return False
    return True


def derived_uid(*parts: str) -> str:
    """A stable UID (2.25 root, PS3.5 B.2) for the same job parts, different otherwise."""
    return f"2.25.{uuid.uuid5(_ROOT, '/'.join(parts)).int}"


@dataclass(frozen=True)
class Finding:
    output: str
    label: str
    probability: float
    threshold: float | None

    @property
    def positive(self) -> bool | None:
        return None if self.threshold is None else self.probability >= self.threshold


def findings(manifest: Manifest, outputs: Mapping[str, np.ndarray]) -> list[Finding]:
    """Each output value with the operating point that applies to it (if any)."""
    points = {(p.output, p.label): p.threshold for p in manifest.operating_points}
    found = []
    for spec in manifest.outputs:
        if spec.kind == "map":
            continue
        values = np.asarray(outputs[spec.name], dtype=np.float64).reshape(-1)
        for label, value in zip(spec.labels, values, strict=True):
            found.append(Finding(spec.name, label, float(value), points.get((spec.name, label))))
    return found


def regions(
    manifest: Manifest, outputs: Mapping[str, np.ndarray], sources: Sequence[Dataset]
) -> dict[str, Box]:
    """Per label, the image region of its activation map's peak (one source image, and
    only where the preprocessing can be inverted from the header)."""
    if len(sources) != 1:
        return {}
    image = sources[0]
    found = {}
    for spec in manifest.outputs:
        if spec.kind != "map":
            continue
        maps = np.asarray(outputs[spec.name]).reshape(len(spec.labels), *spec.shape[2:])
        for label, activation in zip(spec.labels, maps, strict=True):
            tensor_box = peak_box(activation, manifest.preprocessing.size)
            box = to_image(tensor_box, int(image.Rows), int(image.Columns), manifest.preprocessing)
            if box is not None:
                found[label] = box
    return found


def drawn_first(found: Sequence[Finding], located: Mapping[str, Box]) -> list[Finding]:
    """The findings in the order their groups are written: those with an image region
    first. Viewers open a report at its first measurement: OHIF shows a black viewport
    when that one has no region to draw, even if later ones do."""
    boxed = [f for f in found if f.positive and f.label in located]
    return boxed + [f for f in found if f not in boxed]


# The summary call of a model with a quality gate that the image passed: gradable.
IMAGE_QUALITY = "Image Quality"


def summary(found: Sequence[Finding], *, gated: bool = False) -> list[hd.sr.QualitativeEvaluation]:
    """The exam-level reading as SR content (see :func:`summary_calls`)."""
    return [call(name, value) for name, value in summary_calls(found, gated=gated)]


def summary_calls(found: Sequence[Finding], *, gated: bool = False) -> list[tuple[str, str | None]]:
    """The exam-level reading: the image quality when the model has a gate (the images
    passed it: "Usable - Meets the quality control standard", what a fundus programme
    calls gradable), each positive call (label, None for "present"), and the most
    probable category of every output whose labels are exclusive (output, label: ICDR
    grade, breast density)."""
    calls: list[tuple[str, str | None]] = [(IMAGE_QUALITY, None)] if gated else []
    calls += [(f.label, None) for f in found if f.positive]
    by_output: dict[str, list[Finding]] = {}
    for f in found:
        if f.threshold is None:
            by_output.setdefault(f.output, []).append(f)
    for output, members in by_output.items():
        if len(members) > 1:
            best = max(members, key=lambda f: f.probability)
            calls.append((output, best.label))
    return calls


def call(name: str, value: str | None) -> hd.sr.QualitativeEvaluation:
    """One call of the summary: ``name`` is present, or its category is ``value``; the
    image quality in DCM codes (111101, 111237)."""
    if name == IMAGE_QUALITY:
        return hd.sr.QualitativeEvaluation(
            name=codes.DCM.ImageQuality, value=codes.DCM.UsableMeetsTheQualityControlStandard
        )
    return hd.sr.QualitativeEvaluation(
        name=_concept(name), value=codes.SCT.Present if value is None else _concept(value)
    )


def _concept(text: str) -> hd.sr.CodedConcept:
    value = "".join(c if c.isalnum() else "-" for c in text.upper())[:16]
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=text[:64])


def build_report(
    manifest: Manifest,
    sources: Sequence[Dataset],
    outputs: Mapping[str, np.ndarray] | Sequence[Finding],
    *,
    job: str,
    device_uid: str,
    series_number: int = 9001,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one job; ``sources`` are the headers of the images it read.

    ``outputs`` are the model's outputs by name, or findings already derived from them
    (an exam-level aggregation).
    """
    sources = [report_source(s) for s in sources]
    found = findings(manifest, outputs) if isinstance(outputs, Mapping) else list(outputs)
    located = regions(manifest, outputs, sources) if isinstance(outputs, Mapping) else {}
    constant = Constant.of(manifest, device_uid)
    groups: list[Group] = [
        finding_group(
            constant,
            finding,
            sources,
            derived_uid(job, finding.output, finding.label),
            located.get(finding.label) if finding.positive else None,
        )
        for finding in drawn_first(found, located)
    ]
    gated = manifest.quality is not None
    calls = summary(found, gated=gated)
    groups.append(summary_group(constant, sources, derived_uid(job, "summary"), calls))
    sr = document(constant, sources, job=job, series_number=series_number)
    sr.ContentSequence = constant.report(groups)[0].ContentSequence
    return sr


@dataclass(frozen=True)
class Constant:
    """What every report of one model written by one device shares."""

    manifest: Manifest
    algorithm: hd.sr.AlgorithmIdentification
    context: hd.sr.ObservationContext
    procedure: hd.sr.CodedConcept
    root: Dataset  # the root container's attributes, without its content

    @classmethod
    def of(cls, manifest: Manifest, device_uid: str) -> Constant:
        algorithm = hd.sr.AlgorithmIdentification(
            name=manifest.name,
            version=manifest.version,
            parameters=[
                f"weights sha256 {manifest.weights.sha256}",
                "cleared for clinical use" if manifest.clinical_use else NOT_CLINICAL,
                f"variant {manifest.variant}",
            ],
        )
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name="filmless",
                manufacturer_name="filmless",
                model_name=manifest.name[:64],
            ),
        )
        context = hd.sr.ObservationContext(observer_device_context=observer)
        procedure = _concept(f"{manifest.task} screening")
        # TID 1500 wants a group; the root's own attributes do not depend on it.
        placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("root"), identifier="-"),
            finding_type=procedure,
        )
        tree = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=procedure,
            imaging_measurements=[placeholder],
        )
        root = Dataset()
        for element in tree[0]:
            if element.keyword != "ContentSequence":
                root.add(element)
        return cls(manifest, algorithm, context, procedure, root)

    def report(self, groups: Sequence[Group]) -> hd.sr.MeasurementReport:
        """The TID 1500 content tree around ``groups``."""
        return hd.sr.MeasurementReport(
            observation_context=self.context,
            procedure_reported=self.procedure,
            imaging_measurements=groups,
        )


def finding_group(
    constant: Constant,
    finding: Finding,
    sources: Sequence[Dataset],
    tracking_uid: str,
    box: Box | None,
) -> Group:
    """TID 1501 for a finding; TID 1410 (with the region viewers draw) when it has a box."""
    evaluations = []
    if finding.positive is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.Finding,
                value=codes.SCT.Present if finding.positive else codes.SCT.Absent,
            )
        )
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{finding.label}"[:64]
        ),
        "finding_type": _concept(finding.label),
        "algorithm_id": constant.algorithm,
        "measurements": [
            hd.sr.Measurement(
                name=_concept(f"{finding.label} probability"),
                value=round(finding.probability, 6),
                unit=codes.UCUM.NoUnits,
            )
        ],
        "qualitative_evaluations": evaluations or None,
    }
    if box is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=_source_images(sources), **common
        )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box.polyline(),
        source_image=hd.sr.SourceImageForRegion.from_source_image(sources[0]),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def summary_group(
    constant: Constant,
    sources: Sequence[Dataset],
    tracking_uid: str,
    evaluations: Sequence[hd.sr.QualitativeEvaluation],
) -> Group:
    """The exam-level reading, after the groups of the findings."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="exam summary"),
        finding_type=_concept(f"{constant.manifest.task} summary"),
        algorithm_id=constant.algorithm,
        source_images=_source_images(sources),
        qualitative_evaluations=list(evaluations) or None,
    )


def quality_group(
    constant: Constant,
    sources: Sequence[Dataset],
    tracking_uid: str,
    measured: Sequence[tuple[str, float]],
    missed: Sequence[str],
) -> Group:
    """TID 1501 for an image the model could not read: Image Quality (DCM 111101) is
    "Unusable - Quality renders image unusable" (DCM 111235), each measure of the gate
    as a number, and each measure outside its limit named. No finding is reported, so
    nothing can be read as negative."""
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=codes.DCM.ImageQuality, value=codes.DCM.UnusableQualityRendersImageUnusable
        )
    ]
    evaluations += [
        hd.sr.QualitativeEvaluation(name=_concept(name), value=_concept("outside its limit"))
        for name in missed
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="image quality"),
        finding_type=codes.DCM.ImageQuality,
        algorithm_id=constant.algorithm,
        source_images=_source_images(sources),
        measurements=[
            hd.sr.Measurement(
                name=_concept(name), value=float(f"{value:.6g}"), unit=codes.UCUM.NoUnits
            )
            for name, value in measured
        ],
        qualitative_evaluations=evaluations,
    )


def not_assessable_report(
    manifest: Manifest,
    sources: Sequence[Dataset],
    measured: Sequence[tuple[str, float]],
    missed: Sequence[str],
    *,
    job: str,
    device_uid: str,
    series_number: int = 9001,
) -> hd.sr.Comprehensive3DSR:
    """The SR for a job whose image failed the quality gate: the same document as a
    result (so a re-run with a better image replaces it), with only the quality group."""
    sources = [report_source(s) for s in sources]
    constant = Constant.of(manifest, device_uid)
    group = quality_group(constant, sources, derived_uid(job, "quality"), measured, missed)
    sr = document(constant, sources, job=job, series_number=series_number)
    sr.ContentSequence = constant.report([group])[0].ContentSequence
    return sr


def document(
    constant: Constant, sources: Sequence[Dataset], *, job: str, series_number: int
) -> hd.sr.Comprehensive3DSR:
    """The SR document around an empty content tree: patient, study, series, evidence,
    flags and the root container's attributes; the caller gives it its content.

    highdicom's document constructor deep-copies and re-parses the whole content tree it
    is given, which for 19 groups costs several times the inference itself, so it is given
    only the root container.
    """
    manifest = constant.manifest
    root = copy.deepcopy(constant.root)
    root.ContentSequence = []
    first = sources[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=root,
        specific_character_set=_character_set(first),
        series_instance_uid=derived_uid(first.StudyInstanceUID, manifest.name, "series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(job, "report"),
        instance_number=1,
        manufacturer="filmless",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=(
            f"AI {manifest.task} {manifest.name}"
            + ("" if manifest.clinical_use else " - NOT FOR CLINICAL USE")
        )[:64],
    )
    # PS3.3 C.12.1.1.2: a private coding scheme is declared in the object that uses it.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "filmless screening labels"
    scheme.CodingSchemeResponsibleOrganization = "filmless"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _character_set(source: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set, an empty first value (the default repertoire
    with code extensions, PS3.3 C.12.1.1.2) spelt "ISO 2022 IR 6", which highdicom wants."""
    value = source.get("SpecificCharacterSet")
    if isinstance(value, str) or value is None:
        return value or None
    values = [str(v) for v in value]
    if values and not values[0]:
        values[0] = "ISO 2022 IR 6"
    return values


def _source_images(sources: Sequence[Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources]
