"""One ONNX Runtime session per model, shared by every worker, with dynamic batching.

Workers call :meth:`BatchingSession.infer` with one image each and block; a single
thread gathers what arrives within ``max_wait_ms`` (up to ``max_batch`` images) into
one forward pass, so concurrent arrivals share the cost of a batch. Execution providers
are taken in the order the settings prefer, keeping those this machine has; the CPU is
always the last resort, and the choice is logged. No torch here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU)


def choose_providers(preferred: Sequence[str], available: Sequence[str]) -> list[str]:
    """The preferred providers this machine has, in order, ending with the CPU."""
    chosen = [p for p in preferred if p in available and p != CPU]
    return [*chosen, CPU]


@dataclass
class _Request:
    tensor: np.ndarray
    result: Future[list[np.ndarray]]


class BatchingSession:
    def __init__(
        self,
        path: Path,
        *,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int = 0,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        wanted = choose_providers(providers, ort.get_available_providers())
        self.session = ort.InferenceSession(str(path), options, providers=wanted)
        self.providers = list(self.session.get_providers())
        log.info("%s runs on %s", path.parent.name or path.name, self.providers[0])
        self.input_name = self.session.get_inputs()[0].name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batches_run = 0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"batch-{path.parent.name}")
        self._thread.daemon = True
        self._thread.start()

    def infer(self, tensor: np.ndarray, timeout: float | None = None) -> list[np.ndarray]:
        """Outputs for one input without its batch axis; blocks until its batch has run."""
        request = _Request(tensor, Future())
        self._queue.put(request)
        return request.result.result(timeout=timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        try:
            stacked = np.stack([r.tensor for r in batch])
            outputs = self.session.run(None, {self.input_name: stacked})
            self.batches_run += 1
        except Exception as exc:  # one failed pass fails its requests, not the loop
            for request in batch:
                request.result.set_exception(exc)
            return
        for n, request in enumerate(batch):
            request.result.set_result([np.asarray(o[n]) for o in outputs])
