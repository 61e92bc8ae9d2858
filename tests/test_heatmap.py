"""Heatmaps as DICOM Parametric Maps (PS3.3 A.75): on the source's pixels, valid objects.

The sources are pydicom's own test files (several vendors and modalities, with and
without a Frame of Reference) as well as the synthetic radiographs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.geometry import Placement
from inference.heatmap import heatmaps, map_uid, map_uids, parametric_map
from inference.report import findings
from models.manifest import Manifest
from models.zoo import CHEST_XRAY
from scripts.synthetic_corpus import Patient, Rng, chest_dx
from tests.support import dciodvfy
from tests.support.zoo import manifest_of

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FOREIGN = ["693_J2KI.dcm", "CT_small.dcm", "JPEG-lossy.dcm", "MR_small.dcm"]
PATIENT = Patient("PM1", "Heat^Map", "ISO_IR 192", "19600101", "F")


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return manifest_of(CHEST_XRAY)


def _outputs(manifest: Manifest, probabilities: list[float]) -> dict[str, np.ndarray]:
    """Scores as given, and for label i a map whose hottest cell is (i % 7, 6 - i % 7)."""
    maps = np.zeros((1, len(probabilities), 7, 7), np.float32)
    for index in range(len(probabilities)):
        maps[0, index, index % 7, 6 - index % 7] = 1.0
    return {
        "probabilities": np.asarray([probabilities], np.float32),
        "activation_maps": maps,
    }


def test_the_most_probable_positive_findings_are_mapped_each_where_its_evidence_is(
    manifest: Manifest,
) -> None:
    labels = len(manifest.outputs[0].labels)
    probabilities = [0.1] * labels
    probabilities[2], probabilities[5], probabilities[9], probabilities[11] = 0.7, 0.95, 0.8, 0.6
    outputs = _outputs(manifest, probabilities)
    placement = Placement(rows=500, columns=410, top=45, left=0, height=410, width=410)
    made = heatmaps(manifest, outputs, findings(manifest, outputs), placement)
    # At most the manifest's number (3), the most probable first, none negative.
    assert [m.finding.probability for m in made] == pytest.approx([0.95, 0.8, 0.7])
    for heatmap in made:
        index = manifest.outputs[0].labels.index(heatmap.finding.label)
        assert heatmap.values.shape == (500, 410)
        assert heatmap.values.dtype == np.float32
        row, column = np.unravel_index(int(np.argmax(heatmap.values)), heatmap.values.shape)
        # The cell's centre on the image: 410/7 image pixels a cell, below the crop's top.
        cell = 410 / 7
        assert row == pytest.approx(45 + (index % 7 + 0.5) * cell, abs=cell / 2)
        assert column == pytest.approx((6 - index % 7 + 0.5) * cell, abs=cell / 2)
        # Nothing above or below the centre crop: the model did not see it.
        assert not heatmap.values[:45].any()
        assert not heatmap.values[455:].any()
    # No place on the image, or no maps wanted: none.
    assert heatmaps(manifest, outputs, findings(manifest, outputs), None) == []
    unmapped = manifest.model_copy(update={"parametric_maps": 0})
    assert heatmaps(unmapped, outputs, findings(unmapped, outputs), placement) == []


def test_map_uids_are_stable_per_job_and_finding(manifest: Manifest) -> None:
    assert map_uid("job/1", "Effusion") == map_uid("job/1", "Effusion")
    assert map_uid("job/1", "Effusion") != map_uid("job/2", "Effusion")
    every = map_uids(manifest, "job/1")
    assert len(set(every)) == len(manifest.outputs[0].labels)
    assert map_uid("job/1", "Effusion") in every


def _sources() -> list[Dataset]:
    synthetic = chest_dx(Rng(5), PATIENT, 0.1, "20260301", "PM")[0]
    foreign = [pydicom.dcmread(FILES / name, stop_before_pixels=True) for name in FOREIGN]
    return [synthetic, *foreign]


@pytest.mark.parametrize("index", range(len(FOREIGN) + 1))
def test_a_map_is_a_valid_parametric_map_on_the_source_pixels(
    manifest: Manifest, index: int, tmp_path: Path
) -> None:
    """PS3.3 A.75: the map has the source's rows and columns, float values with their
    real world value mapping, and names its source in the Derivation Image Sequence;
    dciodvfy finds no error, with or without a Frame of Reference in the source."""
    source = _sources()[index]
    rows, columns = int(source.Rows), int(source.Columns)
    placement = Placement.of_header(rows, columns, manifest.preprocessing)
    assert placement is not None
    outputs = _outputs(manifest, [0.9] + [0.0] * (len(manifest.outputs[0].labels) - 1))
    (heatmap,) = heatmaps(manifest, outputs, findings(manifest, outputs), placement)
    pm = parametric_map(
        manifest, source, heatmap, job="job/pm", instance_number=1, device_uid="2.25.42"
    )
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (rows, columns, 1)
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    assert pm.SeriesInstanceUID != source.SeriesInstanceUID
    values = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(rows, columns)
    assert np.array_equal(values, heatmap.values)
    frame = pm.PerFrameFunctionalGroupsSequence[0]
    derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derived.SpatialLocationsPreserved == "YES"
    shared = pm.SharedFunctionalGroupsSequence[0]
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.LUTExplanation.startswith(heatmap.finding.label)
    if "FrameOfReferenceUID" in source:
        assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools not installed")
    errors = dciodvfy.errors(pm, tmp_path / "pm.dcm")
    assert errors == [], "\n".join(errors)


def test_a_map_is_kept_from_half_its_peak_up(manifest: Manifest) -> None:
    """Scaled from the map's lowest cell (0) to its highest (1): below 0.5 is 0, so that
    a viewer colours where the evidence is and leaves the rest of the image as it is."""
    placement = Placement(rows=224, columns=224, top=0, left=0, height=224, width=224)
    activation = np.full((7, 7), 0.6, np.float32)
    activation[3, 3] = 0.9  # the peak, 0.3 above a floor of 0.6
    activation[3, 4] = 0.78  # 0.6 of the way up
    outputs = {
        "probabilities": np.asarray([[0.9] + [0.0] * 17], np.float32),
        "activation_maps": np.broadcast_to(activation, (1, 18, 7, 7)).copy(),
    }
    (heatmap,) = heatmaps(manifest, outputs, findings(manifest, outputs), placement)
    values = heatmap.values
    # At the cells' centres (half a pixel off: within 1/64 of a cell of them).
    assert values[3 * 32 + 16, 3 * 32 + 16] == pytest.approx(1.0, abs=0.03)  # the peak
    assert values[3 * 32 + 16, 4 * 32 + 16] == pytest.approx(0.6, abs=0.03)
    assert values[0, 0] == 0.0
    assert values[200, 30] == 0.0
    assert float(values[values > 0].min()) >= 0.5
    # A flat map has no place that stands out: no map is made of it.
    outputs["activation_maps"][:] = 0.4
    assert heatmaps(manifest, outputs, findings(manifest, outputs), placement) == []
