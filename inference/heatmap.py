"""Where a model saw each positive finding, as a DICOM Parametric Map a viewer overlays.

The class activation map of a finding, scaled from its lowest cell (0) to its highest
(1) and kept from half its peak up, is resampled onto the pixels of the image it was
computed from (:func:`inference.geometry.on_image`) and stored as a Parametric Map
(PS3.3 A.75) of 32-bit floats, one frame with the rows and columns of the source: OHIF's
``cornerstone-dicom-pmap`` draws it only at the source's size, and only from float data
(it misreads 16-bit integers). Each frame names its source image in the Derivation Image
Sequence (Spatial Locations Preserved: YES), which is how viewers match a map to its
image. A projection radiograph has no patient coordinate system, yet the IOD requires a
Frame of Reference and plane position and orientation: such a map gets a Frame of
Reference of its own, derived from the source image, with the image plane at the origin
and the source's pixel spacing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.geometry import Placement, on_image
from inference.report import Finding, derived_uid, report_source
from models.manifest import Manifest

SERIES_NUMBER = 9002
SHOWN_FROM = 0.5  # of a map's peak: less is stored as 0
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID")
# Body parts that are not paired (PS3.16 Annex L): their images need no laterality.
_UNPAIRED = frozenset({"CHEST", "ABDOMEN", "PELVIS", "HEAD", "NECK", "HEART", "SKULL"})


@dataclass(frozen=True)
class Heatmap:
    """One finding's activation map on its source image."""

    finding: Finding
    values: np.ndarray  # float32, the source image's rows x columns


def heatmaps(
    manifest: Manifest,
    outputs: Mapping[str, np.ndarray],
    found: Sequence[Finding],
    placement: Placement | None,
) -> list[Heatmap]:
    """The maps of the manifest's ``parametric_maps`` most probable positive findings
    whose map has a place that stands out (a flat map shows nothing); none when the
    input's place on the image is not known."""
    if not manifest.parametric_maps or placement is None:
        return []
    spec = next((o for o in manifest.outputs if o.kind == "map"), None)
    if spec is None:
        return []
    maps = np.asarray(outputs[spec.name]).reshape(len(spec.labels), *spec.shape[2:])
    by_label = dict(zip(spec.labels, maps, strict=True))
    positive = sorted(
        (f for f in found if f.positive and f.label in by_label and np.ptp(by_label[f.label]) > 0),
        key=lambda f: f.probability,
        reverse=True,
    )
    chosen = positive[: manifest.parametric_maps]
    return [Heatmap(f, shown(by_label[f.label], placement, manifest)) for f in chosen]


def shown(activation: np.ndarray, placement: Placement, manifest: Manifest) -> np.ndarray:
    """A finding's map on the image as the fraction of the way from its lowest to its
    highest cell, and 0 below half of that: what a reader needs is where the evidence
    is, and a map whose every pixel is coloured (a class activation map is rarely near
    its floor anywhere) hides the image. The map must not be flat."""
    low, high = float(np.min(activation)), float(np.max(activation))
    scaled = (np.asarray(activation, dtype=np.float64) - low) / (high - low)
    values = on_image(scaled, placement, manifest.preprocessing)
    values[values < SHOWN_FROM] = 0.0
    return values


def map_uid(job: str, label: str) -> str:
    """A map's SOP Instance UID: the same for the same job and finding on every run, so
    that running a job again replaces its maps."""
    return derived_uid(job, "parametric map", label)


def series_uid(StudyInstanceUID: str, manifest: Manifest) -> str:
    """The series of a model's maps in a study: one per study and model, as its reports."""
    return derived_uid(StudyInstanceUID, manifest.name, "maps")


def map_uids(manifest: Manifest, job: str) -> list[str]:
    """Every map UID a job of this model can have: those not made by a run are stale."""
    spec = next((o for o in manifest.outputs if o.kind == "map"), None)
    return [] if spec is None else [map_uid(job, label) for label in spec.labels]


def parametric_map(
    manifest: Manifest,
    source: Dataset,
    heatmap: Heatmap,
    *,
    job: str,
    instance_number: int,
    device_uid: str,
) -> hd.pm.ParametricMap:
    """The Parametric Map of one finding on ``source`` (its header)."""
    header = _with_geometry(report_source(source))
    label = heatmap.finding.label
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="CAM",
        lut_explanation=f"{label} evidence, fraction of peak"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    suffix = "" if manifest.clinical_use else " - NOT FOR CLINICAL USE"
    with warnings.catch_warnings():
        # The patient's name as the source has it, even when highdicom finds its form
        # unlikely (a single component): the map is about the same patient.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended")
        pm = hd.pm.ParametricMap(
            [header],
            heatmap.values,
            series_instance_uid=series_uid(str(header.StudyInstanceUID), manifest),
            series_number=SERIES_NUMBER,
            sop_instance_uid=map_uid(job, label),
            instance_number=instance_number,
            manufacturer="filmless",
            manufacturer_model_name=manifest.name[:64],
            software_versions=manifest.version,
            device_serial_number=device_uid[:64],
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_label="HEATMAP",
            content_description=f"{label} {heatmap.finding.probability:.3f}"[:64],
            content_qualification=(
                hd.ContentQualificationValues.PRODUCT
                if manifest.clinical_use
                else hd.ContentQualificationValues.RESEARCH
            ),
            series_description=f"AI heatmaps {manifest.name}{suffix}"[:64],
        )
    # General Series: the map shows the same part of the body as its source. Laterality
    # is required unless the part is unpaired (PS3.3 C.7.3.1, PS3.16 Annex L): the
    # source's, else empty (unknown).
    body = str(source.get("BodyPartExamined") or "").strip().upper()
    if body:
        pm.BodyPartExamined = body
    side = str(source.get("Laterality") or source.get("ImageLaterality") or "").strip()
    if side in ("R", "L"):
        pm.Laterality = side
    elif body not in _UNPAIRED:
        pm.Laterality = None
    # A de-identified source that does not say how (PS3.3 C.7.1.1: the method is then
    # required) passes the fact on without inventing a method.
    if pm.get("PatientIdentityRemoved") == "YES" and not (
        "DeidentificationMethod" in pm or "DeidentificationMethodCodeSequence" in pm
    ):
        pm.DeidentificationMethod = "not stated by the source image"
    return pm


def _with_geometry(header: Dataset) -> Dataset:
    """The source header with what the Parametric Map's functional groups are made of;
    a projection image gets its own Frame of Reference (see the module's docstring)."""
    if any(keyword not in header for keyword in _GEOMETRY):
        header.FrameOfReferenceUID = derived_uid(str(header.SOPInstanceUID), "frame of reference")
        header.ImagePositionPatient = [0.0, 0.0, 0.0]
        header.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    if "PixelSpacing" not in header:
        spacing = header.get("ImagerPixelSpacing") or header.get("NominalScannedPixelSpacing")
        header.PixelSpacing = list(spacing) if spacing else [1.0, 1.0]
    if "SliceThickness" not in header:
        header.SliceThickness = 1.0
    return header
