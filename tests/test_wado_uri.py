"""WADO-URI (PS3.18 chapter 9) and study/series-level rendered (PS3.18 10.4.1.1.3)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from dicomweb.app import create_app
from pacs.archive import Archive, Origin
from tests.support.instances import ct_instance, source
from tests.support.web import parts, serving

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


EVERY_BLOB_STORE = True


@dataclass
class Served:
    url: str
    study: str
    series: str
    sop: str
    multiframe: pydicom.Dataset


@pytest.fixture
def served(archive: Archive) -> Iterator[Served]:
    ds = ct_instance()
    second = ct_instance(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID, seed=1)
    second.InstanceNumber = 2
    for instance in (ds, second):
        archive.ingest(source(instance), Origin.IMPORT)
    # A 15-frame RT dose of another study.
    archive.ingest_file(TEST_FILES / "rtdose_rle.dcm", Origin.IMPORT)
    multiframe = pydicom.dcmread(TEST_FILES / "rtdose_rle.dcm")
    with serving(create_app(archive)) as url:
        yield Served(url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, multiframe)


def wado(served: Served, **params: str) -> httpx.Response:
    query = {
        "requestType": "WADO",
        "studyUID": served.study,
        "seriesUID": served.series,
        "objectUID": served.sop,
        **params,
    }
    return httpx.get(f"{served.url}/wado", params=query)


def test_the_default_is_a_jpeg_of_the_image(served: Served) -> None:
    """PS3.18 9.1.2.1.5: without contentType a single-frame image is image/jpeg."""
    answer = wado(served)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(answer.content)).size == (16, 16)


def test_the_instance_as_dicom(served: Served) -> None:
    """PS3.18 9.1.2.4.2: application/dicom, Explicit VR Little Endian unless asked."""
    answer = wado(served, contentType="application/dicom")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(answer.content))
    assert ds.SOPInstanceUID == served.sop
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_rows_columns_region_window_and_quality(served: Served) -> None:
    """PS3.18 9.1.2.3: the requested size, region of the image and window."""
    answer = wado(served, contentType="image/png", rows="32", columns="32")
    assert Image.open(io.BytesIO(answer.content)).size == (32, 32)
    half = wado(served, contentType="image/png", region="0,0,0.5,1", rows="16")
    assert Image.open(io.BytesIO(half.content)).size == (8, 16)
    dark = wado(served, contentType="image/png", windowCenter="100000", windowWidth="10")
    assert np.asarray(Image.open(io.BytesIO(dark.content))).max() == 0
    assert wado(served, imageQuality="10").status_code == 200


def test_a_frame_of_a_multi_frame_image(served: Served) -> None:
    ds = served.multiframe
    answer = httpx.get(
        f"{served.url}/wado",
        params={
            "requestType": "WADO",
            "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID,
            "objectUID": ds.SOPInstanceUID,
            "contentType": "image/png",
            "frameNumber": "15",
        },
    )
    assert answer.status_code == 200
    assert Image.open(io.BytesIO(answer.content)).size == (ds.Columns, ds.Rows)


@pytest.mark.parametrize(
    ("params", "status", "reason"),
    [
        ({"requestType": "NOPE"}, 400, "requestType=WADO"),
        ({"objectUID": ""}, 400, "needs objectUID"),
        ({"objectUID": "1.2.3"}, 404, "no instance"),
        ({"contentType": "video/mpeg"}, 406, "contentType"),
        ({"anonymize": "yes"}, 400, "de-identification"),
        ({"windowCenter": "40"}, 400, "go together"),
        ({"frameNumber": "2"}, 404, "frame 2"),
        ({"region": "0.5,0,0.2,1"}, 400, "region"),
    ],
)
def test_bad_requests_say_why(
    served: Served, params: dict[str, str], status: int, reason: str
) -> None:
    answer = wado(served, **params)
    assert answer.status_code == status
    assert reason in answer.json()["error"]


def test_study_and_series_rendered_are_every_frame(served: Served) -> None:
    """PS3.18 10.4.1.1.3: a study or series rendered holds each of its images."""
    answer = httpx.get(
        f"{served.url}/studies/{served.study}/rendered", headers={"Accept": "image/png"}
    )
    assert answer.status_code == 200
    images = parts(answer)
    assert [kind for kind, _ in images] == ["image/png", "image/png"]
    ds = served.multiframe
    series = httpx.get(
        f"{served.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/rendered"
    )
    assert series.status_code == 200
    assert len(parts(series)) == int(ds.NumberOfFrames)
    assert all(kind == "image/jpeg" for kind, _ in parts(series))
    # A viewer's cache buster is ignored, as in searches (PS3.18 8.3.4).
    busted = httpx.get(f"{served.url}/studies/{served.study}/rendered", params={"_": "1712"})
    assert busted.status_code == 200
