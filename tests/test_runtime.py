"""Shared ONNX Runtime sessions: provider choice and dynamic batching of concurrent calls."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from inference.runtime import CPU, BatchingSession, choose_providers
from models.build import build_demo
from models.runtime import reference_sample, session
from models.zoo import CHEST_XRAY


def test_providers_follow_preference_and_end_with_cpu() -> None:
    available = ["CUDAExecutionProvider", CPU]
    preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert choose_providers(preferred, available) == ["CUDAExecutionProvider", CPU]
    assert choose_providers(preferred, [CPU]) == [CPU]
    assert choose_providers([], [CPU]) == [CPU]


@pytest.mark.slow
def test_concurrent_calls_share_batches_and_get_their_own_outputs(tmp_path: Path) -> None:
    manifest = build_demo(tmp_path, CHEST_XRAY).manifest
    path = tmp_path / manifest.name / "model.onnx"
    images = reference_sample(manifest.input, manifest.preprocessing, batch=8, seed=9)
    expected, _maps = session(path).run(None, {manifest.input.name: images})
    runner = BatchingSession(path, runs=1, max_batch=4, max_wait_ms=200)
    assert runner.providers[-1] == CPU
    results = _infer_at_once(runner, images)
    runner.close()
    assert sorted(results) == list(range(8))
    for n in range(8):
        assert np.abs(results[n] - expected[n]).max() < 1e-4
    assert runner.batches_run < 8  # concurrent arrivals shared forward passes


@pytest.mark.slow
def test_a_bad_input_fails_its_caller_only(tmp_path: Path) -> None:
    manifest = build_demo(tmp_path, CHEST_XRAY).manifest
    runner = BatchingSession(tmp_path / manifest.name / "model.onnx", max_wait_ms=1)
    with pytest.raises(Exception, match=r"(?i)dimension|shape|invalid"):
        runner.infer(np.zeros((1, 10, 10), np.float32), timeout=60)
    good = reference_sample(manifest.input, manifest.preprocessing, batch=1)[0]
    probabilities, maps = runner.infer(good, timeout=60)
    assert probabilities.shape == (18,)
    assert maps.shape == (18, 7, 7)
    runner.close()


@pytest.mark.slow
def test_several_passes_at_a_time_and_no_waiting_while_a_runner_is_free(tmp_path: Path) -> None:
    """With two runners, a lone image does not wait for a batch to fill (max_wait is far
    longer than the timeout), and concurrent images each get their own outputs."""
    manifest = build_demo(tmp_path, CHEST_XRAY).manifest
    path = tmp_path / manifest.name / "model.onnx"
    images = reference_sample(manifest.input, manifest.preprocessing, batch=6, seed=3)
    expected, _maps = session(path).run(None, {manifest.input.name: images})
    patient = BatchingSession(path, providers=[CPU], runs=2, threads=1, max_wait_ms=600_000)
    assert patient.runs == 2
    alone, _map = patient.infer(images[0], timeout=60)
    patient.close()
    assert np.abs(alone - expected[0]).max() < 1e-4
    runner = BatchingSession(path, providers=[CPU], runs=2, threads=1, max_wait_ms=50)
    results = _infer_at_once(runner, images)
    runner.close()
    assert sorted(results) == list(range(6))
    for n in range(6):
        assert np.abs(results[n] - expected[n]).max() < 1e-4


def _infer_at_once(runner: BatchingSession, images: np.ndarray) -> dict[int, np.ndarray]:
    """Each image from its own thread, all released together; the first output of each."""
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(images))

    def worker(n: int) -> None:
        start.wait()
        results[n], _map = runner.infer(images[n], timeout=120)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return results
