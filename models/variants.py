"""Derived variants of an installed model: fp16 for GPUs, int8 for CPUs.

Both are separate models (``<name>-fp16``, ``<name>-int8``) with their own manifest,
reference and card, and neither becomes the default: fp16 only pays on a GPU, and int8
changes the scores, so its accuracy must be measured again on labelled data before
anyone switches to it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from models.card import write_card
from models.manifest import MANIFEST, REFERENCE, Manifest, ManifestError, dump, sha256_file
from models.runtime import differences, session
from models.store import Installed, ModelStore, install_folder

FP16_LIMIT = 1e-2
MAP_SLACK = 5  # activation maps may differ this many times the probabilities' limit


def _install(
    store: ModelStore,
    base: Installed,
    model_path: Path,
    variant: str,
    *,
    note: str | None,
    max_difference: float,
) -> Installed:
    """Write the variant's folder: its file, a manifest derived from the base, reference."""
    name = f"{base.manifest.name}-{variant}"
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=store.root))
    try:
        target_file = work / "model.onnx"
        shutil.move(model_path, target_file)
        with np.load(base.folder / REFERENCE) as reference:
            sample = reference["input"]
            expected = [reference[o.name] for o in base.manifest.outputs]
        runtime = session(target_file)
        found = differences(runtime, sample, expected)
        kinds = [o.kind for o in base.manifest.outputs]
        difference = max(d for k, d in zip(kinds, found, strict=False) if k == "scores")
        # Activation maps are read for their peak only: reduced precision may move their
        # values further than the probabilities' limit allows.
        map_difference = max(
            (d for k, d in zip(kinds, found, strict=False) if k == "map"),
            default=0.0,
        )
        outputs = runtime.run(None, {base.manifest.input.name: sample})
        provenance = base.manifest.provenance.model_copy(
            update={
                "source": f"{variant} variant of {base.manifest.name} "
                f"(max difference {difference:.2e} on its reference sample, "
                f"{map_difference:.2e} on activation maps)",
                "calibration": note,
            }
        )
        manifest = base.manifest.model_copy(
            update={
                "name": name,
                "variant": variant,
                "default": False,
                "weights": base.manifest.weights.model_copy(
                    update={"sha256": sha256_file(target_file)}
                ),
                "provenance": provenance,
            }
        )
        manifest = Manifest.model_validate(manifest.model_dump())
        np.savez(
            work / REFERENCE,
            input=sample,
            **{o.name: v for o, v in zip(manifest.outputs, outputs, strict=True)},
        )
        dump(manifest, work / MANIFEST)
        write_card(manifest, work / "card.md")
        if difference > max_difference or map_difference > MAP_SLACK * max_difference:
            raise ManifestError(
                f"the {variant} variant differs from {base.manifest.name} by {difference:.2e} "
                f"on the reference sample (limit {max_difference:g})"
            )
        install_folder(work, store.root / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return store.get(name)


def make_fp16(store: ModelStore, name: str) -> Installed:
    base = store.get(name)
    converted = convert_float_to_float16(onnx.load(str(base.onnx)), keep_io_types=True)
    _, path = tempfile.mkstemp(suffix=".onnx", dir=store.root)
    Path(path).unlink()
    onnx.save(converted, path)
    return _install(store, base, Path(path), "fp16", note=None, max_difference=FP16_LIMIT)


class _Tensors(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, input_name: str, files: list[Path], shape: tuple[int, ...]) -> None:
        self.input_name = input_name
        self.files = iter(files)
        self.shape = shape

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self.files, None)
        if path is None:
            return None
        array = np.load(path).astype(np.float32)
        if array.shape == self.shape[1:]:
            array = array[None]
        if array.shape[1:] != self.shape[1:]:
            raise ManifestError(f"{path}: shape {array.shape}, the model takes {self.shape}")
        return {self.input_name: array}


def calibration_files(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.rglob("*.npy"))


def make_int8(
    store: ModelStore, name: str, calibration: Path, *, max_difference: float = 0.1
) -> Installed:
    """Static QDQ quantisation, activations calibrated on the user's preprocessed images
    (``.npy`` tensors shaped like the model input, with or without the batch axis)."""
    base = store.get(name)
    files = list(calibration_files(calibration))
    if len(files) < 8:
        raise ManifestError(f"{calibration} holds {len(files)} .npy tensors; give at least 8")
    shape = tuple(int(v) for v in base.manifest.input.shape[1:])
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=store.root))
    try:
        prepared, quantized = work / "prepared.onnx", work / "model.onnx"
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the quantiser logs per-tensor advice at WARNING
        try:
            # Shape inference and graph folding first, as ONNX Runtime recommends.
            quant_pre_process(str(base.onnx), str(prepared))
            quantize_static(
                str(prepared),
                str(quantized),
                _Tensors(base.manifest.input.name, files, (1, *shape)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            quiet.setLevel(level)
        note = f"{len(files)} tensors from {calibration}"
        return _install(store, base, quantized, "int8", note=note, max_difference=max_difference)
    finally:
        shutil.rmtree(work, ignore_errors=True)
