"""The one ONNX Runtime session builder: export, verification, evaluation and screening
all run a model with the same options, so that what is verified is what is served.

Kept free of torch so that ``models verify`` and serving can use it on a machine
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.manifest import Preprocessing, TensorSpec

CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU)


def choose_providers(preferred: Sequence[str], available: Sequence[str]) -> list[str]:
    """The preferred providers this machine has, in order, ending with the CPU."""
    chosen = [p for p in preferred if p in available and p != CPU]
    return [*chosen, CPU]


def session(
    path: Path, *, threads: int = 0, providers: Sequence[str] = (CPU,)
) -> ort.InferenceSession:
    """Every graph optimisation, ``threads`` per pass (0: ONNX Runtime's default, every
    core), on the first of ``providers`` this machine has (the CPU last). The graph
    runs sequentially, so there is no inter-op pool to size."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    wanted = choose_providers(providers, ort.get_available_providers())
    return ort.InferenceSession(str(path), options, providers=wanted)


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
