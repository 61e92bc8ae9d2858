"""The one typed settings object, from ``filmless.toml`` and ``FILMLESS_*`` variables.

Precedence, highest first: keyword overrides (tests, CLI flags), environment variables,
the TOML file named by ``--config``, the embedded defaults. The defaults run a complete
archive on one machine: SQLite and files under ``./data``, listening on loopback only.
"""

from __future__ import annotations

import inspect
import ipaddress
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from dicomweb.app import create_app
from dicomweb.auth import parse_tokens
from pacs.dimse.server import DimseConfig
from pacs.forward import destination
from pacs.index import DuplicatePolicy, PatientPolicy
from pacs.routes import Trigger, check_route

# The DIMSE server's and the DICOMweb app's own defaults are the settings' defaults
# (one definition of each).
_DIMSE: dict[str, Any] = {f.name: f.default for f in fields(DimseConfig)}
_HTTP: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(create_app).parameters.items()
}


class RouteSettings(BaseModel):
    """One routing rule (``[routes.NAME]``): what goes where, and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    destination: str = Field(description='"AE@host:port" (C-STORE) or a DICOMweb base URL')
    token: str = Field("", description="bearer token for a DICOMweb destination")
    match: dict[str, list[str]] = Field(
        default_factory=dict,
        description="keyword = accepted values (wildcards, date ranges), all must match; "
        "also SourceApplicationEntityTitle and origin",
    )
    trigger: Trigger = Field(
        "instance", description="instance: as each arrives; stable: the study once stable"
    )
    max_concurrent: int = Field(2, ge=1, le=16, description="sends at once to it, at most")
    retry_seconds: float = Field(
        5.0, gt=0, description="pause before a failed send is tried again (doubles each time)"
    )


class Settings(BaseSettings):
    """Everything an operator can set; see ``filmless config show`` for the effective values."""

    model_config = SettingsConfigDict(env_prefix="FILMLESS_", extra="forbid", frozen=True)

    data_dir: Path = Field(Path("data"), description="blobs, staging files and the SQLite index")
    index_url: str = Field(
        "", description="SQLAlchemy URL of the index; empty = SQLite in data_dir"
    )
    s3_bucket: str = Field(
        "",
        description="S3-compatible bucket the blobs go to; empty = files under data_dir/objects",
    )
    s3_endpoint: str = Field(
        "", description="the object storage's URL (SeaweedFS, MinIO, ...); empty = AWS"
    )
    s3_prefix: str = Field("", description="key prefix of this archive's objects in the bucket")
    s3_region: str = Field("", description="the bucket's region; empty = AWS_REGION or us-east-1")
    s3_access_key_id: str = Field(
        "", description="empty = AWS_ACCESS_KEY_ID, the instance's or pod's role"
    )
    s3_secret_access_key: str = Field("", description="secret of s3_access_key_id")
    role: Literal["all", "worker"] = Field(
        "all",
        description="all: DIMSE, DICOMweb and screening; worker: screening only, no ports "
        "(needs a shared index and s3_bucket)",
    )
    models_dir: Path = Field(
        Path(""), description="installed models (ONNX + manifest); empty = data_dir/models"
    )
    audit_log: Path = Field(
        Path(""), description="JSON-lines audit trail (PS3.15 fields); empty = data_dir/audit.jsonl"
    )
    viewer_dir: Path = Field(
        Path(""), description="the OHIF viewer's files, served at /viewer/; empty = data_dir/viewer"
    )
    ae_title: str = Field(_DIMSE["ae_title"], description="our AE title")
    bind_address: str = Field(
        _DIMSE["bind_address"], description="address DIMSE and HTTP listen on"
    )
    dimse_port: int = Field(_DIMSE["port"], ge=1, le=65535)
    http_port: int = Field(8080, ge=1, le=65535)
    allowed_calling_aets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="calling AE titles accepted at association time; empty = any",
    )
    max_associations: int = Field(
        _DIMSE["max_associations"], ge=1, description="concurrent DIMSE associations"
    )
    max_associations_per_host: int = Field(
        _DIMSE["max_associations_per_host"],
        ge=1,
        description="concurrent DIMSE associations from one peer address",
    )
    max_pending_connections: int = Field(
        _DIMSE["max_pending_connections"],
        ge=1,
        description="connections per DIMSE process still sending A-ASSOCIATE-RQ",
    )
    max_pending_per_host: int = Field(
        _DIMSE["max_pending_per_host"],
        ge=1,
        description="connections from one peer address still sending A-ASSOCIATE-RQ",
    )
    check_called_aet: bool = Field(
        _DIMSE["check_called_aet"],
        description="refuse associations that call another AE title than ae_title",
    )
    allow_open_dimse: bool = Field(
        False,
        description="let DIMSE listen on an address other than loopback without "
        "calling_aets_by_network or TLS client certificates",
    )
    handshake_timeout: float = Field(
        _DIMSE["handshake_timeout"],
        gt=0,
        description="seconds a new connection has for TLS and its A-ASSOCIATE-RQ",
    )
    calling_aets_by_network: dict[str, list[str]] = Field(
        default_factory=dict,
        description='calling AE titles allowed per network: "10.1.0.0/16" = ["CT1", "CR2"] '
        '("*" = any); empty = any peer',
    )
    tls_cert: str = Field(
        _DIMSE["tls_cert"], description="PEM certificate chain: DIMSE speaks only TLS when set"
    )
    tls_key: str = Field(_DIMSE["tls_key"], description="PEM private key of tls_cert")
    tls_client_ca: str = Field(
        _DIMSE["tls_client_ca"],
        description="PEM CA file: DIMSE peers must present a certificate it signed",
    )
    dimse_workers: int = Field(
        0, ge=0, description="processes storing DIMSE instances; 0 = one per CPU core"
    )
    acse_timeout: float = Field(
        _DIMSE["acse_timeout"], gt=0, description="seconds to wait for A-ASSOCIATE"
    )
    dimse_timeout: float = Field(
        _DIMSE["dimse_timeout"], gt=0, description="seconds to wait for a DIMSE message"
    )
    network_timeout: float = Field(
        _DIMSE["network_timeout"], gt=0, description="seconds an idle association lives"
    )
    max_pdu: int = Field(
        _DIMSE["max_pdu"], ge=0, description="largest P-DATA PDU we accept, bytes (0 = no limit)"
    )
    max_identifier_bytes: int = Field(
        _DIMSE["max_identifier_bytes"],
        ge=1024,
        description="largest C-FIND/C-MOVE/C-GET identifier, bytes (larger: A-ABORT)",
    )
    max_query_keys: int = Field(
        _DIMSE["max_query_keys"],
        ge=8,
        description="attributes one C-FIND or QIDO-RS request may name (matching, return "
        "keys, includefield); more: 0xA700 / 400",
    )
    max_answer_bytes: int = Field(
        _HTTP["max_answer_bytes"],
        ge=1 << 20,
        description="largest QIDO-RS answer body, bytes (larger: 400)",
    )
    max_find_matches: int = Field(
        _DIMSE["max_find_matches"],
        ge=1,
        description="C-FIND answers at most this many matches, else 0xA700",
    )
    move_destinations: dict[str, str] = Field(
        default_factory=dict, description='C-MOVE destinations: AE title = "host:port"'
    )
    max_concurrent_uploads: int = Field(
        _HTTP["max_uploads"], ge=1, description="STOW-RS requests received at a time (more get 503)"
    )
    max_instance_bytes: int = Field(
        4 << 30,
        ge=1 << 20,
        description="largest data set stored, bytes, after inflation for a deflated one "
        "(C-STORE 0xA700, STOW-RS FailureReason 0xA700)",
    )
    max_pixels: int = Field(
        1 << 27,
        ge=1 << 16,
        description="largest frame decoded, Rows x Columns x SamplesPerPixel (rendered, "
        "frames, screening); beyond it 406 or a skipped job",
    )
    max_request_bytes: int = Field(
        _HTTP["max_request_bytes"],
        ge=1,
        description="largest STOW-RS request body, bytes (else HTTP 413)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='other web origins allowed to call DICOMweb ("*" = any); empty = same origin',
    )
    api_tokens: dict[str, str] = Field(
        default_factory=dict,
        description='DICOMweb bearer tokens: name = "read|write|admin:<sha256 of the token>" '
        "(filmless token new); empty = no authentication",
    )
    oidc_jwks_file: str = Field(
        "", description="JWKS file of the identity provider: OIDC access tokens are accepted"
    )
    oidc_issuer: str = Field("", description="the 'iss' OIDC access tokens must carry")
    oidc_audience: str = Field("", description="the 'aud' OIDC access tokens must carry")
    request_timeout: float = Field(
        _HTTP["request_timeout"],
        gt=0,
        description="seconds a DICOMweb request has to arrive and be answered",
    )
    http_max_connections: int = Field(
        1000, ge=1, description="open DICOMweb connections at most (more get 503)"
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names DICOMweb answers besides the loopback names, the bind "
        'address and this machine\'s names ("*" = any); others get 421 (DNS rebinding)',
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="addresses of reverse proxies whose X-Forwarded-For/-Proto are "
        "believed; empty = nobody's (the peer address is the connection's)",
    )
    allow_unauthenticated_bind: bool = Field(
        False, description="serve DICOMweb without tokens on an address other than loopback"
    )
    screening: bool = Field(True, description="run the installed models on what arrives")
    inference_workers: int = Field(
        4,
        ge=0,
        description="threads running screening jobs; more than the passes at a time, so that "
        "reading, preprocessing and storing overlap with inference",
    )
    inference_runs: int = Field(
        0,
        ge=0,
        description="forward passes at a time per model; 0: one per core on the CPU, one on a GPU",
    )
    inference_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per forward pass; 0: the cores shared among "
        "the passes on the CPU, ONNX Runtime's default on a GPU",
    )
    inference_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
        description="ONNX Runtime execution providers, preferred first; missing ones skipped",
    )
    inference_max_batch: int = Field(8, ge=1, description="images per forward pass at most")
    inference_max_wait_ms: float = Field(
        10.0, ge=0, description="how long a forward pass waits for more images"
    )
    study_stable_seconds: float = Field(
        30.0, ge=0, description="a study-level model runs once no image arrived for this long"
    )
    result_destinations: dict[str, str] = Field(
        default_factory=dict,
        description='where reports are also sent: name = "AE@host:port" or a DICOMweb base URL',
    )
    routes: dict[str, RouteSettings] = Field(
        default_factory=dict,
        description="routing rules: what is sent on to other archives (see README)",
    )
    job_max_attempts: int = Field(3, ge=1, description="a failing job stops after this many")
    duplicate_policy: DuplicatePolicy = Field(
        "reject", description="same SOP Instance UID, different content: reject or overwrite"
    )
    patient_conflict: PatientPolicy = Field(
        "reject",
        description="an instance naming a study of another patient: reject it, or update "
        "the study to the instance's patient",
    )
    case_insensitive_names: bool = Field(
        True,
        description="person names match regardless of case and accents without fuzzy "
        "matching (C-FIND and QIDO-RS)",
    )
    screen_without_view_position: bool = Field(
        False,
        description="run the chest X-ray model on a DX/CR image without ViewPosition "
        "(else the job is skipped with the reason)",
    )

    @field_validator(
        "allowed_calling_aets",
        "cors_origins",
        "inference_providers",
        "allowed_hosts",
        "trusted_proxies",
        mode="before",
    )
    @classmethod
    def _split_aets(cls, value: Any) -> Any:
        """Environment variables carry lists as ``A,B,C``; TOML carries real arrays."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        _require_ae_title(value)
        return value

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, value: list[str]) -> list[str]:
        for title in value:
            _require_ae_title(title)
        return value

    @field_validator("move_destinations")
    @classmethod
    def _check_destinations(cls, value: dict[str, str]) -> dict[str, str]:
        for title, address in value.items():
            _require_ae_title(title)
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"move destination {title}: {address!r} is not host:port")
        return value

    @field_validator("calling_aets_by_network")
    @classmethod
    def _check_networks(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for network, titles in value.items():
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"calling_aets_by_network: {exc}") from exc
            for title in titles:
                if title != "*":
                    _require_ae_title(title)
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a file")
        return self

    @field_validator("result_destinations")
    @classmethod
    def _check_results(cls, value: dict[str, str]) -> dict[str, str]:
        for name, address in value.items():
            destination(name, address)
        return value

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, value: dict[str, RouteSettings]) -> dict[str, RouteSettings]:
        for name, route in value.items():
            check_route(name, route.match, route.trigger)
            destination(name, route.destination, route.token)
        return value

    @field_validator("api_tokens")
    @classmethod
    def _check_tokens(cls, value: dict[str, str]) -> dict[str, str]:
        parse_tokens(value)
        return value

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        if self.oidc_jwks_file:
            if not self.oidc_issuer or not self.oidc_audience:
                raise ValueError("oidc_jwks_file needs oidc_issuer and oidc_audience")
            if not Path(self.oidc_jwks_file).is_file():
                raise ValueError(f"oidc_jwks_file: {self.oidc_jwks_file} is not a file")
        return self

    @model_validator(mode="after")
    def _exposed_needs_tokens(self) -> Settings:
        authenticated = bool(self.api_tokens or self.oidc_jwks_file)
        exposed = not _loopback(self.bind_address)
        if not authenticated and not self.allow_unauthenticated_bind and exposed:
            raise ValueError(
                f"bind_address {self.bind_address} is reachable from other machines and "
                "no api_tokens or OIDC are set; add tokens (filmless token new) or set "
                "allow_unauthenticated_bind = true"
            )
        return self

    @model_validator(mode="after")
    def _exposed_dimse_needs_a_rule(self) -> Settings:
        """A DIMSE port reachable from other machines serves C-FIND and C-GET of every
        study to any peer that asks: name the peers, or require their certificates."""
        guarded = bool(self.calling_aets_by_network or self.tls_client_ca)
        if not guarded and not self.allow_open_dimse and not _loopback(self.bind_address):
            raise ValueError(
                f"bind_address {self.bind_address} exposes DIMSE to other machines without "
                "an allow-list of peers: set calling_aets_by_network (e.g. "
                '{ "10.1.0.0/16" = ["CT1"] }) or tls_client_ca, or allow_open_dimse = true'
            )
        return self

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        """Every path absolute, once, against the folder the command was started in.

        Parts of the server hand paths to other programs (npm for the viewer) and to
        other processes; a relative path would mean something else to each of them.
        """
        data_dir = self.data_dir.expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        defaults = {"models_dir": "models", "audit_log": "audit.jsonl", "viewer_dir": "viewer"}
        for name, default in defaults.items():
            value: Path = getattr(self, name)
            path = data_dir / default if value == Path("") else value.expanduser().resolve()
            object.__setattr__(self, name, path)
        for name in ("tls_cert", "tls_key", "tls_client_ca", "oidc_jwks_file"):
            if text := getattr(self, name):
                object.__setattr__(self, name, str(Path(text).expanduser().resolve()))
        if not self.index_url:
            object.__setattr__(self, "index_url", f"sqlite:///{data_dir / 'index.sqlite'}")
        url = make_url(self.index_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            database = str(Path(url.database).expanduser().resolve())
            object.__setattr__(self, "index_url", url.set(database=database).render_as_string())
        if self.role == "worker" and (url.get_backend_name() == "sqlite" or not self.s3_bucket):
            raise ValueError(
                "role worker runs beside other nodes: it needs an index they share "
                "(index_url = postgresql+psycopg://...) and object storage (s3_bucket)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _require_ae_title(value: str) -> None:
    """PS3.5 AE: 1-16 characters of the default repertoire, no backslash, not all spaces."""
    if not value.strip() or len(value) > 16 or "\\" in value or not value.isascii():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 ASCII characters)")
    if any(ord(c) < 0x20 for c in value):
        raise ValueError(f"{value!r} is not a valid AE title (control characters)")


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, reading ``config`` when given (a missing file is an error)."""
    if config is None:
        return Settings(**overrides)
    if not config.is_file():
        raise FileNotFoundError(f"configuration file {config} does not exist")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config)

    return _FromFile(**overrides)


HIDDEN = "***"


def to_toml(settings: Settings, *, secrets: bool = False) -> str:
    """The effective settings as TOML that ``--config`` reads back unchanged.

    Unless ``secrets``, the bearer tokens of routes and the passwords inside URLs (the
    index's, a destination's) are printed as ``***``: the output ends up in tickets and
    chat, as dcm4chee's and Orthanc's configuration dumps hide theirs.
    """
    shown = settings if secrets else _hide_secrets(settings)
    lines = []
    for name, field in Settings.model_fields.items():
        value = getattr(shown, name)
        if field.description:
            lines.append(f"# {field.description}")
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _hide_secrets(settings: Settings) -> Settings:
    routes = {
        name: route.model_copy(
            update={
                "destination": _hide_password(route.destination),
                "token": HIDDEN if route.token else "",
            }
        )
        for name, route in settings.routes.items()
    }
    return settings.model_copy(
        update={
            "index_url": _hide_password(settings.index_url),
            "s3_secret_access_key": HIDDEN if settings.s3_secret_access_key else "",
            "result_destinations": {
                name: _hide_password(address)
                for name, address in settings.result_destinations.items()
            },
            "routes": routes,
        }
    )


def _hide_password(url: str) -> str:
    """``scheme://user:***@host...``; anything without a password as it is."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{HIDDEN}@{netloc}"))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, BaseModel):
        return _toml_value(value.model_dump())
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
