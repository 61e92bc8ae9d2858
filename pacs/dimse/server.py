"""The Application Entity: which services, SOP classes and transfer syntaxes we accept.

Every storage SOP class pynetdicom knows is accepted in every transfer syntax pydicom
knows, so a modality's proposal is accepted as sent and nothing is transcoded on the
way in. Calling AE titles outside a non-empty allow-list are rejected during association
negotiation (A-ASSOCIATE-RJ, "calling AE title not recognized"); the per-network rules,
the association caps and TLS are the front door's (:mod:`pacs.dimse.frontdoor`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]

from pacs.archive import Archive
from pacs.audit import Actor, AuditEvent, AuditTrail, Outcome
from pacs.dimse import associations, bounds, find, retrieve, spool
from pacs.dimse.direct import DirectServices
from pacs.dimse.echo import handle_echo
from pacs.dimse.frontdoor import (
    AssociationCounts,
    CallingRules,
    FrontDoor,
    server_tls_context,
)
from pacs.dimse.reactor import MendedAE
from pacs.dimse.store import make_store_handler
from pacs.dimse.transport import FilmlessServer, HandoffServer, handoff_server, serve_in_thread
from pacs.encoding import UNCOMPRESSED
from pacs.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(sorted(_STORAGE_CLASSES.values()))
# When one presentation context proposes several transfer syntaxes, the first of ours
# that the requestor proposed is accepted (pynetdicom negotiates in the acceptor's order).
# Lossless compressed syntaxes come first, so an image already compressed losslessly
# arrives as it is; then the uncompressed ones; lossy syntaxes last, so that a modality
# offering "lossy or uncompressed" for an uncompressed image never loses information.
LOSSLESS_COMPRESSED: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K RPCL lossless
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)
TRANSFER_SYNTAXES: tuple[str, ...] = (
    *LOSSLESS_COMPRESSED,
    *UNCOMPRESSED,
    *(
        str(uid)
        for uid in AllTransferSyntaxes
        if str(uid) not in LOSSLESS_COMPRESSED and str(uid) not in UNCOMPRESSED
    ),
)


@dataclass(frozen=True, slots=True)
class DimseConfig:
    ae_title: str = "FILMLESS"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 32
    max_associations_per_host: int = 16
    max_pending_connections: int = 256
    max_pending_per_host: int = 32
    check_called_aet: bool = True
    handshake_timeout: float = 10.0
    # network (CIDR) -> calling AE titles allowed from there ("*" = any); empty = anyone
    calling_aets_by_network: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 1048576
    max_find_matches: int = 10000
    max_identifier_bytes: int = 1 << 20
    max_query_keys: int = 256
    case_insensitive_names: bool = True
    # AE title -> (host, port) for C-MOVE
    move_destinations: tuple[tuple[str, str, int], ...] = ()
    # Storage, C-FIND and echo associations without pynetdicom's threads
    # (pacs.dimse.direct); off, every association is pynetdicom's.
    direct_associations: bool = True


def build_ae(config: DimseConfig) -> AE:
    # Mended: C-MOVE's associations to a destination send while their reactor runs.
    ae = MendedAE(ae_title=config.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    # The front door enforces the association caps; pynetdicom's own count would also
    # include associations still winding down, so it is only a backstop here.
    ae.maximum_associations = 2 * config.max_associations
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    ae.maximum_pdu_size = config.max_pdu
    ae.require_calling_aet = list(config.allowed_calling_aets)
    ae.add_supported_context(Verification)
    for model in (*find.MODELS, *retrieve.MOVE_MODELS, *retrieve.GET_MODELS):
        ae.add_supported_context(model, list(UNCOMPRESSED))
    for sop_class in STORAGE_SOP_CLASSES:
        # Both roles: a C-GET requester proposes its storage contexts with us as SCU.
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
    return ae


def find_service(archive: Archive, config: DimseConfig) -> find.FindService:
    return find.FindService(
        archive,
        max_matches=config.max_find_matches,
        retrieve_ae_title=config.ae_title,
        case_insensitive_names=config.case_insensitive_names,
        max_keys=config.max_query_keys,
    )


def direct_services(ae: AE, archive: Archive, config: DimseConfig) -> DirectServices | None:
    """Storage, C-FIND and echo associations served without pynetdicom's threads."""
    if not config.direct_associations:
        return None
    return DirectServices(
        archive,
        find_service(archive, config),
        supported=ae.supported_contexts,
        maximum_pdu=config.max_pdu,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        allowed_calling_aets=config.allowed_calling_aets,
        network_timeout=config.network_timeout,
        max_identifier_bytes=config.max_identifier_bytes,
    )


def service_handlers(archive: Archive, config: DimseConfig) -> list[Any]:
    return [
        *associations.handlers(archive.audit),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, make_store_handler(archive)),
        (
            evt.EVT_C_FIND,
            find.make_find_handler(find_service(archive, config)),
        ),
        (evt.EVT_SOP_EXTENDED, find.accept_extended_negotiation),
        (
            evt.EVT_C_MOVE,
            retrieve.make_move_handler(
                archive, {ae: (host, port) for ae, host, port in config.move_destinations}
            ),
        ),
        (evt.EVT_C_GET, retrieve.make_get_handler(archive)),
    ]


def front_door(
    config: DimseConfig, audit: AuditTrail, counts: AssociationCounts | None = None
) -> FrontDoor:
    """The admission rules of ``config``; ``counts`` are shared when several processes serve."""

    def refused(host: str, calling: str, reason: str) -> None:
        log.warning("association from %s@%s refused: %s", calling or "?", host, reason)
        audit.record(
            AuditEvent.LOGIN,
            Actor(calling, host, "DIMSE"),
            Outcome.MINOR_FAILURE,
            detail=f"association rejected: {reason}",
        )

    tls = None
    if config.tls_cert:
        tls = server_tls_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    return FrontDoor(
        counts=counts or AssociationCounts(1, config.max_associations),
        max_associations=config.max_associations,
        max_per_host=config.max_associations_per_host,
        max_pending=config.max_pending_connections,
        max_pending_per_host=config.max_pending_per_host,
        called_ae_title=config.ae_title if config.check_called_aet else "",
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.network_timeout,
        rules=CallingRules.parse(dict(config.calling_aets_by_network)),
        tls=tls,
        on_refused=refused,
    )


def start_dimse(archive: Archive, config: DimseConfig) -> FilmlessServer:
    """Listen in background threads; the caller stops it with ``server.shutdown()``."""
    ae = build_ae(config)
    handlers = service_handlers(archive, config)
    door = front_door(config, archive.audit)
    spool.install(archive.max_instance_bytes)
    bounds.install(config.max_identifier_bytes)
    return serve_in_thread(
        ae,
        (config.bind_address, config.port),
        handlers,
        door,
        spool_store=archive.store,
        direct=direct_services(ae, archive, config),
    )


def start_handoff(
    archive: Archive, config: DimseConfig, counts: AssociationCounts
) -> HandoffServer:
    """A server for connections accepted elsewhere (see :class:`HandoffServer`)."""
    spool.install(archive.max_instance_bytes)
    bounds.install(config.max_identifier_bytes)
    ae = build_ae(config)
    return handoff_server(
        ae,
        service_handlers(archive, config),
        front_door(config, archive.audit, counts),
        spool_store=archive.store,
        direct=direct_services(ae, archive, config),
    )
