"""Bearer tokens on the DICOMweb API: static API tokens or OIDC access tokens (JWT).

Static tokens have a read, write or admin scope; only the SHA-256 of each is
configured, never the token itself, so the settings file gives nothing away. An OIDC
access token is a JWT from the hospital's identity provider, checked offline against
the provider's published keys (a JWKS file), its issuer, audience and expiry; its
``scope`` (or ``scp``) claim grants ``filmless:read``, ``filmless:write`` or
``filmless:admin``. Only asymmetric signatures with the algorithm of the signing key
are accepted, so neither ``alg: none`` nor an HMAC made with a public key gets in.

Reading (GET, HEAD) needs ``read``, storing (POST) ``write``, deleting ``admin``; each
scope includes the ones before it. A missing or unknown token is 401 with
``WWW-Authenticate: Bearer``, a token without the scope 403. The check runs in front of
every route under the API's base path, before any body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomweb.asgi import send_error
from pacs.errors import Forbidden, PacsError, Unauthenticated

SCOPES = ("read", "write", "admin")
_NEEDED = {"GET": "read", "HEAD": "read", "POST": "write", "DELETE": "admin"}


@dataclass(frozen=True)
class ApiToken:
    name: str
    scope: str
    sha256: str


def parse_tokens(configured: Mapping[str, str]) -> list[ApiToken]:
    """``name = "scope:sha256hex"`` entries; ``ValueError`` with the reason otherwise."""
    tokens = []
    for name, value in configured.items():
        scope, _, digest = value.partition(":")
        if scope not in SCOPES:
            raise ValueError(f"token {name}: scope {scope!r} is not one of {', '.join(SCOPES)}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"token {name}: expected {scope}:<64 lower-case hex digits>")
        tokens.append(ApiToken(name, scope, digest))
    return tokens


def new_token() -> tuple[str, str]:
    """A fresh token and the SHA-256 to configure for it."""
    token = secrets.token_urlsafe(32)
    return token, digest(token)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


OIDC_SCOPES = {f"filmless:{scope}": scope for scope in SCOPES}
_ASYMMETRIC = ("RS", "PS", "ES", "Ed")


class OidcVerifier:
    """Access tokens of one identity provider (issuer) meant for us (audience)."""

    def __init__(self, jwks: Path, *, issuer: str, audience: str, leeway: float = 30) -> None:
        try:
            self.keys = jwt.PyJWKSet.from_dict(json.loads(jwks.read_text()))
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise ValueError(f"JWKS file {jwks}: {exc}") from exc
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def _key(self, token: str) -> jwt.PyJWK:
        kid = jwt.get_unverified_header(token).get("kid")
        keys = self.keys.keys
        if kid is None and len(keys) == 1:
            return keys[0]
        for key in keys:
            if key.key_id == kid:
                return key
        raise Unauthenticated("the token is signed by a key the identity provider does not list")

    def verify(self, token: str) -> ApiToken:
        """The caller (``oidc:<sub>``) and the highest scope the token grants."""
        try:
            key = self._key(token)
            if not key.algorithm_name.startswith(_ASYMMETRIC):
                raise Unauthenticated(f"signing algorithm {key.algorithm_name} is not accepted")
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the token has expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token is not valid: {exc}") from exc
        granted = claims.get("scope", claims.get("scp", ""))
        names = granted.split() if isinstance(granted, str) else list(granted)
        scopes = [OIDC_SCOPES[n] for n in names if n in OIDC_SCOPES]
        name = f"oidc:{claims['sub']}"
        if not scopes:
            raise Forbidden(f"{name} has none of the scopes {', '.join(OIDC_SCOPES)}", name)
        return ApiToken(name, max(scopes, key=SCOPES.index), "")


def authorize(
    tokens: list[ApiToken],
    authorization: str | None,
    method: str,
    oidc: OidcVerifier | None = None,
) -> ApiToken:
    """The token that allows ``method``; raises :class:`Unauthenticated` / :class:`Forbidden`."""
    kind, _, credentials = (authorization or "").partition(" ")
    credentials = credentials.strip()
    if kind.lower() != "bearer" or not credentials:
        raise Unauthenticated("a bearer token is required")
    if oidc is not None and credentials.count(".") == 2:
        token = oidc.verify(credentials)
    else:
        presented = digest(credentials)
        # Compare against every token in constant time: no early exit tells which is near.
        matches = [t for t in tokens if hmac.compare_digest(t.sha256, presented)]
        if not matches:
            raise Unauthenticated("the bearer token is not valid")
        token = matches[0]
    needed = _NEEDED.get(method.upper(), "admin")
    if SCOPES.index(token.scope) < SCOPES.index(needed):
        raise Forbidden(
            f"token {token.name} has scope {token.scope}; {method} needs {needed}", token.name
        )
    return token


class BearerAuth:
    """ASGI middleware: requests under one of ``prefixes`` need a token; others pass
    untouched."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: list[ApiToken],
        prefixes: Sequence[str],
        oidc: OidcVerifier | None = None,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.prefixes = tuple(prefixes)
        self.oidc = oidc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        inside = any(path == p or path.startswith(p + "/") for p in self.prefixes)
        # CORS preflights carry no credentials by design; the CORS middleware answers them.
        if scope["type"] != "http" or not inside or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            token = authorize(self.tokens, headers.get("authorization"), scope["method"], self.oidc)
        except PacsError as exc:
            if isinstance(exc, Forbidden) and exc.who:
                # The audit trail names who was refused, not "anonymous".
                scope.setdefault("state", {})["token"] = exc.who
            challenge = ((b"www-authenticate", b'Bearer realm="filmless"'),)
            await send_error(send, exc, challenge if exc.http_status == 401 else ())
            return
        scope.setdefault("state", {})["token"] = token.name
        await self.app(scope, receive, send)
