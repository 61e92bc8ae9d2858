"""``filmless viewer install``: the OHIF Viewer, pinned, fetched with npm, served at /viewer/.

The ``@ohif/app`` package carries the prebuilt static app in ``dist/``. Only that
package is fetched (``npm pack``: its integrity is checked against the pinned one), not
its build dependencies. The build expects to be served at ``/``; the install rewrites
its few absolute references (the page's links, ``PUBLIC_URL``, webpack's public path)
to ``/viewer/`` and writes an ``app-config.js`` whose DICOMweb data source is this
server's own ``/dicom-web`` on the same origin, so no CORS is needed. One line is added
to the SR viewport so that an AI report is always drawn when it is opened (see
:func:`_redraw_after_sr_selection`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from models.store import install_folder

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = (
    "sha512-"
    "WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)
BASE = "/viewer/"
_MARKER = ".filmless-ohif"
# Raised whenever :func:`patch` changes, so that an install adapted by an older one is
# fetched and adapted again by ``make serve`` instead of being kept.
_ADAPTATION = 3
_STAMP = f"{OHIF_VERSION}+filmless.{_ADAPTATION}"
HOW_TO = (
    "the OHIF viewer is not installed: install npm (apt-get install npm, or Node.js from "
    "nodejs.org) and run `filmless viewer install` (`make serve` runs it)"
)


class ViewerError(RuntimeError):
    """The viewer could not be installed; the message says why and what to do."""


def installed(folder: Path) -> bool:
    marker = folder / _MARKER
    return marker.is_file() and marker.read_text().strip() == _STAMP


def install(folder: Path, *, npm: str | None = None, timeout: float = 900) -> Path:
    """Fetch, check, unpack and adapt the viewer into ``folder`` (replacing what is there)."""
    npm = npm or shutil.which("npm")
    if npm is None:
        raise ViewerError(HOW_TO)
    # npm runs in the scratch folder: every path it is given must not depend on that.
    folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".viewer-") as scratch:
        work = Path(scratch)
        package = _pack(npm, work, timeout)
        staging = work / "dist"
        _unpack(package, staging)
        patch(staging)
        (staging / "app-config.js").write_text(app_config())
        (staging / _MARKER).write_text(_STAMP + "\n")
        install_folder(staging, folder)
    return folder


def _pack(npm: str, work: Path, timeout: float) -> Path:
    spec = f"{OHIF_PACKAGE}@{OHIF_VERSION}"
    try:
        run = subprocess.run(
            [npm, "pack", spec, "--json", "--pack-destination", str(work)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=work,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ViewerError(f"npm pack {spec} did not finish: {exc}") from exc
    if run.returncode != 0:
        raise ViewerError(f"npm pack {spec} failed: {run.stderr.strip()[-1500:]}")
    try:
        (packed,) = json.loads(run.stdout)
    except ValueError as exc:
        raise ViewerError(f"npm pack {spec}: unexpected answer {run.stdout[-500:]!r}") from exc
    if packed.get("integrity") != OHIF_INTEGRITY:
        raise ViewerError(
            f"{spec} does not have the pinned integrity ({packed.get('integrity')!r}); "
            "refusing to install it"
        )
    return work / str(packed["filename"])


def _unpack(package: Path, target: Path) -> None:
    """``package/dist/*`` of the tarball into ``target``, nothing outside it."""
    with tarfile.open(package) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith("package/dist/") and (member.isfile() or member.isdir()):
                member.name = member.name.removeprefix("package/dist/")
                members.append(member)
        if not any(m.name == "index.html" for m in members):
            raise ViewerError(f"{package.name} has no dist/index.html")
        tar.extractall(target, members=members, filter="data")


def patch(dist: Path) -> None:
    """Make a build for ``/`` run under :data:`BASE`; every rewrite must find its target,
    so that a different build is refused rather than half adapted."""
    index = dist / "index.html"
    html = index.read_text()
    html = _all(html, 'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{BASE}"', "index.html")
    html = re.sub(r'(href|src)="/(?!/)', rf'\1="{BASE}', html)
    # The offline service worker caches under "/"; a viewer under /viewer/ does without.
    html = re.sub(r'<script[^>]*init-service-worker\.js"[^>]*></script>', "", html)
    index.write_text(html)
    # webpack's public path: the app's runtime, and the runtimes of its web workers.
    runtime = '__webpack_require__.p = "/";'
    (bundle,) = dist.glob("app.bundle.*.js")
    if runtime not in bundle.read_text():
        raise ViewerError(f"{bundle.name}: expected {runtime!r}, not found")
    for script in dist.glob("*.js"):
        code = script.read_text()
        if runtime in code:
            script.write_text(code.replace(runtime, f'__webpack_require__.p = "{BASE}";'))
    # Fonts and images named from the style sheets.
    for sheet in dist.glob("*.css"):
        css = sheet.read_text()
        sheet.write_text(re.sub(r"url\((['\"]?)/(?!/)", rf"url(\1{BASE}", css))
    _redraw_after_sr_selection(dist)


# OHIF 3.13's SR viewport tells its drawing tool which measurements to draw only after
# the referenced image is on screen, and nothing draws again until the next render: with
# the image already cached (it was shown before the report was opened) the report opens
# without its findings drawn about one time in four. The viewport is rendered again once
# the tool knows what to draw.
_SR_SELECTION = "function setTrackingUniqueIdentifiersForElement("
_SR_SELECTION_STORED = """  state.trackingIdentifiersByViewportId[viewport.id] = {
    trackingUniqueIdentifiers,
    activeIndex
  };
}"""
_SR_SELECTION_REDRAWN = """  state.trackingIdentifiersByViewportId[viewport.id] = {
    trackingUniqueIdentifiers,
    activeIndex
  };
  viewport.render();
}"""


def _redraw_after_sr_selection(dist: Path) -> None:
    chunks = [script for script in dist.glob("*.js") if _SR_SELECTION in script.read_text()]
    if len(chunks) != 1:
        raise ViewerError(f"expected one script with {_SR_SELECTION!r}, found {len(chunks)}")
    (chunk,) = chunks
    code = _all(chunk.read_text(), _SR_SELECTION_STORED, _SR_SELECTION_REDRAWN, chunk.name)
    chunk.write_text(code)


def _all(text: str, old: str, new: str, where: str) -> str:
    if old not in text:
        raise ViewerError(f"{where}: expected {old!r}, not found")
    return text.replace(old, new)


def app_config() -> str:
    """OHIF's configuration: one DICOMweb source, this server, same origin."""
    return """/** filmless: OHIF reads studies from this server's own DICOMweb service. */
window.config = {
  name: 'filmless',
  routerBasename: '/viewer',
  extensions: [],
  modes: [],
  customizationService: [
    {
      // OHIF reads the first coordinate of every SR measurement it tries to draw;
      // groups without an image region in Imaging Measurements (reports of other
      // systems, and earlier filmless reports) have none. They are left out of the
      // drawing (and stay in the report) instead of stopping the viewer.
      onBeforeSRAddMeasurement: {
        $set: ({ measurement }) =>
          measurement.coords && measurement.coords.length
            ? measurement
            : { ...measurement, coords: [{}] },
      },
    },
  ],
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'filmless',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'filmless',
      configuration: {
        friendlyName: 'filmless',
        name: 'filmless',
        wadoUriRoot: window.location.origin + '/dicom-web/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""
