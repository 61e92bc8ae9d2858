"""OHIF served by ``filmless serve``, driven in headless Chromium: study list, viewers, AI SR.

Needs npm (to fetch the pinned viewer), Debian's ``chromium`` and the Python
``playwright`` driver (never a downloaded browser). Screenshots are kept under
``test-artifacts/viewer/``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import Browser, Locator, Page, Request, Response, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from filmless.viewer import _pack, _unpack, install
from pacs.dimse.reactor import MendedAE
from scripts.synthetic_corpus import Patient, Rng, chest_dx, encode, fundus_op, mammography
from tests.conftest import free_port
from tests.support.server import Server
from tests.support.web import parts

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "viewer"


def _missing() -> str:
    if shutil.which("npm") is None:
        return "npm is not installed (needed to fetch the viewer)"
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed"
    return ""


if _missing() and os.environ.get("FILMLESS_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"browser tests are required: {_missing()}")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(bool(_missing()), reason=_missing() or "ready"),
    pytest.mark.timeout(900),
]

CXR = Patient("VIEW1", "Chest^Viewer", "ISO_IR 192", "19600101", "F")
J2K = Patient("VIEW2", "Jpeg2000^Viewer", "ISO_IR 192", "19610101", "M")
RGB = Patient("VIEW3", "Colour^Viewer", "ISO_IR 192", "19620101", "F")
EYES = Patient("VIEW4", "Fundus^Viewer", "ISO_IR 192", "19630101", "M")
BREASTS = Patient("VIEW5", "Mammo^Viewer", "ISO_IR 192", "19640101", "F")


@dataclass
class Site:
    server: Server
    studies: dict[str, Dataset]
    stock_port: int  # where a viewer of another origin is served (CORS allows it)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"


def _store(port: int, datasets: list[Dataset]) -> None:
    ae = MendedAE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="FILMLESS")
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()


# Studies whose AI report each browser test opens: task -> the study's key in Site.
SCREENED = {"chest-xray": "cxr", "fundus": "eyes", "mammography": "breasts"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("viewer")
    install(root / "viewer")
    cxr, _ = chest_dx(Rng(71), CXR, 0.2, "20260501", "V1")
    j2k = encode(mammography(Rng(72), J2K, 0.1, "20260502", "V2")[0], JPEG2000Lossless)
    rgb = encode(fundus_op(Rng(73), RGB, 0.2, "20260503", "V3")[0], JPEGBaseline8Bit)
    eyes = fundus_op(Rng(74), EYES, 0.25, "20260504", "V4")
    breasts = mammography(Rng(75), BREASTS, 0.12, "20260505", "V5")
    stock_port = free_port()
    server = Server(
        root / "data",
        FILMLESS_MODELS_DIR=str(demo_models),
        FILMLESS_VIEWER_DIR=str(root / "viewer"),
        FILMLESS_SCREENING="true",
        FILMLESS_STUDY_STABLE_SECONDS="1",
        FILMLESS_CORS_ORIGINS=f"http://127.0.0.1:{stock_port}",
    )
    server.start()
    try:
        _store(server.port, [cxr, j2k, rgb, *eyes, *breasts])
        studies = {"cxr": cxr, "j2k": j2k, "rgb": rgb, "eyes": eyes[0], "breasts": breasts[0]}
        for key in SCREENED.values():
            _wait_for_report(server, studies[key].StudyInstanceUID)
        yield Site(server, studies, stock_port)
    finally:
        assert server.stop() == 0, server.output.decode(errors="replace")[-3000:]


def _wait_for_report(server: Server, study: str) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        url = f"{server.url}/studies/{study}/series"
        if httpx.get(url, params={"Modality": "SR"}).json():
            return
        time.sleep(0.5)
    raise AssertionError(f"no AI report for study {study}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Tab:
    """A page that records every request that failed or got an error status, and the
    errors the viewer met (uncaught, or caught by its error boundary)."""

    page: Page
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.page.close()


def _open(browser: Browser, url: str) -> Tab:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    tab = Tab(page)

    def on_response(response: Response) -> None:
        if response.status >= 400:
            tab.failed.append(f"{response.status} {response.url}")

    def on_failed(request: Request) -> None:
        # Requests still in flight when the test closes the page are aborted, not failed.
        if request.failure != "net::ERR_ABORTED":
            tab.failed.append(f"{request.failure} {request.url}")

    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.on("console", lambda m: tab.errors.append(m.text) if "Error Boundary" in m.text else None)
    page.goto(url)
    return tab


def _skip_tour(page: Page, timeout: float = 10_000) -> None:
    """OHIF greets a first visit with a guided tour over the viewport."""
    skip = page.get_by_text("Skip all", exact=True)
    with contextlib.suppress(PlaywrightTimeout):
        skip.click(timeout=timeout)


def _not_blank(png: bytes) -> float:
    """Standard deviation of the screenshot's grey levels (a blank canvas is ~0)."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float(grey.std())


def _save(name: str, png: bytes) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.png").write_bytes(png)


def test_study_list_shows_the_stored_studies(browser: Browser, site: Site) -> None:
    tab = _open(browser, f"{site.root}/viewer/")
    for ds in site.studies.values():
        family = str(ds.PatientName).split("^")[0]
        tab.page.get_by_text(family, exact=False).first.wait_for(timeout=60_000)
    _save("study-list", tab.page.screenshot())
    tab.close()
    assert tab.failed == []


@pytest.mark.parametrize("name", ["cxr", "j2k", "rgb"])
def test_each_image_is_drawn(browser: Browser, site: Site, name: str) -> None:
    study = site.studies[name].StudyInstanceUID
    tab = _open(browser, f"{site.root}/viewer/viewer?StudyInstanceUIDs={study}")
    canvas = tab.page.locator("canvas.cornerstone-canvas").first
    canvas.wait_for(timeout=90_000)
    _skip_tour(tab.page)
    spread = 0.0
    deadline = time.monotonic() + 60
    while spread < 5 and time.monotonic() < deadline:
        time.sleep(1)
        spread = _not_blank(canvas.screenshot())
    _save(f"viewer-{name}", tab.page.screenshot())
    tab.close()
    assert spread >= 5, f"the {name} viewport stayed blank"
    assert tab.failed == []


def _annotation_pixels(png: bytes) -> int:
    """Pixels in the colours OHIF draws measurements with, yellow (the active one) and
    green (the others): the images are grey or, for a fundus, orange."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    yellow = (red > 180) & (green > 180) & (blue < 100)
    bright_green = (green > 180) & (red < 120) & (blue < 120)
    return int((yellow | bright_green).sum())


def _viewer_ready(page: Page) -> None:
    page.locator("canvas.cornerstone-canvas").first.wait_for(timeout=90_000)
    _skip_tour(page)


def _open_report(page: Page, task: str, label: Locator) -> bool:
    """Double-clicks the task's AI report until its labels show."""
    report = page.get_by_text(f"AI {task}", exact=False).first
    report.wait_for(timeout=60_000)
    # While the study panel still re-renders (a loaded machine), a double click can land
    # on a thumbnail that is being replaced; the viewer then ignores it. The guided tour
    # can also open late, over the panel.
    for _ in range(2):
        _skip_tour(page, timeout=1_000)
        report.dblclick()
        with contextlib.suppress(PlaywrightTimeout):
            label.wait_for(timeout=20_000)
            return True
    return False


@pytest.mark.parametrize("task", list(SCREENED))
def test_each_task_report_is_drawn_on_its_image(browser: Browser, site: Site, task: str) -> None:
    """Opening the report draws its first group on the image: a positive chest finding
    where its evidence is, an eye's field of view with its grade, a breast with its
    category; the numbers are listed under their names."""
    study = site.studies[SCREENED[task]].StudyInstanceUID
    tab = _open(browser, f"{site.root}/viewer/viewer?StudyInstanceUIDs={study}")
    page = tab.page
    _viewer_ready(page)
    before = _annotation_pixels(page.screenshot())
    first = _first_group_label(site, study)
    label = page.get_by_text(first, exact=False).first
    assert _open_report(page, task, label), f"the {task} report opened without its drawing"
    time.sleep(2)
    shot = page.screenshot()
    _save(f"ai-report-{task}", shot)
    tab.close()
    assert _annotation_pixels(shot) > before + 500
    assert tab.failed == []


def _first_group_label(site: Site, study: str) -> str:
    """The name of the first number of the report's first group (the one a viewer opens
    at, which has a region), read back through DICOMweb: what the viewer labels it with."""
    base = site.server.url
    reports = httpx.get(f"{base}/studies/{study}/series", params={"Modality": "SR"}).json()
    series_uid = reports[0]["0020000E"]["Value"][0]
    instances = httpx.get(f"{base}/studies/{study}/series/{series_uid}/instances").json()
    sop = instances[0]["00080018"]["Value"][0]
    response = httpx.get(
        f"{base}/studies/{study}/series/{series_uid}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    ((_, body),) = parts(response)
    sr = pydicom.dcmread(io.BytesIO(body))
    (drawn,) = [
        item
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    first = drawn.ContentSequence[0]
    items = first.get("ContentSequence", [])
    assert any(i.ValueType == "SCOORD" for i in items), "the first group has no region"
    return next(
        str(i.ConceptNameCodeSequence[0].CodeMeaning) for i in items if i.ValueType == "NUM"
    )


class _SinglePageApp(http.server.SimpleHTTPRequestHandler):
    """A static server as a hospital deploys a viewer: every path that is no file is
    the app's index.html."""

    def send_head(self):  # type: ignore[no-untyped-def]
        if not Path(self.translate_path(self.path.split("?")[0])).exists():
            self.path = "/index.html"
        return super().send_head()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def stock_viewer(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """OHIF 3.13.2 as published (none of the bundled copy's adaptations), served from its
    own origin and configured for this server's DICOMweb, as a hospital deploys it."""
    work = tmp_path_factory.mktemp("stock-viewer")
    npm = shutil.which("npm")
    assert npm is not None
    dist = work / "dist"
    _unpack(_pack(npm, work, 900), dist)
    base = f"{site.root}/dicom-web"
    (dist / "app-config.js").write_text(
        f"""window.config = {{
  routerBasename: '/', extensions: [], modes: [], showStudyList: true,
  defaultDataSourceName: 'dicomweb', investigationalUseDialog: {{ option: 'never' }},
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'dicomweb',
    configuration: {{
      friendlyName: 'filmless', name: 'filmless', wadoUriRoot: '{base}/wado',
      qidoRoot: '{base}', wadoRoot: '{base}', qidoSupportsIncludeField: false,
      imageRendering: 'wadors', thumbnailRendering: 'wadors', enableStudyLazyLoad: true,
      supportsFuzzyMatching: false, supportsWildcard: true, staticWado: false,
      singlepart: 'bulkdata,video', bulkDataURI: {{ enabled: true }},
      omitQuotationForMultipartRequest: true,
    }},
  }}],
}};
"""
    )
    handler = functools.partial(_SinglePageApp, directory=str(dist))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", site.stock_port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{site.stock_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_stock_viewer_of_another_origin_reads_the_chest_report_at_every_load(
    browser: Browser, site: Site, stock_viewer: str
) -> None:
    """OHIF 3.13.2 as published reads every group of Imaging Measurements and stopped,
    with a TypeError, at the first one without a region; the report keeps those groups
    in Qualitative Evaluations (TID 1500), so the stock viewer opens it, as its prompt
    to track the report's measurements shows, with no error, at every load.

    Whether it then draws the regions is OHIF's own race: when the image is already on
    screen, the SR viewport can render before it is told which measurements to show, and
    nothing renders it again (2 of 6 loads drew here, the same report from Orthanc 0 of
    6); the bundled copy renders again once it knows (filmless.viewer)."""
    study = site.studies["cxr"].StudyInstanceUID
    for load in range(5):
        tab = _open(browser, f"{stock_viewer}/viewer?StudyInstanceUIDs={study}")
        _viewer_ready(tab.page)
        report = tab.page.get_by_text("AI chest-xray", exact=False).first
        report.wait_for(timeout=60_000)
        prompt = tab.page.get_by_text("continue tracking measurements", exact=False)
        opened = False
        for _ in range(2):  # a double click on a thumbnail still being replaced is lost
            _skip_tour(tab.page, timeout=1_000)
            report.dblclick()
            with contextlib.suppress(PlaywrightTimeout):
                prompt.wait_for(timeout=20_000)
                opened = True
                break
        _save(f"stock-viewer-{load}", tab.page.screenshot())
        tab.close()
        assert tab.errors == [], f"load {load}"
        assert opened, f"load {load}: the report was not read"


def _overlay_pixels(png: bytes) -> int:
    """Strongly coloured pixels inside a viewport (not its coloured frame): the colour
    map of a parametric map over a grey image."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    rows, columns = rgb.shape[:2]
    inner = rgb[rows // 10 : rows - rows // 10, columns // 10 : columns - columns // 10]
    return int((inner.max(axis=-1) - inner.min(axis=-1) > 60).sum())


@pytest.mark.parametrize("viewer", ["bundled", "stock"])
def test_the_heatmap_of_a_chest_finding_is_overlaid_on_the_radiograph(
    browser: Browser, site: Site, stock_viewer: str, viewer: str
) -> None:
    """The Parametric Map of the most probable positive finding (PS3.3 A.75), in its own
    series, is a display set of its own (OHIF's ``cornerstone-dicom-pmap``); opened, it
    is drawn in colour over the radiograph it was computed on, in the bundled viewer and
    in a stock OHIF of another origin."""
    study = site.studies["cxr"].StudyInstanceUID
    maps = httpx.get(
        f"{site.server.url}/studies/{study}/instances",
        params={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.30"},
    ).json()
    assert maps, "the chest report has no heatmap"
    root = f"{site.root}/viewer" if viewer == "bundled" else stock_viewer
    tab = _open(browser, f"{root}/viewer?StudyInstanceUIDs={study}")
    page = tab.page
    _viewer_ready(page)
    canvas = page.locator("canvas.cornerstone-canvas").first
    before = _overlay_pixels(canvas.screenshot())
    thumbnail = page.get_by_text("PMAP", exact=True).first
    thumbnail.wait_for(timeout=60_000)
    coloured = 0
    for _ in range(2):  # a double click on a thumbnail still being replaced is lost
        _skip_tour(page, timeout=1_000)
        thumbnail.dblclick()
        deadline = time.monotonic() + 30
        while coloured < 2_000 and time.monotonic() < deadline:
            time.sleep(1)
            coloured = _overlay_pixels(page.locator("canvas.cornerstone-canvas").first.screenshot())
        if coloured >= 2_000:
            break
    shot = page.screenshot()
    _save(f"ai-heatmap-chest-xray-{viewer}", shot)
    tab.close()
    assert before < 100, "the radiograph alone is grey"
    assert coloured >= 2_000, f"no colour overlay ({coloured} coloured pixels)"
    assert tab.errors == []
    assert tab.failed == []
