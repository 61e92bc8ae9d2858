"""The web viewer's static files at /viewer/, with the fallback a single-page app needs.

A path naming a file of the app is that file; any other path without a file extension
is a route of the app (``/viewer/viewer?StudyInstanceUIDs=...``) and gets its
``index.html``; a missing file is a 404, never the page (a script that is HTML breaks
the app in ways hard to see). Hashed bundles are cached for good; the page and the
configuration are revalidated, so that a reinstall is seen at once.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response

_REVALIDATE = {"index.html", "app-config.js", "manifest.json"}


def viewer_router(folder: Path, *, prefix: str = "/viewer", missing: str = "") -> APIRouter:
    """``missing`` is what to tell a browser when the viewer is not installed."""
    router = APIRouter(include_in_schema=False)
    root = folder.resolve()

    @router.get(prefix)
    def to_app() -> Response:
        return RedirectResponse(f"{prefix}/", status_code=308)

    @router.get(f"{prefix}/{{path:path}}")
    def app_file(path: str) -> Response:
        if not (root / "index.html").is_file():
            return PlainTextResponse(missing or "the viewer is not installed", status_code=404)
        parts = PurePosixPath(path).parts
        if ".." in parts or any(p.startswith("/") for p in parts):
            return PlainTextResponse("no such file", status_code=404)
        target = root.joinpath(*parts) if parts else root / "index.html"
        if target.is_file():
            # Only what lies inside the viewer's folder: a link in it to elsewhere (the
            # data folder, the index) is not followed.
            resolved = target.resolve()
            if not resolved.is_relative_to(root):
                return PlainTextResponse(f"no such file: {path}", status_code=404)
            return _file(resolved)
        if not parts or "." not in parts[-1]:
            return _file(root / "index.html")
        return PlainTextResponse(f"no such file: {path}", status_code=404)

    return router


def _file(path: Path) -> FileResponse:
    cache = "no-cache" if path.name in _REVALIDATE else "public, max-age=31536000, immutable"
    if path.suffix == ".wasm":
        return FileResponse(path, media_type="application/wasm", headers={"Cache-Control": cache})
    return FileResponse(path, headers={"Cache-Control": cache})
