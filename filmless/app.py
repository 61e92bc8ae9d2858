"""Builds the running parts from the settings; the only place that knows all of them."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from filmless.settings import Settings
from pacs.archive import Archive
from pacs.dimse.server import DimseConfig, start_dimse
from pacs.events import EventBus
from pacs.index import Index
from pacs.store import FsBlobStore

log = logging.getLogger("filmless")


def build_archive(settings: Settings) -> Archive:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    index = Index(settings.index_url)
    index.create_schema()
    return Archive(
        FsBlobStore(settings.data_dir),
        index,
        EventBus(),
        duplicate_policy=settings.duplicate_policy,
    )


def dimse_config(settings: Settings) -> DimseConfig:
    return DimseConfig(
        ae_title=settings.ae_title,
        bind_address=settings.bind_address,
        port=settings.dimse_port,
        allowed_calling_aets=tuple(settings.allowed_calling_aets),
        max_associations=settings.max_associations,
        acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout,
        max_pdu=settings.max_pdu,
    )


def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then stop accepting and let open associations end."""
    archive = build_archive(settings)
    server = start_dimse(archive, dimse_config(settings))
    log.info(
        "DIMSE listening on %s:%d as AE %s; data in %s; index %s",
        settings.bind_address,
        settings.dimse_port,
        settings.ae_title,
        settings.data_dir.resolve(),
        archive.index.url.render_as_string(hide_password=True),
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        stop.wait()
    finally:
        server.shutdown()
        archive.index.dispose()
