"""Model inputs shared by the models that read one image the same way.

Diabetic retinopathy and glaucoma screening read the same fundus photographs with the
same preprocessing and quality gate; each is its own job (its own result and report),
and their jobs for a study fall due together. A worker keeps the inputs it prepared,
keyed by the stored file (SOP Instance UID and sha256) and the preprocessing and gate,
so the second job reads the first one's: one decode per photograph and preprocessing,
not per model. Two jobs asking at once wait for one preparation. The verdict of the
quality gate is kept too (the same image fails the same gate), as a fresh exception for
each caller: a raised :class:`NotAssessable` carries its job's report with it.

Bounded by bytes: the oldest inputs go first. A failure other than the gate's is not
kept, so a job that runs again tries again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from inference.geometry import Placement
from inference.quality import NotAssessable

Key = tuple[str, ...]


@dataclass(frozen=True)
class Input:
    """A prepared model input, the header it was read from, and where it lies on the
    stored image."""

    tensor: np.ndarray
    header: Dataset
    placement: Placement | None


@dataclass(frozen=True)
class _Gated:
    """The gate's verdict on an image, kept to be raised again."""

    failed: NotAssessable


class SharedInputs:
    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.prepared = 0  # preparations run (decode + preprocess), for the record
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, Future[Input | _Gated]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Key, prepare: Callable[[], Input]) -> Input:
        """The input under ``key``, prepared by ``prepare`` unless it is at hand."""
        with self._lock:
            found = self._entries.get(key)
            owner = found is None
            if found is None:
                found = Future()
                self._entries[key] = found
            else:
                self._entries.move_to_end(key)
        if owner:
            self._prepare(key, found, prepare)
        kept = found.result()
        if isinstance(kept, _Gated):
            raise _again(kept.failed)
        return kept

    def _prepare(
        self, key: Key, found: Future[Input | _Gated], prepare: Callable[[], Input]
    ) -> None:
        try:
            made: Input | _Gated = prepare()
        except NotAssessable as exc:
            made = _Gated(exc)
        except BaseException as exc:
            with self._lock:
                self._entries.pop(key, None)
            found.set_exception(exc)
            return
        with self._lock:
            self.prepared += 1
            if isinstance(made, Input):
                self._bytes += made.tensor.nbytes
            self._evict()
        found.set_result(made)

    def _evict(self) -> None:
        """Oldest first, down to the bound; inputs still being prepared stay."""
        for key in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            entry = self._entries[key]
            if not entry.done():
                continue
            del self._entries[key]
            kept = entry.result() if entry.exception() is None else None
            if isinstance(kept, Input):
                self._bytes -= kept.tensor.nbytes


def _again(failed: NotAssessable) -> NotAssessable:
    """The same verdict as a new exception: its source and report are the caller's."""
    again = NotAssessable(failed.measures, failed.shortfalls, source=failed.source)
    again.args = failed.args
    return again
