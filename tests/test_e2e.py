"""The whole server as deployed: storescu in, screening, SRs found by C-FIND and QIDO-RS,
each probability equal to an independent reference; and the same after ``kill -9``."""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, generate_uid

from models.manifest import Manifest
from models.store import ModelStore
from models.zoo import CHEST_XRAY, FUNDUS, MAMMOGRAPHY
from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from scripts.synthetic_corpus import Patient, Rng, chest_dx, encode, fundus_op, mammography
from tests.support import reference
from tests.support.dcmtk import storescu
from tests.support.scu import find
from tests.support.server import Server
from tests.support.web import parts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
    pytest.mark.timeout(900),
]

PATIENT = Patient("E2E", "Screening^Patient", "ISO_IR 192", "19600101", "F")
MODEL_FOR_MODALITY = {"DX": CHEST_XRAY.name, "OP": FUNDUS.name, "MG": MAMMOGRAPHY.name}
TOLERANCE = 1e-4
WAIT_SECONDS = 300


@pytest.fixture(scope="module")
def models_dir(demo_models: Path) -> Path:
    return demo_models


@pytest.fixture(scope="module")
def manifests(models_dir: Path) -> dict[str, Manifest]:
    return {m.manifest.name: m.manifest for m in ModelStore(models_dir).installed()}


def _server(data_dir: Path, models_dir: Path) -> Server:
    return Server(
        data_dir,
        FILMLESS_MODELS_DIR=str(models_dir),
        FILMLESS_STUDY_STABLE_SECONDS="2",
        FILMLESS_INFERENCE_MAX_WAIT_MS="20",
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    running = _server(tmp_path_factory.mktemp("e2e") / "data", models_dir)
    running.start()
    try:
        yield running
    finally:
        status = running.stop()
        assert status == 0, running.output.decode(errors="replace")[-3000:]


def _write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _reports(url: str, study: str) -> list[tuple[str, str]]:
    """(series, instance) of every SR in the study, by QIDO-RS."""
    found = []
    for series in httpx.get(f"{url}/studies/{study}/series", params={"Modality": "SR"}).json():
        series_uid = series["0020000E"]["Value"][0]
        listed = httpx.get(f"{url}/studies/{study}/series/{series_uid}/instances").json()
        found += [(series_uid, i["00080018"]["Value"][0]) for i in listed]
    return found


def _wait_for_reports(url: str, wanted: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """Poll QIDO-RS until each study has its number of SRs (bounded in time)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = {study: _reports(url, study) for study in wanted}
        if all(len(found[s]) >= n for s, n in wanted.items()) or time.monotonic() > deadline:
            assert {s: len(r) for s, r in found.items()} == wanted
            return found
        time.sleep(0.5)


def _c_find_reports(port: int, study: str) -> set[str]:
    """SR series of the study, by C-FIND at SERIES level."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study
    query.Modality = "SR"
    query.SeriesInstanceUID = ""
    return {str(identifier.SeriesInstanceUID) for identifier in find(port, query)}


def _retrieve(url: str, study: str, series: str, instance: str) -> Dataset:
    response = httpx.get(
        f"{url}/studies/{study}/series/{series}/instances/{instance}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 200, response.text
    ((_, body),) = parts(response)
    return reference.read(body)


def _check(
    sr: Dataset, sent: dict[str, Dataset], manifests: dict[str, Manifest]
) -> dict[str, float]:
    """The report's probabilities equal the reference of the images it references."""
    evidence = [
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    # The images read; the rest of the evidence is what the job made of them (heatmaps).
    sources = [sent[uid] for uid in evidence if uid in sent]
    manifest = manifests[MODEL_FOR_MODALITY[sources[0].Modality]]
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    got, wanted = reference.reported(sr), reference.expected(manifest, sources)
    assert set(got) == set(wanted)
    worst = max(abs(got[k] - wanted[k]) for k in wanted)
    assert worst <= TOLERANCE, (manifest.name, evidence, worst)
    # Per eye and per breast: the same numbers, named as the viewer shows them.
    read, due = reference.reported_readings(sr), reference.expected_readings(manifest, sources)
    assert {side: set(v) for side, v in read.items()} == {side: set(v) for side, v in due.items()}
    for side, numbers in due.items():
        for name, value in numbers.items():
            assert abs(read[side][name] - value) <= TOLERANCE, (manifest.name, side, name)
    return got


def _as_stored(paths: list[Path]) -> dict[str, Dataset]:
    """What was sent, read back from the files (what pydicom decodes is the reference)."""
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}


def test_cxr_fundus_and_mammography_are_screened(
    server: Server, manifests: dict[str, Manifest], tmp_path: Path
) -> None:
    cxr = chest_dx(Rng(31), PATIENT, 0.1, "20260301", "E2E1")  # PA and lateral
    fundus = fundus_op(Rng(32), PATIENT, 0.12, "20260301", "E2E2")
    fundus[1] = encode(fundus[1], JPEGBaseline8Bit)  # YBR JPEG, as cameras send them
    mammo = mammography(Rng(33), PATIENT, 0.15, "20260301", "E2E3")
    paths = _write([*cxr, *fundus, *mammo], tmp_path / "send")
    storescu(server.port, paths)
    studies = {
        cxr[0].StudyInstanceUID: 1,  # the lateral view is skipped, with the reason
        fundus[0].StudyInstanceUID: 1,  # one exam-level report over both eyes
        mammo[0].StudyInstanceUID: 1,  # one exam-level report over the four views
    }
    found = _wait_for_reports(server.url, studies)
    sent = _as_stored(paths)
    for study, reports in found.items():
        assert _c_find_reports(server.port, study) == {series for series, _ in reports}
        for series, instance in reports:
            got = _check(_retrieve(server.url, study, series, instance), sent, manifests)
            if study == mammo[0].StudyInstanceUID:
                assert {"malignancy L", "malignancy R", "malignancy exam"} <= set(got)


def _parity_variants() -> list[Dataset]:
    """One frontal chest X-ray in each representation the pipeline must read alike."""
    (base, _lateral) = chest_dx(Rng(41), PATIENT, 0.1, "20260302", "PAR")
    stored = base.pixel_array.astype(np.int64)  # 12 bits, window 2048/4096

    def variant(**changes: object) -> Dataset:
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        return ds

    mono1 = variant(PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="INVERSE")
    mono1.PixelData = (4095 - stored).astype(np.uint16).tobytes()
    bits16 = variant(BitsStored=16, HighBit=15, WindowCenter=30000, WindowWidth=50000)
    bits16.PixelData = (stored * 16 + 7).astype(np.uint16).tobytes()
    rescaled = variant(RescaleSlope=0.5, RescaleIntercept=-100, WindowCenter=900, WindowWidth=1800)
    lut = variant()
    del lut.WindowCenter, lut.WindowWidth
    curve = np.sqrt(np.arange(4096) / 4095.0) * 65535
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", curve.astype("<u2").tobytes())
    lut.VOILUTSequence = [item]
    lut_rescaled = copy.deepcopy(lut)
    lut_rescaled.SOPInstanceUID = generate_uid()
    lut_rescaled.RescaleIntercept = -500  # the LUT takes modality values: clipped below 0
    jpeg = encode(variant(), JPEGLosslessSV1)
    mono1_jpeg = encode(copy.deepcopy(mono1), JPEGLosslessSV1)
    mono1_jpeg.SOPInstanceUID = generate_uid()
    return [base, mono1, bits16, rescaled, lut, lut_rescaled, jpeg, mono1_jpeg]


def test_parity_across_pixel_representations(
    server: Server, manifests: dict[str, Manifest], tmp_path: Path
) -> None:
    variants = _parity_variants()
    paths = _write(variants, tmp_path / "variants")
    storescu(server.port, paths)
    study = variants[0].StudyInstanceUID
    (reports,) = _wait_for_reports(server.url, {study: len(variants)}).values()
    sent = _as_stored(paths)
    results = [_check(_retrieve(server.url, study, *r), sent, manifests) for r in reports]
    # The variants are different images to the model, not one answer repeated.
    assert len({round(r["Atelectasis"], 6) for r in results}) > 1


def test_nothing_lost_after_kill_9_mid_batch(
    tmp_path: Path, models_dir: Path, manifests: dict[str, Manifest]
) -> None:
    datasets = []
    for n in range(8):
        frontal, _ = chest_dx(Rng(50 + n), PATIENT, 0.1, "20260303", f"K{n}")
        datasets.append(frontal)
    datasets += fundus_op(Rng(60), PATIENT, 0.12, "20260303", "KF")
    paths = _write(datasets, tmp_path / "batch")
    data_dir = tmp_path / "data"
    server = _server(data_dir, models_dir)
    server.start()
    try:
        storescu(server.port, paths)  # every instance acknowledged with Success
        index = Index(f"sqlite:///{data_dir / 'index.sqlite'}")
        queue = JobQueue(index)
        deadline = time.monotonic() + WAIT_SECONDS
        states: list[JobState] = []
        while time.monotonic() < deadline:
            states = [j.state for j in queue.jobs()]
            if JobState.DONE in states and any(s != JobState.DONE for s in states):
                break
            time.sleep(0.02)
        server.kill()
    except BaseException:
        server.kill()
        raise
    assert JobState.DONE in states, states
    assert any(s != JobState.DONE for s in states), states
    stored = {r.SOPInstanceUID for r in index.instances()}
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= stored
    server.start()
    try:
        wanted = {datasets[n].StudyInstanceUID: 1 for n in range(8)}
        wanted[datasets[8].StudyInstanceUID] = 1  # the fundus exam
        found = _wait_for_reports(server.url, wanted)
        sent = _as_stored(paths)
        for study, reports in found.items():
            for series, instance in reports:
                _check(_retrieve(server.url, study, series, instance), sent, manifests)
        jobs = queue.jobs()
        assert len(jobs) == len(datasets) - 1  # one job per radiograph, one for the exam
        assert all(j.state == JobState.DONE for j in jobs), [(j.state, j.reason) for j in jobs]
        assert len({j.result for j in jobs}) == len(jobs)
    finally:
        assert server.stop() == 0, server.output.decode(errors="replace")[-3000:]
        index.dispose()


def test_kill_9_right_after_success_still_makes_the_jobs(tmp_path: Path, models_dir: Path) -> None:
    """The whole server is killed (every process) as soon as the peer has its Success:
    the screening jobs come from the change log once the server is back, once each,
    whether or not the scheduler had run before the kill."""
    datasets = [chest_dx(Rng(80 + n), PATIENT, 0.1, "20260404", f"J{n}")[0] for n in range(3)]
    paths = _write(datasets, tmp_path / "sent")
    data_dir = tmp_path / "data"
    server = Server(data_dir, FILMLESS_MODELS_DIR=str(models_dir), FILMLESS_INFERENCE_WORKERS="0")
    server.start()
    try:
        storescu(server.port, paths)  # every instance acknowledged with Success
    finally:
        server.kill(whole_group=True)
    index = Index(f"sqlite:///{data_dir / 'index.sqlite'}")
    queue = JobQueue(index)
    before = len(queue.jobs())  # 0 when the kill came first, else what was made
    server.start()
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(queue.jobs()) < len(datasets) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert server.stop() == 0, server.output.decode(errors="replace")[-3000:]
    jobs = queue.jobs()
    index.dispose()
    assert sorted(j.SOPInstanceUID for j in jobs) == sorted(
        str(ds.SOPInstanceUID) for ds in datasets
    ), before
    assert {j.state for j in jobs} == {JobState.PENDING}
