"""QIDO-RS over a real uvicorn server on loopback, with dicomweb-client and httpx."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from dicomweb.app import create_app
from pacs.archive import Archive
from pacs.dimse.reactor import MendedAE
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.index import Index
from tests.conftest import StoreFactory, free_port, make_archive
from tests.support.instances import ct_instance
from tests.support.web import serving

EVERY_BLOB_STORE = True


@dataclass
class Web:
    url: str
    client: DICOMwebClient
    archive: Archive
    studies: dict[str, pydicom.Dataset]
    series: dict[str, set[str]]
    instances: dict[str, set[str]]


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, corpus: list[Path], blob_stores: StoreFactory
) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("qido")
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(root / "data", index, stores=blob_stores)
    studies: dict[str, pydicom.Dataset] = {}
    series: dict[str, set[str]] = defaultdict(set)
    instances: dict[str, set[str]] = defaultdict(set)
    for path in corpus:
        archive.ingest_file(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(ds.StudyInstanceUID, ds)
        series[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
        instances[ds.SeriesInstanceUID].add(ds.SOPInstanceUID)
    with serving(create_app(archive)) as url:
        yield Web(url, DICOMwebClient(url), archive, studies, series, instances)
    index.dispose()


def _values(answer: dict[str, dict[str, object]], tag: str) -> list[object]:
    element = answer.get(tag, {})
    value = element.get("Value", [])
    assert isinstance(value, list)
    return value


def test_search_studies_with_default_attributes(web: Web) -> None:
    answers = web.client.search_for_studies()
    assert {_values(a, "0020000D")[0] for a in answers} == set(web.studies)
    for answer in answers:
        uid = _values(answer, "0020000D")[0]
        expected = web.studies[str(uid)]
        assert _values(answer, "00100020") == [expected.PatientID]
        assert _values(answer, "00100010")[0] == {"Alphabetic": str(expected.PatientName)}
        assert _values(answer, "00080056") == ["ONLINE"]
        # Built from the Host header the client sent (dicomweb-client leaves the port out).
        (retrieve_url,) = _values(answer, "00081190")
        assert str(retrieve_url).endswith(f"/dicom-web/studies/{uid}")
        count = sum(len(web.instances[s]) for s in web.series[str(uid)])
        assert _values(answer, "00201208") == [count]


def test_matching_limit_offset_and_includefield(web: Web) -> None:
    smiths = web.client.search_for_studies(search_filters={"PatientName": "Smith*"})
    expected = {u for u, ds in web.studies.items() if str(ds.PatientName).startswith("Smith")}
    assert {_values(a, "0020000D")[0] for a in smiths} == expected
    by_tag = web.client.search_for_studies(search_filters={"00100020": "FL000001"})
    assert {_values(a, "00100020")[0] for a in by_tag} == {"FL000001"}
    fuzzy = web.client.search_for_studies(
        search_filters={"PatientName": "muller*"}, fuzzymatching=True
    )
    assert {_values(a, "0020000D")[0] for a in fuzzy} == {
        u for u, ds in web.studies.items() if str(ds.PatientName).startswith("Müller")
    }
    everything = web.client.search_for_studies()
    page = web.client.search_for_studies(limit=5, offset=3)
    assert [_values(a, "0020000D") for a in page] == [
        _values(a, "0020000D") for a in everything[3:8]
    ]
    described = web.client.search_for_studies(fields=["StudyDescription"], limit=1)
    assert "00081030" in described[0]
    everything_at_once = web.client.search_for_studies(fields=["all"], limit=1)
    assert "00100030" in everything_at_once[0]


def test_series_and_instances(web: Web) -> None:
    study = next(iter(web.studies))
    series = web.client.search_for_series(study_instance_uid=study)
    assert {_values(s, "0020000E")[0] for s in series} == web.series[study]
    one = next(iter(web.series[study]))
    instances = web.client.search_for_instances(study_instance_uid=study, series_instance_uid=one)
    assert {_values(i, "00080018")[0] for i in instances} == web.instances[one]
    in_study = web.client.search_for_instances(study_instance_uid=study)
    assert {_values(i, "00080018")[0] for i in in_study} == set().union(
        *(web.instances[s] for s in web.series[study])
    )
    all_mg = web.client.search_for_series(search_filters={"Modality": "MG"})
    assert len(all_mg) == sum(
        len(web.series[u]) for u, ds in web.studies.items() if ds.Modality == "MG"
    )
    total = sum(len(v) for v in web.instances.values())
    assert len(web.client.search_for_instances()) == total


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/studies?limit=ten", "limit must be a non-negative integer"),
        ("/studies?fuzzymatching=maybe", "fuzzymatching must be true or false"),
        ("/studies?StudyInstanceUID=1.2.abc", "not a UID"),
        ("/studies/1.2.abc/series", "not a UID"),
        ("/studies?Modality=CT", "below the STUDY level"),
        ("/studies?StudyDate=2024*", "wildcards are not allowed"),
        ("/studies?00020010=1.2.840.10008.1.2", "not a search key"),
        ("/studies?offset=99999999999999999999", "offset must be a non-negative integer"),
    ],
)
def test_errors_are_400_with_a_reason(web: Web, path: str, reason: str) -> None:
    response = httpx.get(web.url + path)
    assert response.status_code == 400
    assert reason in response.json()["error"]


def test_results_are_capped_with_a_warning(web: Web) -> None:
    with serving(create_app(web.archive, max_results=5)) as url:
        capped = httpx.get(url + "/studies")
        assert capped.status_code == 200
        assert len(capped.json()) == 5
        assert capped.headers["warning"].startswith("299 ")
        total = len(web.studies)
        assert total > 8
        paged = httpx.get(url + "/studies?limit=3&offset=5")
        assert len(paged.json()) == 3
        # A limit that cuts the answer short says so too, and where the rest starts.
        assert "offset=8" in paged.headers["warning"]
        last = httpx.get(url + f"/studies?limit=3&offset={total - 3}")
        assert len(last.json()) == 3
        assert "warning" not in last.headers


def test_no_match_is_an_empty_array(web: Web) -> None:
    response = httpx.get(web.url + "/studies?PatientID=NOBODY")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert response.json() == []


def test_c_store_is_found_by_qido(web: Web) -> None:
    config = DimseConfig(port=free_port())
    server = start_dimse(web.archive, config)
    try:
        ae = MendedAE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", config.port, ae_title="FILMLESS")
        ds = ct_instance(patient_id="WEB1", patient_name="Web^Found")
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    finally:
        server.shutdown()
    found = web.client.search_for_studies(search_filters={"PatientID": "WEB1"})
    assert [_values(a, "0020000D") for a in found] == [[ds.StudyInstanceUID]]
    assert _values(found[0], "00100010") == [{"Alphabetic": "Web^Found"}]
