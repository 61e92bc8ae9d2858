"""DIMSE across processes: one acceptor, N worker processes, connections handed over.

A single Python process stores at most one core's worth of instances (pynetdicom and
the header parser hold the GIL). The supervisor here owns the listening socket, and
passes every accepted connection (its file descriptor, over a Unix socket pair) to the
worker with the fewest open associations. Each worker is a complete archive writer:
its own index connections and blob store on the same data folder, so the durability
contract is the same as in one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from types import FrameType
from typing import Any

from filmless import heap
from filmless.settings import Settings
from filmless.wiring import build_archive, configure_logging, dimse_config
from pacs.dimse.frontdoor import AssociationCounts
from pacs.dimse.server import start_handoff
from pacs.lock import hold_as_worker

log = logging.getLogger("filmless.dimse")

_DRAIN_SECONDS = 30.0
_START_SECONDS = 60.0


class _Worker:
    def __init__(
        self, number: int, settings: Settings, context: Any, counts: AssociationCounts
    ) -> None:
        self.number = number
        self.channel, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.active: Synchronized[int] = context.Value("i", 0)
        self.process: BaseProcess = context.Process(
            target=worker_main,
            args=(settings.model_dump(mode="json"), child_end, self.active, counts.for_row(number)),
            name=f"filmless-dimse-{number}",
            daemon=False,
        )
        self.process.start()
        child_end.close()

    def wait_ready(self, timeout: float) -> None:
        """A worker writes one byte once it can take connections."""
        self.channel.settimeout(timeout)
        try:
            if self.channel.recv(1) != b"R":
                raise RuntimeError(f"DIMSE worker {self.number} failed to start")
        finally:
            self.channel.settimeout(None)

    def hand_over(self, connection: socket.socket, address: tuple[str, int]) -> None:
        message = json.dumps([address[0], address[1]]).encode()
        socket.send_fds(self.channel, [message], [connection.fileno()])
        with self.active.get_lock():
            self.active.value += 1  # the worker takes it back when the association ends

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.close()
        if self.process.is_alive() and self.process.pid is not None:
            self.process.terminate()


class DimsePool:
    """Accept on ``bind_address:dimse_port`` and spread associations over worker processes."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.count = workers
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        # Association caps hold across all workers: one row of counts per worker.
        self.counts = AssociationCounts(workers, settings.max_associations, self.context)
        # Bound now so that a port in use fails before any worker starts; listening only
        # once every worker can take a connection, so no peer waits on a cold start.
        family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((settings.bind_address, settings.dimse_port))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="DimseAcceptor", daemon=True)

    def start(self) -> None:
        self.workers = [
            _Worker(n, self.settings, self.context, self.counts) for n in range(self.count)
        ]
        for worker in self.workers:
            worker.wait_ready(_START_SECONDS)
        self.listener.listen(128)
        self._thread.start()

    def _pick(self) -> _Worker:
        for number, worker in enumerate(self.workers):
            if not worker.process.is_alive():
                log.error(
                    "DIMSE worker %d died (exit %s), restarting", number, worker.process.exitcode
                )
                worker.stop()
                self.counts.clear_row(number)
                self.workers[number] = _Worker(number, self.settings, self.context, self.counts)
                self.workers[number].wait_ready(_START_SECONDS)
        return min(self.workers, key=lambda w: w.active.value)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, address = self.listener.accept()
            except OSError:
                return
            try:
                self._pick().hand_over(connection, address[:2])
            except OSError:
                log.exception("could not hand a connection from %s to a worker", address)
            finally:
                connection.close()

    def stop(self) -> None:
        """Stop accepting, let each worker finish its open associations, then exit."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for worker in self.workers:
            worker.stop()
        deadline = time.monotonic() + _DRAIN_SECONDS + 5
        for worker in self.workers:
            worker.process.join(max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def worker_main(
    settings_data: dict[str, Any],
    channel: socket.socket,
    active: Any,
    counts: AssociationCounts,
) -> None:
    """Entry point of a worker process: one archive, one handoff server, until SIGTERM."""
    settings = Settings.model_validate(settings_data)
    configure_logging(verbose=False)
    # Held until this process exits: no new server reconciles while it still stores.
    worker_lock = hold_as_worker(settings.data_dir)
    archive = build_archive(settings, create_schema=False)
    config = dimse_config(settings)

    def ended() -> None:
        with active.get_lock():
            active.value -= 1

    server = start_handoff(archive, config, counts)
    server.on_connection_end = ended
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()
        with contextlib.suppress(OSError):
            channel.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop

    def receive() -> None:
        # The channel closes when the supervisor stops, or dies (kill -9): either way
        # this worker finishes its associations and exits rather than linger orphaned.
        server.serve_handoffs(channel)
        stop.set()

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    # Warm up before taking connections: the first log record loads the console
    # renderer and the first query opens the database, neither should delay a peer.
    archive.index.instance("0.0")
    heap.settle()
    log.info("DIMSE worker ready (pid %d)", os.getpid())
    channel.sendall(b"R")
    stop.wait()
    deadline = time.monotonic() + _DRAIN_SECONDS
    # Associations that are storing finish; a connection still negotiating is dropped.
    while (
        any(assoc.is_established for assoc in server.active_associations)
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    server.shutdown()
    archive.index.dispose()
    worker_lock.close()
