"""Runs a model over many images: decoding and preprocessing in parallel with
inference, batched for ONNX Runtime, each batch kept in the prediction cache.

Locally, a process pool (one process per core, each single-threaded) reads and
preprocesses the images ahead of the main process, which runs the batches on ONNX
Runtime with every core. On a Dask cluster (``cluster`` = a scheduler's address) each
task is a chunk of images read and run by one worker; the workers must see the images
and the model at the same paths (a shared file system). Either way a chunk's images are
batched in the same order, so the outputs, and the metrics, do not depend on where they
ran. Dask rather than Ray: a pure-Python wheel, a scheduler and workers started with one
command each, and plain functions as tasks; what this needs, with nothing else to
install or operate.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from distributed import Client, as_completed

from inference.evaluate.cache import Prediction, PredictionCache
from inference.evaluate.images import Item, Loaded, digest, load
from inference.runtime import DEFAULT_PROVIDERS, cores
from models.manifest import Manifest
from models.runtime import session
from pacs import pixels

CHUNK = 64  # images per cluster task, and per cache commit


@dataclass(frozen=True)
class ModelRef:
    """An installed model as a task needs it: its folder and manifest."""

    folder: str
    manifest: Manifest
    providers: tuple[str, ...] = DEFAULT_PROVIDERS

    @property
    def sha256(self) -> str:
        return self.manifest.weights.sha256

    @property
    def onnx(self) -> Path:
        return Path(self.folder) / self.manifest.weights.file


@dataclass
class Throughput:
    """What a run took: images read (not from the cache), those of them the model ran
    on (the others were not for it, or not assessable), wall seconds, and the seconds
    spent in each stage summed over images."""

    images: int = 0
    inferred: int = 0
    cached: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    preprocess_seconds: float = 0.0
    infer_seconds: float = 0.0
    provider: str = ""
    where: str = "local"
    workers: int = 0
    batches: list[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Images run through the model per second of the whole run."""
        return self.inferred / self.seconds if self.seconds > 0 else 0.0


@functools.cache
def _session(onnx: str, providers: tuple[str, ...], threads: int) -> ort.InferenceSession:
    """One session per model in a process (a cluster worker keeps it between tasks)."""
    return session(Path(onnx), threads=threads, providers=providers)


def infer(
    model: ModelRef, loaded: Sequence[tuple[str, Loaded]], batch: int, threads: int = 0
) -> list[Prediction]:
    """The predictions of a chunk of read images (``(digest, loaded)``, in order): the
    usable ones run in batches of ``batch``, in that order; only the score outputs are
    kept (a map is not scored)."""
    session = _session(str(model.onnx), model.providers, threads)
    name = session.get_inputs()[0].name
    wanted = [o.name for o in model.manifest.outputs if o.kind == "scores"]
    found: dict[int, Prediction] = {}
    usable = [n for n, (_, one) in enumerate(loaded) if one.tensor is not None]
    for start in range(0, len(usable), batch):
        part = usable[start : start + batch]
        tensors = np.stack([np.asarray(loaded[n][1].tensor) for n in part])
        began = time.perf_counter()
        outputs = dict(zip(wanted, session.run(wanted, {name: tensors}), strict=True))
        each = (time.perf_counter() - began) / len(part)
        for row, n in enumerate(part):
            key, one = loaded[n]
            found[n] = Prediction(
                key,
                {
                    o: np.asarray(v[row], np.float32).reshape(-1).tolist()
                    for o, v in outputs.items()
                },
                "",
                one.attributes,
                one.decode_seconds,
                one.preprocess_seconds,
                each,
            )
    return [
        found.get(n)
        or Prediction(
            key,
            None,
            one.reason,
            one.attributes,
            one.decode_seconds,
            not_assessable=one.not_assessable,
        )
        for n, (key, one) in enumerate(loaded)
    ]


def score_chunk(
    model: ModelRef, items: Sequence[Item], batch: int, max_pixels: int
) -> list[Prediction]:
    """A cluster task: read, preprocess and run a chunk of images in one worker."""
    loaded = [(i.digest or digest(i.file), load(i, model.manifest, max_pixels)) for i in items]
    return infer(model, loaded, batch)


def _worker_setup(max_pixels: int) -> None:
    """Each pool process preprocesses one image at a time on one core."""
    torch.set_num_threads(1)
    pixels.LIMITS.max_pixels = max_pixels


class Runner:
    """Predictions of one model for many images, from the cache or run now."""

    def __init__(
        self,
        model: ModelRef,
        cache: PredictionCache,
        *,
        batch: int = 8,
        workers: int = 0,
        threads: int = 0,
        cluster: str | None = None,
        max_pixels: int = pixels.LIMITS.max_pixels,
    ) -> None:
        self.model = model
        self.cache = cache
        self.batch = batch
        self.workers = workers or cores()
        self.threads = threads
        self.cluster = cluster
        self.max_pixels = max_pixels

    def run(
        self, items: Sequence[Item], advance: Callable[[int], None] = lambda _: None
    ) -> tuple[list[Prediction], Throughput]:
        """One prediction per item, in order; ``advance`` is told of each image done
        (a progress bar)."""
        with self._pool() as pool:
            known = self._digests(items, pool)
            have = self.cache.get(self.model.sha256, known)
            cached = sum(1 for d in known if d in have)
            advance(cached)
            todo = list({d: i for i, d in zip(items, known, strict=True) if d not in have}.items())
            throughput = Throughput(cached=cached, workers=self.workers)
            if todo and not self.cluster:
                # Started (and their imports done) before the clock starts: the rate is
                # of the images, not of Python starting.
                list(pool.map(time.sleep, [0.05] * self.workers))
            began = time.perf_counter()
            if todo and self.cluster:
                fresh = self._on_cluster(todo, advance, throughput)
            elif todo:
                fresh = self._locally(pool, todo, advance, throughput)
            else:
                fresh = []
            throughput.seconds = time.perf_counter() - began
        for found in fresh:
            have[found.digest] = found
        throughput.images = len(fresh)
        throughput.inferred = sum(1 for p in fresh if p.outputs is not None)
        throughput.decode_seconds = sum(p.decode_seconds for p in fresh)
        throughput.preprocess_seconds = sum(p.preprocess_seconds for p in fresh)
        throughput.infer_seconds = sum(p.infer_seconds for p in fresh)
        throughput.provider = self._provider()
        # One prediction per distinct file; each item keeps its own path (a copy of a
        # file, or a file renamed since it was cached, is the same image elsewhere).
        return [
            dataclasses.replace(have[d], attributes=have[d].attributes | {"path": i.path})
            for i, d in zip(items, known, strict=True)
        ], throughput

    def _provider(self) -> str:
        return str(
            _session(str(self.model.onnx), self.model.providers, self.threads).get_providers()[0]
        )

    def _pool(self) -> ProcessPoolExecutor:
        # Spawned, not forked: the parent holds ONNX Runtime's and torch's threads.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_setup,
            initargs=(self.max_pixels,),
        )

    def _digests(self, items: Sequence[Item], pool: ProcessPoolExecutor) -> list[str]:
        unknown = [i.file for i in items if not i.digest]
        computed = iter(pool.map(digest, unknown, chunksize=16)) if unknown else iter(())
        return [i.digest or next(computed) for i in items]

    def _locally(
        self,
        pool: ProcessPoolExecutor,
        todo: list[tuple[str, Item]],
        advance: Callable[[int], None],
        throughput: Throughput,
    ) -> list[Prediction]:
        """Images read ahead by the pool (at most a few chunks), run chunk by chunk."""
        manifest = self.model.manifest
        ahead: deque[tuple[str, Future[Loaded]]] = deque()
        pending = iter(todo)
        window = max(2 * CHUNK, 4 * self.workers)
        fresh: list[Prediction] = []
        chunk: list[tuple[str, Loaded]] = []

        def fill() -> None:
            while len(ahead) < window:
                nxt = next(pending, None)
                if nxt is None:
                    return
                ahead.append((nxt[0], pool.submit(load, nxt[1], manifest, self.max_pixels)))

        fill()
        while ahead:
            key, future = ahead.popleft()
            chunk.append((key, future.result()))
            fill()
            if len(chunk) == CHUNK or not ahead:
                done = infer(self.model, chunk, self.batch, self.threads)
                self.cache.put(self.model.sha256, done)
                fresh += done
                throughput.batches.append(len(chunk))
                advance(len(chunk))
                chunk = []
        return fresh

    def _on_cluster(
        self, todo: list[tuple[str, Item]], advance: Callable[[int], None], throughput: Throughput
    ) -> list[Prediction]:
        throughput.where = self.cluster or ""
        with Client(self.cluster) as client:
            throughput.workers = len(client.scheduler_info()["workers"])
            chunks = [todo[n : n + CHUNK] for n in range(0, len(todo), CHUNK)]
            futures = [
                client.submit(
                    score_chunk,
                    self.model,
                    [_with_digest(item, key) for key, item in chunk],
                    self.batch,
                    self.max_pixels,
                    pure=False,
                )
                for chunk in chunks
            ]
            fresh: list[Prediction] = []
            for future in as_completed(futures):
                done: list[Prediction] = future.result()
                self.cache.put(self.model.sha256, done)
                fresh += done
                throughput.batches.append(len(done))
                advance(len(done))
        return fresh


def _with_digest(item: Item, key: str) -> Item:
    return Item(item.file, item.path, item.kind, key, item.in_archive)
