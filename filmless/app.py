"""``filmless serve``: the archive, its DIMSE server (one process or a pool), until a signal."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from filmless.dimse_pool import DimsePool
from filmless.settings import Settings
from filmless.wiring import build_archive, dimse_config, dimse_worker_count
from pacs.dimse.server import start_dimse

log = logging.getLogger("filmless")


def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then stop accepting and let open associations end."""
    archive = build_archive(settings)
    workers = dimse_worker_count(settings)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if workers > 1:
        pool = DimsePool(settings, workers)
        pool.start()
        stop_dimse = pool.stop
    else:
        server = start_dimse(archive, dimse_config(settings))
        stop_dimse = server.shutdown
    log.info(
        "DIMSE listening on %s:%d as AE %s (%d worker%s); data in %s; index %s",
        settings.bind_address,
        settings.dimse_port,
        settings.ae_title,
        workers,
        "s" if workers > 1 else "",
        settings.data_dir.resolve(),
        archive.index.url.render_as_string(hide_password=True),
    )
    try:
        stop.wait()
    finally:
        stop_dimse()
        archive.index.dispose()
