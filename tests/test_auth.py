"""Bearer tokens on every DICOMweb route, and no unauthenticated API off loopback."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from dicomweb.app import create_app
from dicomweb.auth import ApiToken, authorize, digest, new_token, parse_tokens
from filmless.cli import main
from filmless.settings import load_settings
from pacs.archive import Archive
from pacs.errors import Forbidden, Unauthenticated
from tests.support.web import serving

READ, WRITE, ADMIN = "read-token", "write-token", "admin-token"
TOKENS = [
    ApiToken("viewer", "read", digest(READ)),
    ApiToken("modality", "write", digest(WRITE)),
    ApiToken("operator", "admin", digest(ADMIN)),
]
UID = "1.2.826.0.1.3680043.10.1"


def test_scopes_include_the_ones_below() -> None:
    assert authorize(TOKENS, f"Bearer {READ}", "GET").name == "viewer"
    assert authorize(TOKENS, f"bearer {ADMIN}", "DELETE").name == "operator"
    assert authorize(TOKENS, f"Bearer {WRITE}", "GET").name == "modality"
    with pytest.raises(Forbidden, match="needs write"):
        authorize(TOKENS, f"Bearer {READ}", "POST")
    with pytest.raises(Forbidden, match="needs admin"):
        authorize(TOKENS, f"Bearer {WRITE}", "DELETE")
    for header in (None, "", "Bearer ", f"Basic {READ}", "Bearer nope"):
        with pytest.raises(Unauthenticated):
            authorize(TOKENS, header, "GET")


def test_configured_tokens_are_checked() -> None:
    token, sha256 = new_token()
    (parsed,) = parse_tokens({"ris": f"write:{sha256}"})
    assert parsed == ApiToken("ris", "write", digest(token))
    with pytest.raises(ValueError, match="scope"):
        parse_tokens({"ris": f"root:{sha256}"})
    with pytest.raises(ValueError, match="hex"):
        parse_tokens({"ris": f"read:{token}"})  # the token itself, not its digest


def _routes(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, concrete path) of every API route in the OpenAPI description, with UIDs
    and frame numbers filled in."""
    found = []
    for template, operations in schema["paths"].items():
        if not template.startswith(("/dicom-web", "/changes")):
            continue
        path = re.sub(r"\{frame_list\}|\{frame\}", "1", template)
        path = re.sub(r"\{path(:path)?\}", "7FE00010", path)
        path = re.sub(r"\{[a-z_:]+\}", UID, path)
        found += [(method.upper(), path) for method in operations]
    return found


def test_every_route_needs_a_token_with_the_scope(archive: Archive) -> None:
    app = create_app(archive, api_tokens=TOKENS, viewer_dir=Path("/nonexistent"))
    routes = _routes(app.openapi())
    methods = {m for m, _ in routes}
    assert {"GET", "POST", "DELETE"} <= methods
    assert len(routes) >= 25  # QIDO, WADO (+ rendered, thumbnails), STOW, DELETE
    with serving(app) as url:
        root = url.removesuffix("/dicom-web")
        with httpx.Client(base_url=root, timeout=30) as client:
            for method, path in routes:
                bare = client.request(method, path)
                assert bare.status_code == 401, (method, path)
                assert bare.headers["www-authenticate"].startswith("Bearer")
                wrong = client.request(method, path, headers={"Authorization": "Bearer x"})
                assert wrong.status_code == 401, (method, path)
                weakest = {"GET": None, "HEAD": None, "POST": READ, "DELETE": WRITE}[method]
                if weakest is not None:
                    low = client.request(
                        method, path, headers={"Authorization": f"Bearer {weakest}"}
                    )
                    assert low.status_code == 403, (method, path)
                allowed = client.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"})
                assert allowed.status_code not in (401, 403), (method, path, allowed.text)
            # The viewer's files carry no patient data and are not behind the tokens.
            assert client.get("/viewer/").status_code == 404
            assert client.get("/dicom-web/studies").status_code == 401


def test_no_open_api_off_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match="api_tokens"):
        load_settings(data_dir=tmp_path, bind_address="0.0.0.0")
    load_settings(data_dir=tmp_path, bind_address="127.0.0.2")
    load_settings(data_dir=tmp_path, bind_address="::1")
    # (The DIMSE side has its own rule: test_no_open_dimse_off_loopback.)
    load_settings(
        data_dir=tmp_path,
        bind_address="0.0.0.0",
        allow_unauthenticated_bind=True,
        allow_open_dimse=True,
    )
    _token, sha256 = new_token()
    load_settings(
        data_dir=tmp_path,
        bind_address="0.0.0.0",
        api_tokens={"a": f"read:{sha256}"},
        allow_open_dimse=True,
    )
    config = tmp_path / "open.toml"
    config.write_text('bind_address = "0.0.0.0"\n')
    assert main(["--config", str(config), "config", "show"]) == 2
    assert "allow_unauthenticated_bind" in capsys.readouterr().err


def test_no_open_dimse_off_loopback(tmp_path: Path) -> None:
    """DICOMweb tokens do not guard DIMSE: an exposed DIMSE port needs its own rule."""
    _token, sha256 = new_token()
    tokens = {"a": f"read:{sha256}"}
    with pytest.raises(ValidationError, match="calling_aets_by_network"):
        load_settings(data_dir=tmp_path, bind_address="10.0.0.5", api_tokens=tokens)
    load_settings(
        data_dir=tmp_path,
        bind_address="10.0.0.5",
        calling_aets_by_network={"10.1.0.0/16": ["CT1"]},
        api_tokens=tokens,
    )
    load_settings(
        data_dir=tmp_path, bind_address="10.0.0.5", allow_open_dimse=True, api_tokens=tokens
    )


def test_token_new_prints_a_working_settings_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "new", "--name", "ris", "--scope", "write"]) == 0
    token, line = capsys.readouterr().out.splitlines()
    config = tmp_path / "filmless.toml"
    config.write_text(f"[api_tokens]\n{line}\n")
    (parsed,) = parse_tokens(load_settings(config).api_tokens)
    assert authorize([parsed], f"Bearer {token}", "POST").name == "ris"
