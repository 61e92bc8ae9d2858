"""The API description at /docs and /redoc works offline: nothing is fetched from a CDN."""

from __future__ import annotations

import re

import httpx

from dicomweb.app import create_app
from pacs.archive import Archive
from tests.support.web import serving


def test_docs_pages_load_everything_from_this_server(archive: Archive) -> None:
    with serving(create_app(archive)) as url:
        root = url.removesuffix("/dicom-web")
        for page in ("/docs", "/redoc"):
            html = httpx.get(root + page)
            assert html.status_code == 200
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
            assets += re.findall(r"""url: ?['"]([^'"]+)['"]""", html.text)
            assert assets, page
            for asset in assets:
                assert not asset.startswith(("http:", "https:", "//")), (page, asset)
                assert httpx.get(root + asset).status_code == 200, (page, asset)
        spec = httpx.get(root + "/openapi.json").json()
        assert spec["info"]["title"] == "filmless DICOMweb"
