"""The viewer's files at /viewer/ (SPA fallback, 404s) and the sub-path rewrite of a build."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from dicomweb.app import create_app
from filmless.viewer import BASE, HOW_TO, ViewerError, app_config, installed, patch
from pacs.archive import Archive
from tests.support.web import serving

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><script src="/app-config.js"></script>'
    '<script rel="preload" type="module" src="/init-service-worker.js"></script>'
    '<a href="//cdn.example/x">x</a></head><body><script src="/app.bundle.1a2b.js"></script>'
    "</body></html>"
)
BUNDLE = 'var x; // webpack/runtime/public_path\n__webpack_require__.p = "/";\n'


def _dist(folder: Path) -> Path:
    folder.mkdir()
    (folder / "index.html").write_text(INDEX)
    (folder / "app.bundle.1a2b.js").write_text(BUNDLE)
    (folder / "assets").mkdir()
    (folder / "assets" / "logo.svg").write_text("<svg/>")
    (folder / "codec.wasm").write_bytes(b"\0asm")
    (folder / "worker.bundle.9f.js").write_text(BUNDLE)
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
        # The DICOMweb API is unaffected.
        assert httpx.get(f"{url}/studies").status_code == 200


def test_without_a_viewer_the_server_says_how_to_get_one(archive: Archive, tmp_path: Path) -> None:
    assert not installed(tmp_path / "viewer")
    with serving(create_app(archive, viewer_dir=tmp_path / "viewer", viewer_missing=HOW_TO)) as url:
        answer = httpx.get(url.removesuffix("/dicom-web") + "/viewer/")
        assert answer.status_code == 404
        assert "filmless viewer install" in answer.text
