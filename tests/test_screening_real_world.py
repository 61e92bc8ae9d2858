"""Screening on images as real modalities and anonymisers send them, through a running
``filmless serve``: every image gets its report, or a job that says why it has none.

A Type 2 attribute (PS3.3 C.7.1.1, C.7.2.1) may be absent or empty in the source: the
report carries it empty (PS3.5 7.4.3). Values present in a form the SR cannot carry
(PatientSex "male", several names in a single-valued PN, an unknown Specific Character
Set) do not stop the report either.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import StoragePresentationContexts
from pynetdicom import _config as pynetdicom_config

from inference.routing import decide
from models.zoo import CHEST_XRAY, FUNDUS, MAMMOGRAPHY
from pacs.dimse.reactor import MendedAE
from pacs.index import Index
from pacs.jobs import Job, JobQueue, JobState
from scripts.synthetic_corpus import Patient, Rng, chest_dx, fundus_op, mammography
from tests.support.scu import store
from tests.support.server import Server
from tests.support.web import parts
from tests.support.zoo import manifest_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TYPE_2 = (
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
)
PATIENT = Patient("RW1", "Real^World", "ISO_IR 192", "19650304", "F")
WAIT_SECONDS = 600


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Server]:
    running = Server(
        tmp_path_factory.mktemp("screening") / "data",
        FILMLESS_MODELS_DIR=str(demo_models),
        FILMLESS_STUDY_STABLE_SECONDS="2",
        FILMLESS_INFERENCE_MAX_WAIT_MS="20",
    )
    running.start()
    try:
        yield running
    finally:
        status = running.stop()
        assert status == 0, running.output.decode(errors="replace")[-3000:]


def _send(
    server: Server, datasets: list[Dataset], folder: Path, relabelled: dict[str, str]
) -> None:
    """As files, byte for byte (a modality's own encoding, wrong declarations included).

    ``relabelled``: SOP Instance UID -> a character set pydicom will not write; the data
    set is written in UTF-8 and its declared Specific Character Set changed in the bytes
    (both values are 10 bytes long).
    """
    files = []
    for ds in datasets:
        relabel = relabelled.get(str(ds.SOPInstanceUID))
        if relabel is not None:
            ds.SpecificCharacterSet = "ISO_IR 192"
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if relabel is not None:
            path.write_bytes(path.read_bytes().replace(b"ISO_IR 192", relabel.encode(), 1))
        files.append(path)
    ae = MendedAE(ae_title="MODALITY")
    for context in StoragePresentationContexts[:120]:
        ae.add_requested_context(str(context.abstract_syntax), ["1.2.840.10008.1.2.1"])
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", server.port, ae_title="FILMLESS")
    assert assoc.is_established
    try:
        for path in files:
            status = store(assoc, path)
            assert status.Status == 0, (path.name, status)
    finally:
        assoc.release()
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked


def _jobs(server: Server) -> list[Job]:
    index = Index(f"sqlite:///{Path(server.settings['FILMLESS_DATA_DIR']) / 'index.sqlite'}")
    try:
        return JobQueue(index).jobs()
    finally:
        index.dispose()


def _settled(server: Server, studies: set[str]) -> dict[str, list[Job]]:
    """The jobs of each study once none is pending or running (bounded in time)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        jobs = [j for j in _jobs(server) if j.StudyInstanceUID in studies]
        busy = [j for j in jobs if j.state in (JobState.PENDING, JobState.RUNNING)]
        if not busy and {j.StudyInstanceUID for j in jobs} >= studies:
            by_study: dict[str, list[Job]] = {s: [] for s in studies}
            for j in jobs:
                by_study[j.StudyInstanceUID].append(j)
            return by_study
        assert time.monotonic() < deadline, [(j.model, j.state, j.reason) for j in busy]
        time.sleep(1)


def _report(server: Server, study: str, series_uid: str, sop: str) -> Dataset:
    answer = httpx.get(
        f"{server.url}/studies/{study}/series/{series_uid}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=60,
    )
    ((_, body),) = parts(answer)
    return pydicom.dcmread(io.BytesIO(body))


def _reports(server: Server, study: str) -> list[Dataset]:
    found = []
    series = httpx.get(f"{server.url}/studies/{study}/series", params={"Modality": "SR"}).json()
    for entry in series:
        series_uid = entry["0020000E"]["Value"][0]
        listed = httpx.get(f"{server.url}/studies/{study}/series/{series_uid}/instances").json()
        found += [_report(server, study, series_uid, i["00080018"]["Value"][0]) for i in listed]
    return found


# What a case does to an image; a returned string is the character set it declares.
Mutation = Callable[[Dataset], str | None]


def _absent(keyword: str) -> Mutation:
    def mutate(ds: Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)

    return mutate


def _empty(keyword: str) -> Mutation:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, "")

    return mutate


def _setting(keyword: str, value: object) -> Mutation:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return mutate


CASES: dict[str, Mutation] = {
    **{f"{k} absent": _absent(k) for k in TYPE_2},
    **{f"{k} empty": _empty(k) for k in TYPE_2},
    "PatientSex male": _setting("PatientSex", "male"),
    "two names": _setting("PatientName", ["Real^World", "Other^Name"]),
    "unknown character set": lambda ds: "ISO_IR 999",
    "Latin-1 declared, UTF-8 sent": lambda ds: "ISO_IR 100",
}


def _exams(seed: int) -> dict[str, list[Dataset]]:
    rng = Rng(seed)
    frontal, _lateral = chest_dx(rng, PATIENT, 0.05, "20260102", f"RW{seed}")
    return {
        "chest X-ray": [frontal],
        "fundus pair": fundus_op(rng, PATIENT, 0.1, "20260102", f"RW{seed}"),
        "mammogram": mammography(rng, PATIENT, 0.1, "20260102", f"RW{seed}"),
    }


def test_every_image_gets_its_report_whatever_its_header_lacks(
    server: Server, tmp_path: Path
) -> None:
    sent: dict[str, tuple[str, str, list[Dataset]]] = {}  # study -> (case, exam, images)
    batch = []
    relabelled = {}
    for seed, (case, mutate) in enumerate(CASES.items(), start=100):
        for exam, images in _exams(seed).items():
            for ds in images:
                if (charset := mutate(ds)) is not None:
                    relabelled[str(ds.SOPInstanceUID)] = charset
            sent[str(images[0].StudyInstanceUID)] = (case, exam, images)
            batch += images
    _send(server, batch, tmp_path, relabelled)
    jobs = _settled(server, set(sent))
    problems = []
    for study, (case, exam, images) in sent.items():
        states = [(j.model, j.state, j.reason) for j in jobs[study]]
        if any(state != JobState.DONE for _model, state, _reason in states):
            problems.append(f"{exam}, {case}: {states}")
            continue
        reports = _reports(server, study)
        wanted = 1 if exam in ("mammogram", "fundus pair") else len(images)
        if len(reports) != wanted:
            problems.append(f"{exam}, {case}: {len(reports)} reports for {wanted}")
            continue
        for report in reports:
            for keyword in TYPE_2:
                # Type 2 in the SR: present, empty when the source had no usable value.
                if keyword not in report:
                    problems.append(f"{exam}, {case}: the report has no {keyword}")
            if case.endswith("absent") or case.endswith("empty"):
                keyword = case.split()[0]
                if str(report[keyword].value or ""):
                    problems.append(f"{exam}, {case}: {keyword} is {report[keyword].value!r}")
            if case == "PatientSex male" and report.PatientSex != "M":
                problems.append(f"{exam}, {case}: PatientSex {report.PatientSex!r}")
    assert problems == [], "\n".join(problems)


def test_what_is_not_screened_says_why(server: Server, tmp_path: Path) -> None:
    """A chest X-ray without ViewPosition (screen_without_view_position is off), a
    single mammography view, a fundus photograph of no known eye: each a skipped job
    with its reason, never nothing."""
    rng = Rng(7)
    frontal, _ = chest_dx(rng, PATIENT, 0.05, "20260103", "SKIP")
    del frontal.ViewPosition
    single = mammography(rng, PATIENT, 0.1, "20260103", "SKIP")[0]
    processing = mammography(rng, PATIENT, 0.1, "20260103", "SKIP")[1]
    processing.PresentationIntentType = "FOR PROCESSING"
    eye = fundus_op(rng, PATIENT, 0.1, "20260103", "SKIP")[0]
    del eye.ImageLaterality
    if "Laterality" in eye:
        del eye.Laterality
    _send(server, [frontal, single, processing, eye], tmp_path, {})
    studies = {str(ds.StudyInstanceUID) for ds in (frontal, single, processing, eye)}
    jobs = _settled(server, studies)
    reasons = {
        study: [(j.model, j.state, j.reason) for j in found] for study, found in jobs.items()
    }
    assert reasons[str(frontal.StudyInstanceUID)] == [
        (CHEST_XRAY.name, JobState.SKIPPED, "ViewPosition absent is not one of PA, AP")
    ]
    ((model, state, reason),) = reasons[str(single.StudyInstanceUID)]
    assert (model, state) == (MAMMOGRAPHY.name, JobState.SKIPPED)
    assert "views missing from the study" in reason
    ((model, state, reason),) = reasons[str(processing.StudyInstanceUID)]
    assert (model, state) == (MAMMOGRAPHY.name, JobState.SKIPPED)
    assert "PresentationIntentType FOR PROCESSING" in reason
    assert reasons[str(eye.StudyInstanceUID)] == [
        (FUNDUS.name, JobState.SKIPPED, "ImageLaterality absent is not one of L, R")
    ]


def test_the_setting_screens_a_chest_xray_without_view_position() -> None:
    """screen_without_view_position: the chest model runs on a DX that has none; the
    study-level mammography model never does (its views are what it needs)."""
    cxr, mg = manifest_of(CHEST_XRAY), manifest_of(MAMMOGRAPHY)
    header = {
        "Modality": "DX",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
        "PhotometricInterpretation": "MONOCHROME2",
    }
    skipped = decide(header, cxr)
    assert skipped is not None
    assert not skipped.runs
    screened = decide(header, cxr, without_view_position=True)
    assert screened is not None
    assert screened.runs
    view = {
        "Modality": "MG",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2",
        "PresentationIntentType": "FOR PRESENTATION",
        "ImageLaterality": "L",
    }
    decision = decide(view, mg, without_view_position=True)
    assert decision is not None
    assert not decision.runs
