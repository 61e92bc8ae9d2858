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
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from inference.geometry import Box, Placement, to_image
from inference.readings import Reading
from models.codes import DENSITY, NEGATIVE, RECALL, SCHEME, coded, concept
from models.manifest import Manifest

NOT_CLINICAL = "NOT FOR CLINICAL USE"
Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
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
    manifest: Manifest,
    outputs: Mapping[str, np.ndarray],
    sources: Sequence[Dataset],
    found: Sequence[Finding],
    placements: Sequence[Placement | None] | None = None,
) -> dict[str, Box]:
    """Per positive label, the image region of its activation map's peak (one source
    image, where the preprocessing can be inverted). Each positive finding gets its own
    cell, the most probable first, so that no two are drawn (and labelled) on top of
    each other."""
    if len(sources) != 1:
        return {}
    image = sources[0]
    p = manifest.preprocessing
    placement = (
        placements[0] if placements else Placement.of_header(int(image.Rows), int(image.Columns), p)
    )
    positive = sorted((f for f in found if f.positive), key=lambda f: f.probability, reverse=True)
    located: dict[str, Box] = {}
    taken: set[tuple[int, int]] = set()
    for spec in manifest.outputs:
        if spec.kind != "map":
            continue
        maps = np.asarray(outputs[spec.name]).reshape(len(spec.labels), *spec.shape[2:])
        by_label = dict(zip(spec.labels, maps, strict=True))
        for finding in positive:
            activation = by_label.get(finding.label)
            if activation is None or finding.label in located:
                continue
            cell = _free_peak(activation, taken)
            if cell is None:
                continue
            taken.add(cell)
            box = to_image(_cell_box(cell, activation.shape, p.size), placement, p)
            if box is not None:
                located[finding.label] = box
    return located


def _free_peak(activation: np.ndarray, taken: set[tuple[int, int]]) -> tuple[int, int] | None:
    """The highest cell of a (rows, columns) map that no other finding has taken."""
    for index in np.argsort(-activation, axis=None, kind="stable"):
        row, column = np.unravel_index(int(index), activation.shape)
        if (int(row), int(column)) not in taken:
            return int(row), int(column)
    return None


def _cell_box(cell: tuple[int, int], cells: tuple[int, ...], size: tuple[int, int]) -> Box:
    """A map cell in tensor pixels."""
    height, width = size[0] / cells[0], size[1] / cells[1]
    row, column = cell
    return Box(row * height, column * width, (row + 1) * height, (column + 1) * width)


def drawn_first(found: Sequence[Finding], located: Mapping[str, Box]) -> list[Finding]:
    """The findings in the order their groups are written: those with an image region
    first. Viewers open a report at its first measurement: OHIF shows a black viewport
    when that one has no region to draw, even if later ones do."""
    boxed = [f for f in found if f.positive and f.label in located]
    return boxed + [f for f in found if f not in boxed]


# The summary call of a model with a quality gate that the image passed: gradable.
IMAGE_QUALITY = "Image Quality"


Call = tuple[str, str | Code | None]


def summary_calls(
    found: Sequence[Finding],
    *,
    gated: bool = False,
    task: str = "",
    ungradable: Sequence[str] = (),
) -> list[Call]:
    """The exam-level reading: the image quality when the model has a gate (the images
    passed it: "Usable - Meets the quality control standard", what a fundus programme
    calls gradable; "Unusable" when an eye is ``ungradable``), each positive call
    (label, None for "present"), the most probable category of every output whose
    labels are exclusive (output, label: ICDR grade, breast density), and the exam's
    call: a chest radiograph abnormal when any finding is positive, a mammogram's
    highest assessment category, a fundus exam (diabetic retinopathy or glaucoma)
    referable when either eye is, else ungradable when an eye is, else not referable."""
    quality = codes.DCM.UnusableQualityRendersImageUnusable if ungradable else None
    calls: list[Call] = [(IMAGE_QUALITY, quality)] if gated else []
    calls += [(f.label, None) for f in found if f.positive]
    by_output: dict[str, list[Finding]] = {}
    for f in found:
        if f.threshold is None:
            by_output.setdefault(f.output, []).append(f)
    for output, members in by_output.items():
        if len(members) > 1:
            best = max(members, key=lambda f: f.probability)
            calls.append(_category_call(output, best.label))
    if task == "chest-xray":
        calls.append(("Finding", "Abnormal" if any(f.positive for f in found) else "Normal"))
    exam = next((f for f in found if f.label == "malignancy exam"), None)
    if task == "mammography" and exam is not None:
        calls.append(("Assessment Category", RECALL if exam.positive else NEGATIVE))
    if task in ("fundus", "glaucoma"):
        if any(f.positive for f in found):
            outcome = "Referable"
        elif ungradable:
            outcome = f"Ungradable {' and '.join(ungradable)}"
        else:
            outcome = "Not referable"
        calls.append(("Finding", outcome))
    return calls


def _category_call(output: str, label: str) -> Call:
    """An exclusive category by its name in reports: breast composition in SCT (CID
    6000), the ICDR grade by name."""
    if output == "density":
        letter = label.removeprefix("density ")
        return "Breast composition", DENSITY.get(letter, label)
    if output == "grade_probabilities":
        return "ICDR grade", label
    return output, label


def call(name: str, value: str | Code | None) -> hd.sr.QualitativeEvaluation:
    """One call of the summary: ``name`` is present, or its category is ``value``; the
    image quality in DCM codes (111101; 111237 usable unless ``value`` says otherwise)."""
    if name == IMAGE_QUALITY:
        usable = codes.DCM.UsableMeetsTheQualityControlStandard
        quality = value if isinstance(value, Code) else usable
        return hd.sr.QualitativeEvaluation(name=codes.DCM.ImageQuality, value=quality)
    if value is None:
        return hd.sr.QualitativeEvaluation(name=concept(name), value=codes.SCT.Present)
    shown = coded(value) if isinstance(value, Code) else concept(value)
    return hd.sr.QualitativeEvaluation(name=concept(name), value=shown)


def build_report(
    manifest: Manifest,
    sources: Sequence[Dataset],
    outputs: Mapping[str, np.ndarray] | Sequence[Finding],
    *,
    job: str,
    device_uid: str,
    series_number: int = 9001,
    readings: Sequence[Reading] = (),
    placements: Sequence[Placement | None] | None = None,
    evidence: Sequence[Dataset] = (),
    ungradable: Sequence[str] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR for one job; ``sources`` are the headers of the images it read.

    ``outputs`` are the model's outputs by name, or findings already derived from them
    (an exam-level aggregation). ``readings`` (per eye, per breast) come first, drawn on
    their images; ``placements`` say where the input tensor lay on each source image;
    ``evidence`` are other objects the job made (its heatmaps), which the report lists;
    ``ungradable`` names the eyes of a fundus exam that could not be graded.
    """
    sources = [report_source(s) for s in sources]
    found = findings(manifest, outputs) if isinstance(outputs, Mapping) else list(outputs)
    located = (
        regions(manifest, outputs, sources, found, placements)
        if isinstance(outputs, Mapping)
        else {}
    )
    constant = Constant.of(manifest, device_uid)
    groups: list[Group] = [
        reading_group(constant, reading, reading_uid(job, reading)) for reading in readings
    ]
    groups += [
        finding_group(
            constant,
            finding,
            sources,
            derived_uid(job, finding.output, finding.label),
            located.get(finding.label) if finding.positive else None,
        )
        for finding in drawn_first(found, located)
    ]
    calls = summary_calls(
        found, gated=manifest.quality is not None, task=manifest.task, ungradable=ungradable
    )
    groups.append(
        summary_group(
            constant,
            sources,
            derived_uid(job, "summary"),
            [call(name, value) for name, value in calls],
            identifier=summary_identifier(calls),
            box=whole_image(sources[0]),
        )
    )
    sr = document(constant, sources, job=job, series_number=series_number, evidence=evidence)
    sr.ContentSequence = constant.report(groups)
    return sr


def reading_uid(job: str, reading: Reading) -> str:
    """The tracking UID of an eye's or a breast's group: the same on every run."""
    return derived_uid(job, "reading", reading.identifier.split(":")[0])


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
        procedure = concept(f"{manifest.task} screening")
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

    def report(self, groups: Sequence[Group]) -> list[Dataset]:
        """The root's content (TID 1500) around ``groups``: those with an image region in
        Imaging Measurements (126010, DCM), the others in Qualitative Evaluations
        (C0034375, UMLS).

        Viewers draw the groups of Imaging Measurements, and OHIF (3.13 at least) stops
        reading a report at the first one there that it cannot draw; what has no place on
        an image (a negative finding, a probability without a map) is kept out of its
        way, whole, in the other container TID 1500 has for evaluations.
        """
        drawn: list[Group] = []
        listed: list[Group] = []
        for group in groups:  # by kind: comparing groups would compare whole trees
            planar = isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
            (drawn if planar else listed).append(group)
        content = list(
            hd.sr.MeasurementReport(
                observation_context=self.context,
                procedure_reported=self.procedure,
                imaging_measurements=drawn,
            )[0].ContentSequence
        )
        if listed:
            container = hd.sr.ContainerContentItem(
                name=QUALITATIVE_EVALUATIONS,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            container.ContentSequence = hd.sr.ContentSequence(
                [item for group in listed for item in group]
            )
            content.append(container)
        return content


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
        "finding_type": concept(finding.label),
        "algorithm_id": constant.algorithm,
        "measurements": [
            hd.sr.Measurement(
                name=concept(f"{finding.label} probability"),
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


def reading_group(constant: Constant, reading: Reading, tracking_uid: str) -> Group:
    """TID 1501 for one eye or one breast, TID 1410 with the outline it is drawn as:
    the finding site (with laterality), the probabilities as numbers (what viewers
    print beside the outline) and the calls as coded evaluations."""
    site = hd.sr.FindingSite(
        anatomic_location=coded(reading.site),
        laterality=coded(reading.laterality) if reading.laterality is not None else None,
    )
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=reading.identifier[:64]
        ),
        "finding_type": concept(reading.finding),
        "algorithm_id": constant.algorithm,
        "finding_sites": [site],
        "measurements": [
            hd.sr.Measurement(name=concept(name), value=round(value, 6), unit=codes.UCUM.NoUnits)
            for name, value in reading.measurements
        ],
        "qualitative_evaluations": [call(name, value) for name, value in reading.evaluations],
    }
    source = report_source(reading.source)
    if reading.box is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=_source_images([source]), **common
        )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=reading.box.polyline(),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def summary_group(
    constant: Constant,
    sources: Sequence[Dataset],
    tracking_uid: str,
    evaluations: Sequence[hd.sr.QualitativeEvaluation],
    *,
    identifier: str,
    box: Box,
) -> Group:
    """The exam-level reading, after the groups of the findings: TID 1410 on the whole
    of the first image, so that every viewer that draws a report shows it, with the
    reading in words as its tracking identifier."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box.polyline(),
        source_image=hd.sr.SourceImageForRegion.from_source_image(sources[0]),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        referenced_region=region,
        finding_type=concept(f"{constant.manifest.task} summary"),
        algorithm_id=constant.algorithm,
        qualitative_evaluations=list(evaluations) or None,
    )


def summary_identifier(calls: Sequence[Call]) -> str:
    """The exam's reading in words (at most 64 characters, the tracking identifier's
    limit): the exam call first ("Abnormal", "Negative"), then the other calls in order,
    each a category ("ICDR grade 2") or a positive finding by name."""
    exam, words = [], []
    for name, value in calls:
        if name == IMAGE_QUALITY:
            continue
        if value is None:
            words.append(name)
            continue
        meaning = value.meaning if isinstance(value, Code) else value
        if name in ("Finding", "Assessment Category"):
            exam.append(meaning)
        else:
            words.append(f"{name} {meaning}")
    return _at_most_64("AI exam: " + (", ".join(exam + words) or "no finding"))


def _at_most_64(text: str) -> str:
    """A tracking identifier (TEXT, but LO-like: 64 characters at most, PS3.16 TID
    4108), cut with an ASCII mark that every character set has."""
    return text if len(text) <= 64 else text[:61] + "..."


def whole_image(source: Dataset) -> Box:
    """All of an image, edge to edge (PS3.3 C.18.6.1.2: (0, 0) is the top left corner of
    the top left pixel)."""
    return Box(0.0, 0.0, float(source.Rows), float(source.Columns))


def quality_group(
    constant: Constant,
    sources: Sequence[Dataset],
    tracking_uid: str,
    measured: Sequence[tuple[str, float]],
    missed: Sequence[str],
) -> Group:
    """TID 1410 on the whole of an image the model could not read: Image Quality (DCM
    111101) is "Unusable - Quality renders image unusable" (DCM 111235), each measure of
    the gate as a number, and each measure outside its limit named, also in the tracking
    identifier that viewers show. No finding is reported, so nothing can be read as
    negative."""
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=codes.DCM.ImageQuality, value=codes.DCM.UnusableQualityRendersImageUnusable
        )
    ]
    evaluations += [
        hd.sr.QualitativeEvaluation(name=concept(name), value=concept("outside its limit"))
        for name in missed
    ]
    identifier = "not assessable: " + ", ".join(missed)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=whole_image(sources[0]).polyline(),
        source_image=hd.sr.SourceImageForRegion.from_source_image(sources[0]),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid,
            identifier=_at_most_64(identifier),
        ),
        referenced_region=region,
        finding_type=codes.DCM.ImageQuality,
        algorithm_id=constant.algorithm,
        measurements=[
            hd.sr.Measurement(
                name=concept(name), value=float(f"{value:.6g}"), unit=codes.UCUM.NoUnits
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
    sr.ContentSequence = constant.report([group])
    return sr


def document(
    constant: Constant,
    sources: Sequence[Dataset],
    *,
    job: str,
    series_number: int,
    evidence: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR document around an empty content tree: patient, study, series, evidence,
    flags and the root container's attributes; the caller gives it its content.

    The evidence (Current Requested Procedure Evidence, PS3.3 C.17.2.3) is the images
    read and the other objects the job made from them, such as its Parametric Maps,
    which is how a reader of the report finds them.

    highdicom's document constructor deep-copies and re-parses the whole content tree it
    is given, which for 19 groups costs several times the inference itself, so it is given
    only the root container.
    """
    manifest = constant.manifest
    root = copy.deepcopy(constant.root)
    root.ContentSequence = []
    first = sources[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, *evidence],
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
