"""WADO-RS and DELETE over a real uvicorn server, with dicomweb-client and httpx.

Every answer is checked against what the archive holds: the stored bytes, the stored
tags and the pixels pydicom decodes from the stored file.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.processing import apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicomweb.app import create_app
from pacs.archive import Archive, Origin
from pacs.index import Index, InstanceRecord
from scripts.synthetic_corpus import encode
from tests.conftest import StoreFactory, make_archive
from tests.support.instances import ct_instance, source, write
from tests.support.web import parts, serving

EVERY_BLOB_STORE = True


@dataclass
class Web:
    url: str
    client: DICOMwebClient
    archive: Archive
    records: list[InstanceRecord]
    multiframe: Dataset
    multiframe_rle: Dataset


def _multiframe(syntax: str, frames: int = 3) -> Dataset:
    ds = ct_instance(patient_id="MF", seed=7)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 4096, (frames, 24, 20), dtype=np.uint16)
    ds.Rows, ds.Columns = 24, 20
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    return ds


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, corpus: list[Path], blob_stores: StoreFactory
) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("wado")
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(root / "data", index, stores=blob_stores)
    for path in corpus:
        archive.ingest_file(path)
    native = _multiframe(ExplicitVRLittleEndian)
    rle = _multiframe(RLELossless)
    for n, ds in enumerate((native, rle)):
        archive.ingest_file(write(ds, root / f"mf{n}.dcm"))
    with serving(create_app(archive)) as url:
        yield Web(url, DICOMwebClient(url), archive, index.instances(), native, rle)
    index.dispose()


def _stored(web: Web, record: InstanceRecord) -> bytes:
    with web.archive.open(record) as stream:
        return stream.read()


def _one_per_kind(web: Web) -> list[InstanceRecord]:
    """One instance per (SOP class, transfer syntax) the corpus holds."""
    seen: dict[tuple[str, str], InstanceRecord] = {}
    for record in web.records:
        seen.setdefault((record.SOPClassUID, record.TransferSyntaxUID), record)
    return list(seen.values())


def _url(web: Web, record: InstanceRecord) -> str:
    return (
        f"{web.url}/studies/{record.StudyInstanceUID}/series/{record.SeriesInstanceUID}"
        f"/instances/{record.SOPInstanceUID}"
    )


def _without_pixels(ds: Dataset) -> dict[str, object]:
    return {
        f"{e.tag:08X}": e.value
        for e in ds
        if e.tag not in (0x7FE00010,) and e.VR not in ("SQ", "OB", "OW", "UN")
    }


def test_instance_default_is_explicit_little_endian_with_the_stored_pixels(web: Web) -> None:
    kinds = _one_per_kind(web)
    assert len({r.TransferSyntaxUID for r in kinds}) >= 6
    for record in kinds:
        stored = pydicom.dcmread(io.BytesIO(_stored(web, record)))
        # dicomweb-client asks transfer-syntax=* unless told; without it the default applies.
        response = httpx.get(
            _url(web, record), headers={"Accept": 'multipart/related; type="application/dicom"'}
        )
        ((content_type, body),) = parts(response)
        assert content_type.replace('"', "").endswith(f"transfer-syntax={ExplicitVRLittleEndian}")
        got = pydicom.dcmread(io.BytesIO(body))
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.SOPInstanceUID == record.SOPInstanceUID
        assert np.array_equal(got.pixel_array, stored.pixel_array), record.TransferSyntaxUID
        expected = _without_pixels(stored)
        expected.pop("00280004", None)  # JPEG YBR_FULL_422 is decoded to RGB
        actual = _without_pixels(got)
        actual.pop("00280004", None)
        assert actual == expected


def test_instance_as_stored_is_the_stored_file(web: Web) -> None:
    for record in _one_per_kind(web):
        response = httpx.get(
            _url(web, record),
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert response.status_code == 200
        ((content_type, body),) = parts(response)
        assert f"transfer-syntax={record.TransferSyntaxUID}" in content_type.replace('"', "")
        assert body == _stored(web, record)


def test_implicit_little_endian_on_request(web: Web) -> None:
    record = next(r for r in web.records if r.TransferSyntaxUID == JPEGLSLossless)
    accept = (
        f'multipart/related; type="application/dicom"; transfer-syntax={ImplicitVRLittleEndian}'
    )
    ((_, body),) = parts(httpx.get(_url(web, record), headers={"Accept": accept}))
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    stored = pydicom.dcmread(io.BytesIO(_stored(web, record)))
    assert np.array_equal(got.pixel_array, stored.pixel_array)


def test_study_and_series_retrieve_every_instance(web: Web) -> None:
    series_of: dict[str, set[str]] = {}
    for r in web.records:
        series_of.setdefault(r.StudyInstanceUID, set()).add(r.SeriesInstanceUID)
    record = max(web.records, key=lambda r: len(series_of[r.StudyInstanceUID]))
    study = {r.SOPInstanceUID for r in web.records if r.StudyInstanceUID == record.StudyInstanceUID}
    series = {
        r.SOPInstanceUID for r in web.records if r.SeriesInstanceUID == record.SeriesInstanceUID
    }
    got = web.client.retrieve_study(
        record.StudyInstanceUID, media_types=(("application/dicom", "*"),)
    )
    assert {ds.SOPInstanceUID for ds in got} == study
    got = web.client.retrieve_series(record.StudyInstanceUID, record.SeriesInstanceUID)
    assert {ds.SOPInstanceUID for ds in got} == series
    assert len(study) > len(series) >= 1
    assert len(series_of[record.StudyInstanceUID]) > 1


def test_metadata_matches_the_stored_header(web: Web) -> None:
    record = next(r for r in web.records if r.TransferSyntaxUID == RLELossless)
    stored = pydicom.dcmread(io.BytesIO(_stored(web, record)), stop_before_pixels=True)
    meta = web.client.retrieve_instance_metadata(
        record.StudyInstanceUID, record.SeriesInstanceUID, record.SOPInstanceUID
    )
    expected = _no_empty_values(
        stored.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=None)
    )
    expected["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    pixel = meta.pop("7FE00010")
    assert pixel["vr"] == "OB"
    assert pixel["BulkDataURI"].endswith(f"/instances/{record.SOPInstanceUID}/bulkdata/7FE00010")
    assert meta == expected
    assert list(meta) == sorted(meta)

    study = web.client.retrieve_study_metadata(record.StudyInstanceUID)
    series = web.client.retrieve_series_metadata(record.StudyInstanceUID, record.SeriesInstanceUID)
    in_study = [r for r in web.records if r.StudyInstanceUID == record.StudyInstanceUID]
    in_series = [r for r in in_study if r.SeriesInstanceUID == record.SeriesInstanceUID]
    assert sorted(m["00080018"]["Value"][0] for m in study) == sorted(
        r.SOPInstanceUID for r in in_study
    )
    assert len(series) == len(in_series)


def _no_empty_values(value: Any) -> Any:
    """PS3.18 F.2.5: an empty value has no "Value" field (pydicom writes [] for sequences)."""
    if isinstance(value, dict):
        return {k: _no_empty_values(v) for k, v in value.items() if not (k == "Value" and v == [])}
    if isinstance(value, list):
        return [_no_empty_values(v) for v in value]
    return value


def test_pixel_bulk_data_is_the_stored_frames(web: Web) -> None:
    ds = web.multiframe_rle
    base = f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    uri = f"{base}/instances/{ds.SOPInstanceUID}/bulkdata/7FE00010"
    response = httpx.get(
        uri, headers={"Accept": 'multipart/related; type="image/dicom-rle"; transfer-syntax=*'}
    )
    assert response.status_code == 200
    expected = list(generate_frames(ds.PixelData, number_of_frames=3))
    assert [body for _, body in parts(response)] == expected


def test_frames_native_and_as_stored(web: Web) -> None:
    native, rle = web.multiframe, web.multiframe_rle
    frames = np.frombuffer(native.PixelData, dtype="<u2").reshape(3, -1)
    got = web.client.retrieve_instance_frames(
        native.StudyInstanceUID, native.SeriesInstanceUID, native.SOPInstanceUID, [1, 3]
    )
    assert got == [frames[0].tobytes(), frames[2].tobytes()]

    decoded = rle.pixel_array.reshape(3, -1)
    got = web.client.retrieve_instance_frames(
        rle.StudyInstanceUID,
        rle.SeriesInstanceUID,
        rle.SOPInstanceUID,
        [2],
        media_types=(("application/octet-stream", ExplicitVRLittleEndian),),
    )
    assert got == [decoded[1].astype("<u2").tobytes()]

    # What OHIF asks for: octet-stream with transfer-syntax=* gets the stored bit stream.
    url = (
        f"{web.url}/studies/{rle.StudyInstanceUID}/series/{rle.SeriesInstanceUID}"
        f"/instances/{rle.SOPInstanceUID}/frames/1,2"
    )
    accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    response = httpx.get(url, headers={"Accept": accept})
    assert response.status_code == 200
    fragments = list(generate_frames(rle.PixelData, number_of_frames=3))
    answer = parts(response)
    assert [body for _, body in answer] == fragments[:2]
    assert all(t.startswith("image/dicom-rle") and RLELossless in t for t, _ in answer)


def test_frames_of_encapsulated_pixel_data_with_a_defined_length(web: Web) -> None:
    """Some writers (pynetdicom sending a pydicom data set) give the items of compressed
    pixel data a defined length; the frames are still found where the items are."""
    jpeg = encode(ct_instance(patient_id="DEFLEN", seed=9), JPEGLSLossless)
    jpeg["PixelData"].is_undefined_length = False
    web.archive.ingest(source(jpeg), Origin.DIMSE)
    url = (
        f"{web.url}/studies/{jpeg.StudyInstanceUID}/series/{jpeg.SeriesInstanceUID}"
        f"/instances/{jpeg.SOPInstanceUID}/frames/1"
    )
    accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    response = httpx.get(url, headers={"Accept": accept})
    assert response.status_code == 200, response.text
    ((_, body),) = parts(response)
    assert body == next(generate_frames(jpeg.PixelData, number_of_frames=1))


@pytest.mark.parametrize(
    ("suffix", "accept", "status"),
    [
        ("/frames/4", "multipart/related; type=application/octet-stream", 404),
        ("/frames/0", "multipart/related; type=application/octet-stream", 400),
        ("/frames/1,x", "multipart/related; type=application/octet-stream", 400),
        ("/frames/1", 'multipart/related; type="image/jp2"', 406),
        ("/frames/1", "application/pdf", 406),
        ("", "application/pdf", 406),
        ("/metadata", "image/png", 406),
        ("/rendered?window=1,2", "image/jpeg", 400),
        ("/rendered?window=40,400,cubic", "image/jpeg", 400),
        ("/rendered?viewport=0,10", "image/jpeg", 400),
        ("/rendered?quality=101", "image/jpeg", 400),
        ("/frames/2/rendered", "image/jpeg", 404),
        ("/bulkdata/7FE0", "*/*", 400),
        ("/bulkdata/00280030", "*/*", 404),
    ],
)
def test_error_paths(web: Web, suffix: str, accept: str, status: int) -> None:
    record = next(r for r in web.records if r.TransferSyntaxUID == RLELossless)
    response = httpx.get(_url(web, record) + suffix, headers={"Accept": accept})
    assert response.status_code == status, response.text
    assert response.json()["error"]


def test_unknown_and_malformed_uids(web: Web) -> None:
    record = web.records[0]
    missing = httpx.get(f"{web.url}/studies/{generate_uid()}")
    assert missing.status_code == 404
    assert "no study" in missing.json()["error"]
    bad = httpx.get(f"{web.url}/studies/{record.StudyInstanceUID}/series/1..2/metadata")
    assert bad.status_code == 400


def _reference_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.BitsStored = 16
    windowed = apply_voi_lut(values.astype(np.float64), ds)
    return np.asarray(windowed / 65535.0 * 255.0)


def test_rendered_applies_rescale_window_and_monochrome1(web: Web, tmp_path: Path) -> None:
    ds = ct_instance(patient_id="RENDER", seed=4)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    inverted = ct_instance(patient_id="RENDER", study=ds.StudyInstanceUID, seed=4)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    inverted.RescaleSlope, inverted.RescaleIntercept = 1, -1024
    inverted.WindowCenter, inverted.WindowWidth = 40, 400
    for n, item in enumerate((ds, inverted)):
        web.archive.ingest_file(write(item, tmp_path / f"{n}.dcm"))
    hu = ds.pixel_array.astype(np.float64) - 1024

    def png(item: Dataset, query: str = "") -> np.ndarray:
        url = (
            f"{web.url}/studies/{item.StudyInstanceUID}/series/{item.SeriesInstanceUID}"
            f"/instances/{item.SOPInstanceUID}/rendered{query}"
        )
        response = httpx.get(url, headers={"Accept": "image/png"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        return np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float64)

    stored_window = png(ds)
    assert np.abs(stored_window - _reference_window(hu, 40, 400)).max() <= 1.0
    asked = png(ds, "?window=-600,1500,linear")
    assert np.abs(asked - _reference_window(hu, -600, 1500)).max() <= 1.0
    assert np.abs(png(inverted) - (255 - stored_window)).max() <= 1.0

    jpeg = web.client.retrieve_instance_rendered(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, media_types=("image/jpeg",)
    )
    picture = Image.open(io.BytesIO(jpeg))
    assert picture.format == "JPEG"
    assert picture.size == (16, 16)
    assert np.abs(np.asarray(picture, dtype=np.float64) - stored_window).mean() < 8


def test_rendered_colour_is_rgb(web: Web) -> None:
    for record in web.records:
        if record.TransferSyntaxUID != JPEGBaseline8Bit:
            continue
        stored = pydicom.dcmread(io.BytesIO(_stored(web, record)))
        response = httpx.get(_url(web, record) + "/rendered", headers={"Accept": "image/png"})
        picture = Image.open(io.BytesIO(response.content))
        assert picture.mode == "RGB"
        expected = stored.pixel_array.astype(np.float64)  # YBR_FULL_422 decoded to RGB
        assert np.abs(np.asarray(picture, dtype=np.float64) - expected).max() <= 1.0
        return
    pytest.fail("the corpus has no JPEG baseline colour image")


def test_rendered_frame_viewport_and_thumbnails(web: Web) -> None:
    native = web.multiframe
    instance = (
        f"{web.url}/studies/{native.StudyInstanceUID}/series/{native.SeriesInstanceUID}"
        f"/instances/{native.SOPInstanceUID}"
    )
    rendered = web.client.retrieve_instance_frames_rendered(
        native.StudyInstanceUID,
        native.SeriesInstanceUID,
        native.SOPInstanceUID,
        [2],
        media_types=("image/png",),
        params={"viewport": "10,10"},
    )
    picture = Image.open(io.BytesIO(rendered))
    assert picture.size == (8, 10)  # 20x24 fitted into 10x10, aspect kept
    # accept= in the query wins over the header (PS3.18 8.3.3.1).
    response = httpx.get(
        f"{instance}/frames/3/rendered?accept=image/png&viewport=10,12,0,0,10,12",
        headers={"Accept": "image/jpeg"},
    )
    assert response.headers["content-type"] == "image/png"
    crop = np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float64)
    frame = native.pixel_array[2][:12, :10].astype(np.float64)
    full = native.pixel_array[2].astype(np.float64)
    expected = (frame - full.min()) / (full.max() - full.min()) * 255
    assert np.abs(crop - expected).max() <= 1.0
    flipped = httpx.get(f"{instance}/frames/3/rendered?accept=image/png&viewport=40,48,10,0,-10,12")
    mirrored = np.asarray(Image.open(io.BytesIO(flipped.content)))
    assert mirrored.shape == (48, 40)
    for url in (
        f"{web.url}/studies/{native.StudyInstanceUID}/thumbnail",
        f"{web.url}/studies/{native.StudyInstanceUID}/series/{native.SeriesInstanceUID}/thumbnail",
        f"{instance}/thumbnail",
        f"{instance}/frames/1/thumbnail",
    ):
        response = httpx.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(response.content)).size) <= 128


def test_etag_last_modified_and_gzip(web: Web) -> None:
    record = web.records[0]
    url = f"{web.url}/studies/{record.StudyInstanceUID}/metadata"
    first = httpx.get(url, headers={"Accept-Encoding": "gzip"})
    assert first.headers["content-encoding"] == "gzip"
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert httpx.get(url, headers={"If-Modified-Since": modified}).status_code == 304
    assert httpx.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    instances = httpx.get(
        f"{web.url}/studies/{record.StudyInstanceUID}", headers={"Accept-Encoding": "gzip"}
    )
    assert "content-encoding" not in instances.headers
    assert instances.headers["etag"] != etag
    search = httpx.get(f"{web.url}/instances?includefield=all", headers={"Accept-Encoding": "gzip"})
    assert search.headers["content-encoding"] == "gzip"


def test_delete_instance_series_and_study(tmp_path: Path, blob_stores: StoreFactory) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(tmp_path / "data", index, stores=blob_stores)
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    made = [
        ct_instance(study=study, series=series[n % 2], patient_id="DEL", seed=n) for n in range(5)
    ]
    for n, ds in enumerate(made):
        archive.ingest_file(write(ds, tmp_path / f"{n}.dcm"))
    assert len(list(archive.store.listing())) == 5
    with serving(create_app(archive)) as url:
        client = DICOMwebClient(url)
        one = made[0]
        client.delete_instance(study, one.SeriesInstanceUID, one.SOPInstanceUID)
        assert len(client.search_for_instances(study)) == 4
        gone = httpx.delete(
            f"{url}/studies/{study}/series/{series[0]}/instances/{one.SOPInstanceUID}"
        )
        assert gone.status_code == 404
        client.delete_series(study, series[0])
        assert len(client.search_for_series(study)) == 1
        client.delete_study(study)
        assert client.search_for_studies(search_filters={"PatientID": "DEL"}) == []
        assert httpx.delete(f"{url}/studies/{study}").status_code == 404
        assert httpx.delete(f"{url}/studies/not-a-uid").status_code == 400
    assert index.instances() == []
    assert list(archive.store.listing()) == []
    index.dispose()


def test_openapi_and_cors(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.create_schema()
    archive = make_archive(tmp_path / "data", index)
    origin = "http://viewer.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "GET"}
    with serving(create_app(archive, cors_origins=[origin])) as url:
        root = url.removesuffix("/dicom-web")
        assert httpx.get(f"{root}/docs").status_code == 200
        spec = httpx.get(f"{root}/openapi.json").json()
        assert (
            "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}"
            in spec["paths"]
        )
        answer = httpx.options(f"{url}/studies", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == origin
        plain = httpx.get(f"{url}/studies", headers={"Origin": origin})
        assert plain.headers["access-control-allow-origin"] == origin
    with serving(create_app(archive)) as url:
        answer = httpx.options(f"{url}/studies", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
    index.dispose()
