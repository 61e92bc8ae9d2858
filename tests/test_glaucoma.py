"""Glaucoma beside diabetic retinopathy on the same fundus photographs.

Both models screen a fundus exam as their own jobs with their own reports (IHE AI
Results: one result object per algorithm, so a viewer lists each model's and a re-run of
one replaces only its own); each report's numbers equal the torch module's within 1e-4
(per eye, the photograph with the most referable evidence); each photograph is decoded
and preprocessed once for both, their preprocessing being the same; the glaucoma
reading is drawn on the optic disc.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit

from models.build import build_demo
from models.store import ModelStore
from models.zoo import FUNDUS, GLAUCOMA
from pacs.archive import Archive, Origin
from scripts.synthetic_corpus import Patient, Rng, encode, fundus_op
from tests.support import dciodvfy, reference
from tests.support.dcmtk import storescu
from tests.support.instances import part10, source
from tests.support.pipeline import drain, pipeline
from tests.support.server import Server
from tests.support.web import parts

pytestmark = pytest.mark.slow
PATIENT = Patient("GLAUC", "Glaucoma^Screen", "ISO_IR 192", "19560101", "F")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
OPTIC_DISC = "81016008"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def eye_models(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eye-models")
    shutil.copytree(demo_models / FUNDUS.name, root / FUNDUS.name)
    build_demo(root, GLAUCOMA)
    return root


def _reports(archive: Archive, study: str) -> dict[str, tuple[str, Dataset]]:
    """Each model's report in the study: model name -> (SOP Instance UID, data set)."""
    found: dict[str, tuple[str, Dataset]] = {}
    for record in archive.records(study):
        if record.SOPClassUID != COMPREHENSIVE_3D_SR:
            continue
        with archive.open(record) as stream:
            sr = pydicom.dcmread(stream)
        model = str(sr.SeriesDescription).split()[2]
        found[model] = (record.SOPInstanceUID, sr)
    return found


def _regions(sr: Dataset) -> list[tuple[str, list[float]]]:
    """(finding site code, SCOORD points) of each group that reads an eye."""
    found = []
    for container in sr.ContentSequence:
        for group in container.get("ContentSequence", []):
            items = group.get("ContentSequence", [])
            sites = [
                i.ConceptCodeSequence[0].CodeValue
                for i in items
                if i.ConceptNameCodeSequence[0].CodeValue == "363698007"
            ]
            points = [list(map(float, i.GraphicData)) for i in items if i.ValueType == "SCOORD"]
            if sites and points:
                found.append((sites[0], points[0]))
    return found


def test_both_eye_models_read_each_photograph_once_and_report_apart(
    archive: Archive, eye_models: Path, tmp_path: Path
) -> None:
    queue, worker = pipeline(archive, eye_models)
    photos = fundus_op(Rng(32), PATIENT, 0.12, "20260301", "GL1")
    for ds in photos:
        archive.ingest(source(ds), Origin.DIMSE)
    drain(worker)
    study = str(photos[0].StudyInstanceUID)
    reports = _reports(archive, study)
    assert set(reports) == {FUNDUS.name, GLAUCOMA.name}
    # One preparation per photograph, for the two models.
    assert worker.inputs.prepared == len(photos)
    manifests = {m.manifest.name: m.manifest for m in ModelStore(eye_models).installed()}
    stored = [reference.read(part10(ds)) for ds in photos]  # as pydicom decodes them
    for name, (_, sr) in reports.items():
        manifest = manifests[name]
        got, wanted = reference.reported(sr), reference.expected(manifest, stored)
        assert set(got) == set(wanted)
        assert max(abs(got[k] - wanted[k]) for k in wanted) <= TOLERANCE
        read = reference.reported_readings(sr)
        due = reference.expected_readings(manifest, stored)
        assert {side: set(v) for side, v in read.items()} == {s: set(v) for s, v in due.items()}
        for side, numbers in due.items():
            for number, value in numbers.items():
                assert abs(read[side][number] - value) <= TOLERANCE, (name, side, number)
    glaucoma = reports[GLAUCOMA.name][1]
    regions = _regions(glaucoma)
    assert [site for site, _ in regions] == [OPTIC_DISC, OPTIC_DISC]  # both eyes
    for (_, points), ds in zip(regions, photos, strict=True):
        rows = points[1::2]
        # About a seventh of the field across, inside the photograph.
        assert 0 < max(rows) - min(rows) < int(ds.Rows) / 4
    if shutil.which("dciodvfy"):
        assert dciodvfy.errors(glaucoma, tmp_path / "glaucoma.dcm") == []

    # Running one model again replaces its own report only.
    before = reports[FUNDUS.name][1]
    queue.enqueue(GLAUCOMA.name, study)
    drain(worker)
    after = _reports(archive, study)
    assert set(after) == set(reports)
    assert after[FUNDUS.name][1] == before
    assert after[GLAUCOMA.name][0] == reports[GLAUCOMA.name][0]


@pytest.mark.dcmtk
@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
@pytest.mark.timeout(900)
def test_a_fundus_pair_sent_to_the_running_server_gets_both_reports(
    eye_models: Path, tmp_path: Path
) -> None:
    """storescu in, two reports out (QIDO-RS, WADO-RS), each equal to its model's torch
    reference; one of the photographs JPEG baseline in YBR, as cameras send them."""
    photos = fundus_op(Rng(33), PATIENT, 0.12, "20260302", "GL2")
    photos[1] = encode(photos[1], JPEGBaseline8Bit)
    folder = tmp_path / "send"
    folder.mkdir()
    paths = []
    for ds in photos:
        paths.append(folder / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    server = Server(
        tmp_path / "data",
        FILMLESS_MODELS_DIR=str(eye_models),
        FILMLESS_STUDY_STABLE_SECONDS="2",
    )
    server.start()
    try:
        storescu(server.port, paths)
        study = str(photos[0].StudyInstanceUID)
        deadline = time.monotonic() + 300
        while len(found := _listed(server.url, study)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(found) == 2
        sent = [pydicom.dcmread(p) for p in paths]  # what pydicom decodes is the reference
        manifests = {m.manifest.name: m.manifest for m in ModelStore(eye_models).installed()}
        models = set()
        for series, instance in found:
            response = httpx.get(
                f"{server.url}/studies/{study}/series/{series}/instances/{instance}",
                headers={"Accept": 'multipart/related; type="application/dicom"'},
            )
            assert response.status_code == 200
            ((_, body),) = parts(response)
            sr = reference.read(body)
            manifest = manifests[str(sr.SeriesDescription).split()[2]]
            models.add(manifest.name)
            got, wanted = reference.reported(sr), reference.expected(manifest, sent)
            assert set(got) == set(wanted)
            assert max(abs(got[k] - wanted[k]) for k in wanted) <= TOLERANCE
        assert models == {FUNDUS.name, GLAUCOMA.name}
    finally:
        assert server.stop() == 0


def _listed(url: str, study: str) -> list[tuple[str, str]]:
    """(series, instance) of every SR in the study, by QIDO-RS."""
    found = []
    for series in httpx.get(f"{url}/studies/{study}/series", params={"Modality": "SR"}).json():
        uid = series["0020000E"]["Value"][0]
        listed = httpx.get(f"{url}/studies/{study}/series/{uid}/instances").json()
        found += [(uid, i["00080018"]["Value"][0]) for i in listed]
    return found
