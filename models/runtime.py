"""ONNX Runtime sessions as the zoo uses them: every graph optimisation on, CPU unless told.

Kept free of torch so that ``models verify`` and serving can use it on a machine
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.manifest import Preprocessing, TensorSpec


def session(
    path: Path, *, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    """``threads`` 0 lets ONNX Runtime use every core."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers))


def reference_sample(
    tensor: TensorSpec, preprocessing: Preprocessing, *, batch: int = 2, seed: int = 1234
) -> np.ndarray:
    """Seeded inputs in the range the preprocessing produces, normalised like it."""
    shape = [batch, *(int(v) for v in tensor.shape[1:])]
    low, high = preprocessing.intensity_range
    sample = np.random.default_rng(seed).uniform(low, high, shape)
    if preprocessing.mean is not None and preprocessing.std is not None:
        mean = np.asarray(preprocessing.mean).reshape(1, -1, 1, 1)
        std = np.asarray(preprocessing.std).reshape(1, -1, 1, 1)
        sample = (sample - mean) / std
    return sample.astype(tensor.dtype)


def parity(
    runtime: ort.InferenceSession, sample: np.ndarray, expected: Sequence[np.ndarray]
) -> float:
    """Largest absolute difference between the session's outputs and ``expected``."""
    return max(differences(runtime, sample, expected))


def differences(
    runtime: ort.InferenceSession, sample: np.ndarray, expected: Sequence[np.ndarray]
) -> list[float]:
    """Per output, the largest absolute difference from ``expected`` (inf: other outputs)."""
    name = runtime.get_inputs()[0].name
    got = runtime.run(None, {name: sample})
    if len(got) != len(expected):
        return [float("inf")]
    return [
        float(np.max(np.abs(np.asarray(g, dtype=np.float64) - np.asarray(e, dtype=np.float64))))
        for g, e in zip(got, expected, strict=True)
    ]
