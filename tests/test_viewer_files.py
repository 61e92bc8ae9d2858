"""The viewer's files at /viewer/ (SPA fallback, 404s) and the sub-path rewrite of a build."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGLSLossless

from dicomweb.app import create_app
from filmless.viewer import (
    BASE,
    HOW_TO,
    OHIF_VERSION,
    ViewerError,
    app_config,
    installed,
    patch,
)
from pacs.archive import Archive, Origin
from scripts.synthetic_corpus import Patient, Rng, chest_dx, encode
from tests.support.instances import source
from tests.support.web import parts, serving

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><script src="/app-config.js"></script>'
    '<script rel="preload" type="module" src="/init-service-worker.js"></script>'
    '<a href="//cdn.example/x">x</a></head><body><script src="/app.bundle.1a2b.js"></script>'
    "</body></html>"
)
BUNDLE = 'var x; // webpack/runtime/public_path\n__webpack_require__.p = "/";\n'
SR_CHUNK = """function setTrackingUniqueIdentifiersForElement(element, ids, activeIndex = 0) {
  const enabledElement = getEnabledElement(element);
  const {
    viewport
  } = enabledElement;
  state.trackingIdentifiersByViewportId[viewport.id] = {
    trackingUniqueIdentifiers,
    activeIndex
  };
}
"""


def _dist(folder: Path) -> Path:
    folder.mkdir()
    (folder / "index.html").write_text(INDEX)
    (folder / "app.bundle.1a2b.js").write_text(BUNDLE)
    (folder / "assets").mkdir()
    (folder / "assets" / "logo.svg").write_text("<svg/>")
    (folder / "codec.wasm").write_bytes(b"\0asm")
    (folder / "worker.bundle.9f.js").write_text(BUNDLE)
    (folder / "7248.bundle.e8.js").write_text(SR_CHUNK)
    (folder / "app.bundle.css").write_text("@font-face{src:url(/f.woff2)}a{b:url(//x/y)}")
    return folder


def test_patch_moves_a_root_build_under_viewer(tmp_path: Path) -> None:
    dist = _dist(tmp_path / "dist")
    patch(dist)
    html = (dist / "index.html").read_text()
    assert f'window.PUBLIC_URL="{BASE}"' in html
    assert f'href="{BASE}manifest.json"' in html
    assert f'src="{BASE}app.bundle.1a2b.js"' in html
    assert 'href="//cdn.example/x"' in html  # protocol-relative links are left alone
    assert "init-service-worker" not in html
    for script in ("app.bundle.1a2b.js", "worker.bundle.9f.js"):
        assert f'__webpack_require__.p = "{BASE}";' in (dist / script).read_text()
    assert (dist / "app.bundle.css").read_text() == (
        f"@font-face{{src:url({BASE}f.woff2)}}a{{b:url(//x/y)}}"
    )
    # The SR viewport draws again once it knows which measurements to draw.
    assert (dist / "7248.bundle.e8.js").read_text().endswith("  };\n  viewport.render();\n}\n")
    # A build that does not look like the pinned one is refused, not half adapted.
    with pytest.raises(ViewerError, match="not found"):
        patch(dist)


def test_app_config_points_at_our_own_dicomweb() -> None:
    config = app_config()
    assert "window.location.origin + '/dicom-web'" in config
    assert "routerBasename: '/viewer'" in config
    assert "https://" not in config


def test_viewer_routes(archive: Archive, tmp_path: Path) -> None:
    dist = _dist(tmp_path / "viewer")
    with serving(create_app(archive, viewer_dir=dist)) as url:
        root = url.removesuffix("/dicom-web")
        redirect = httpx.get(f"{root}/viewer")
        assert redirect.status_code == 308
        assert redirect.headers["location"] == "/viewer/"
        page = httpx.get(f"{root}/viewer/")
        assert page.text == INDEX
        assert page.headers["cache-control"] == "no-cache"
        # Routes of the app get the page; files are files; missing files are 404.
        route = httpx.get(f"{root}/viewer/viewer", params={"StudyInstanceUIDs": "1.2.3"})
        assert route.text == INDEX
        assert httpx.get(f"{root}/viewer/assets/logo.svg").text == "<svg/>"
        bundle = httpx.get(f"{root}/viewer/app.bundle.1a2b.js")
        assert "immutable" in bundle.headers["cache-control"]
        wasm = httpx.get(f"{root}/viewer/codec.wasm")
        assert wasm.headers["content-type"] == "application/wasm"
        assert httpx.get(f"{root}/viewer/missing.js").status_code == 404
        escape = httpx.get(f"{root}/viewer/..%2F..%2Fetc%2Fpasswd")
        assert escape.status_code == 404
        # A link in the viewer's folder to elsewhere (here the index) is not followed.
        (dist / "index.sqlite").symlink_to(tmp_path / "index.sqlite")
        assert httpx.get(f"{root}/viewer/index.sqlite").status_code == 404
        # The DICOMweb API is unaffected.
        assert httpx.get(f"{url}/studies").status_code == 200


def test_a_viewer_adapted_by_an_older_install_is_installed_again(tmp_path: Path) -> None:
    folder = tmp_path / "viewer"
    folder.mkdir()
    (folder / ".filmless-ohif").write_text(OHIF_VERSION + "\n")
    assert not installed(folder)


def test_without_a_viewer_the_server_says_how_to_get_one(archive: Archive, tmp_path: Path) -> None:
    assert not installed(tmp_path / "viewer")
    with serving(create_app(archive, viewer_dir=tmp_path / "viewer", viewer_missing=HOW_TO)) as url:
        answer = httpx.get(url.removesuffix("/dicom-web") + "/viewer/")
        assert answer.status_code == 404
        assert "filmless viewer install" in answer.text


def test_what_ohif_asks_for(archive: Archive) -> None:
    """The requests OHIF 3.13 sends for the study list and a viewer, as captured from it."""
    cxr, _ = chest_dx(
        Rng(5),
        Patient("OHIF1", "Chest^Viewer", "ISO_IR 192", "19600101", "F"),
        0.05,
        "20260501",
        "O1",
    )
    cxr = encode(cxr, JPEGLSLossless)
    archive.ingest(source(cxr), Origin.DIMSE)
    study, series, sop = cxr.StudyInstanceUID, cxr.SeriesInstanceUID, cxr.SOPInstanceUID
    json = {"Accept": "application/dicom+json"}
    with serving(create_app(archive)) as url:
        listed = httpx.get(
            f"{url}/studies?00100020=OHIF1&limit=101&offset=0&fuzzymatching=true"
            "&includefield=00081030%2C00080060%2C00080090%2C00100030",
            headers=json,
        )
        assert listed.status_code == 200
        (found,) = listed.json()
        assert found["0020000D"]["Value"] == [study]
        assert {"00081030", "00100030"} <= set(found)
        # The search box: lower case, wildcards, matched without regard to case.
        by_name = httpx.get(
            f"{url}/studies", params={"PatientName": "*chest*", "fuzzymatching": "true"}
        )
        assert [s["0020000D"]["Value"] for s in by_name.json()] == [[study]]
        in_study = httpx.get(
            f"{url}/studies/{study}/series?includefield=00080021%2C00080031%2C0008103E%2C00200011",
            headers=json,
        ).json()
        assert in_study[0]["0008103E"]["Value"] == [cxr.SeriesDescription]
        metadata = httpx.get(f"{url}/studies/{study}/series/{series}/metadata", headers=json)
        assert metadata.json()[0]["00080018"]["Value"] == [sop]
        instance = f"{url}/studies/{study}/series/{series}/instances/{sop}"
        frames = httpx.get(
            f"{instance}/frames/1",
            headers={
                "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"
            },
        )
        ((content_type, body),) = parts(frames)
        assert content_type.startswith("image/jls")
        assert JPEGLSLossless in content_type  # the stored transfer syntax, named in the part
        assert body == next(generate_frames(cxr.PixelData, number_of_frames=1))
        for path in ("thumbnail", "rendered"):
            image = httpx.get(f"{instance}/{path}?accept=image/jpeg")
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/jpeg"
