"""OIDC access tokens on DICOMweb: JWTs checked against a JWKS file, issuer, audience,
expiry and scopes, over a real server; forged tokens of the usual kinds are refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from dicomweb.app import create_app
from dicomweb.auth import OidcVerifier, authorize
from filmless.settings import load_settings
from pacs.archive import Archive
from pacs.errors import Forbidden, Unauthenticated
from tests.support.web import serving

ISSUER = "https://idp.hospital.test/realms/radiology"
AUDIENCE = "filmless"


def _key_pair() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": _key_pair(), "other": _key_pair(), "ec": ec.generate_private_key(ec.SECP256R1())}


@pytest.fixture
def verifier(keys: dict[str, Any], tmp_path: Path) -> OidcVerifier:
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(keys["rsa"].public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(keys["ec"].public_key()))
    jwks = {
        "keys": [
            {**rsa_jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
            {**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"},
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    return OidcVerifier(path, issuer=ISSUER, audience=AUDIENCE)


def _token(key: Any, kid: str = "rsa-1", algorithm: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


def test_scopes_from_the_token(keys: dict[str, Any], verifier: OidcVerifier) -> None:
    read = _token(keys["rsa"], scope="openid filmless:read")
    assert authorize([], f"Bearer {read}", "GET", verifier).name == "oidc:alice"
    with pytest.raises(Forbidden, match="needs write"):
        authorize([], f"Bearer {read}", "POST", verifier)
    admin = _token(keys["ec"], kid="ec-1", algorithm="ES256", scp=["filmless:admin"])
    assert authorize([], f"Bearer {admin}", "DELETE", verifier).scope == "admin"
    none = _token(keys["rsa"], scope="openid profile")
    with pytest.raises(Forbidden, match="none of the scopes"):
        authorize([], f"Bearer {none}", "GET", verifier)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "expired"),
        ("audience", "(?i)audience"),
        ("issuer", "(?i)issuer"),
        ("other key", "Signature verification failed"),
        ("unknown kid", "does not list"),
        ("alg none", "not valid"),
        ("hmac with the public key", "not valid"),
        ("no subject", "sub"),
        ("garbage", "not valid"),
    ],
)
def test_forged_or_stale_tokens(
    keys: dict[str, Any], verifier: OidcVerifier, case: str, message: str
) -> None:
    scope = {"scope": "filmless:admin"}
    if case == "expired":
        token = _token(keys["rsa"], exp=int(time.time()) - 120, **scope)
    elif case == "audience":
        token = _token(keys["rsa"], aud="another-app", **scope)
    elif case == "issuer":
        token = _token(keys["rsa"], iss="https://evil.test", **scope)
    elif case == "other key":
        token = _token(keys["other"], **scope)
    elif case == "unknown kid":
        token = _token(keys["rsa"], kid="rsa-2", **scope)
    elif case == "alg none":
        head = base64.urlsafe_b64encode(b'{"alg":"none","kid":"rsa-1"}').rstrip(b"=")
        body = _token(keys["rsa"], **scope).split(".")[1]
        token = f"{head.decode()}.{body}."
    elif case == "hmac with the public key":
        public = (
            keys["rsa"]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        token = _hmac_token(public, scope)
    elif case == "no subject":
        token = _token(keys["rsa"], **scope)
        claims = jwt.decode(token, options={"verify_signature": False})
        del claims["sub"]
        token = jwt.encode(claims, keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    else:
        token = "abc.def.ghi"
    with pytest.raises(Unauthenticated, match=message):
        authorize([], f"Bearer {token}", "GET", verifier)


def _hmac_token(secret: bytes, claims: dict[str, Any]) -> str:
    """The classic key confusion: HS256 keyed with the RSA public key (built by hand,
    because PyJWT refuses to sign with a PEM key as HMAC secret)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300, **claims}
    signing = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'rsa-1'}).encode())}"
    signing += f".{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(signature)}"


def test_server_takes_oidc_tokens(
    archive: Archive, keys: dict[str, Any], verifier: OidcVerifier
) -> None:
    app = create_app(archive, oidc=verifier, viewer_dir=Path("/nonexistent"))
    with serving(app) as url, httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/studies").status_code == 401
        read = _token(keys["rsa"], scope="filmless:read")
        headers = {"Authorization": f"Bearer {read}"}
        assert client.get(f"{url}/studies", headers=headers).status_code == 200
        stow = client.post(f"{url}/studies", headers=headers, content=b"")
        assert stow.status_code == 403
        stale = _token(keys["rsa"], scope="filmless:read", exp=int(time.time()) - 120)
        refused = client.get(f"{url}/studies", headers={"Authorization": f"Bearer {stale}"})
        assert refused.status_code == 401
        assert "expired" in refused.json()["error"]


def test_settings_need_issuer_and_audience(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    with pytest.raises(ValidationError, match="oidc_issuer and oidc_audience"):
        load_settings(data_dir=tmp_path, oidc_jwks_file=str(jwks))
    settings = load_settings(
        data_dir=tmp_path,
        bind_address="0.0.0.0",
        allow_open_dimse=True,
        oidc_jwks_file=str(jwks),
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
    )
    assert settings.bind_address == "0.0.0.0"  # OIDC alone is authentication enough
