"""Installed models: one folder per model under ``models_dir``, checked on the way in.

A folder holds ``model.onnx``, ``manifest.toml``, ``reference.npz`` (a sample and the
outputs it must give) and ``card.md``. Nothing here imports torch: adding, listing and
verifying work on a serving machine.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.card import write_card
from models.manifest import (
    MANIFEST,
    REFERENCE,
    Manifest,
    ManifestError,
    TensorSpec,
    load,
    sha256_file,
)
from models.zoo import DEMO_VERSION, Task

if TYPE_CHECKING:
    import onnxruntime as ort

# Listing manifests, all the DIMSE processes do to schedule jobs, needs no runtime:
# onnxruntime is loaded by the methods that verify or add a model.

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-3}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


@dataclass(frozen=True)
class Installed:
    manifest: Manifest
    folder: Path

    @property
    def onnx(self) -> Path:
        return self.folder / self.manifest.weights.file


@dataclass
class Verification:
    name: str
    sha256_ok: bool
    parity: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: tuple[tuple[str, int], ...] | None = None
        self._manifests: list[Manifest] = []

    def manifests(self) -> list[Manifest]:
        """The installed manifests, parsed again only when one of the files changed.

        Called for every stored instance, so it costs a directory listing and a stat per
        model instead of parsing and validating every TOML file each time.
        """
        if not self.root.is_dir():
            return []
        seen = tuple(
            (folder.name, (folder / MANIFEST).stat().st_mtime_ns)
            for folder in sorted(self.root.iterdir())
            if not folder.name.startswith(".") and (folder / MANIFEST).is_file()
        )
        if seen != self._seen:
            self._manifests = [m.manifest for m in self.installed()]
            self._seen = seen
        return self._manifests

    def installed(self) -> list[Installed]:
        """Every model folder with a readable manifest; a broken one raises, naming it."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
                continue
            found.append(Installed(load(folder / MANIFEST), folder))
        return found

    def get(self, name: str) -> Installed:
        folder = self.root / name
        if not (folder / MANIFEST).is_file():
            raise ManifestError(f"no model {name!r} in {self.root}")
        return Installed(load(folder / MANIFEST), folder)

    def verify(self, name: str) -> Verification:
        """Re-hash the weights and re-run the reference sample."""
        from models.runtime import parity, session  # noqa: PLC0415

        model = self.get(name)
        result = Verification(name, sha256_ok=False, parity=None)
        if not model.onnx.is_file():
            result.problems.append(f"{model.onnx.name} is missing")
            return result
        actual = sha256_file(model.onnx)
        result.sha256_ok = actual == model.manifest.weights.sha256
        if not result.sha256_ok:
            result.problems.append(
                f"sha256 {actual[:16]}... differs from the manifest's "
                f"{model.manifest.weights.sha256[:16]}..."
            )
            return result
        reference_path = model.folder / REFERENCE
        if not reference_path.is_file():
            result.problems.append(f"{REFERENCE} is missing: parity cannot be checked")
            return result
        with np.load(reference_path) as reference:
            sample = reference["input"]
            expected = [reference[o.name] for o in model.manifest.outputs]
        result.parity = parity(session(model.onnx), sample, expected)
        limit = TOLERANCE[model.manifest.variant]
        if result.parity > limit:
            result.problems.append(f"outputs differ from the reference by {result.parity:.2e}")
        return result

    def add(self, onnx_path: Path, manifest_path: Path) -> Installed:
        """Install any ONNX file whose inputs and outputs match its manifest."""
        from models.runtime import reference_sample, session  # noqa: PLC0415

        manifest = load(manifest_path)
        actual = sha256_file(onnx_path)
        if manifest.weights.sha256 != actual:
            raise ManifestError(
                f"the manifest gives sha256 {manifest.weights.sha256}, the file has {actual}"
            )
        try:
            runtime = session(onnx_path)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ManifestError(f"{onnx_path} is not a loadable ONNX model: {exc}") from exc
        check_signature(runtime, manifest)
        sample = reference_sample(manifest.input, manifest.preprocessing)
        outputs = runtime.run(None, {manifest.input.name: sample})
        for spec, value in zip(manifest.outputs, outputs, strict=True):
            if not spec.fits(value.shape, batch=2):
                raise ManifestError(
                    f"output {spec.name} has shape {value.shape} for a batch of 2; the manifest "
                    f"says {spec.shape} with {len(spec.labels)} labels"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{manifest.name}-", dir=self.root))
        try:
            shutil.copyfile(onnx_path, work / manifest.weights.file)
            shutil.copyfile(manifest_path, work / MANIFEST)
            np.savez(
                work / REFERENCE,
                input=sample[:1],
                **{s.name: v[:1] for s, v in zip(manifest.outputs, outputs, strict=True)},
            )
            write_card(manifest, work / "card.md")
            install_folder(work, self.root / manifest.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self.get(manifest.name)


def install_folder(work: Path, target: Path) -> None:
    """Put a folder written aside in the place of ``target``.

    The old folder is renamed aside first, the new one renamed in, and only then is the
    old one removed: a failure on the way leaves the old folder where it was, and a
    reader finds either one whole, never a half-deleted mix. Folders whose name starts
    with a dot are not read as installed.
    """
    old = target.with_name(f".{target.name}-replaced-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(old)
    try:
        work.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def cached_demo(store: ModelStore, task: Task) -> Manifest | None:
    """The installed demo model of ``task`` if it is current and intact."""
    try:
        if not store.verify(task.name).ok:
            return None
        existing = store.get(task.name).manifest
    except ManifestError:
        return None
    current = (
        existing.version == DEMO_VERSION
        and existing.quality == task.quality
        and existing.parametric_maps == task.parametric_maps
        and existing.routing == task.routing
    )
    if existing.weights.demo and current:
        return existing
    return None


def check_signature(runtime: ort.InferenceSession, manifest: Manifest) -> None:
    """The graph's input and outputs: names, element types and fixed dimensions."""
    inputs = runtime.get_inputs()
    if len(inputs) != 1:
        raise ManifestError(f"the model has {len(inputs)} inputs; one image tensor is expected")
    _check_tensor(inputs[0], manifest.input, "input")
    outputs = {o.name: o for o in runtime.get_outputs()}
    declared = [o.name for o in manifest.outputs]
    if sorted(outputs) != sorted(declared):
        raise ManifestError(
            f"the model's outputs are {sorted(outputs)}, the manifest names {declared}"
        )
    for spec in manifest.outputs:
        _check_tensor(outputs[spec.name], spec, "output")


def _check_tensor(node: ort.NodeArg, spec: TensorSpec, kind: str) -> None:
    if node.name != spec.name:
        raise ManifestError(f"{kind} is named {node.name!r}, the manifest says {spec.name!r}")
    dtype = _ORT_TYPES.get(node.type, node.type)
    if dtype != spec.dtype:
        raise ManifestError(f"{kind} {spec.name} is {dtype}, the manifest says {spec.dtype}")
    if len(node.shape) != len(spec.shape):
        raise ManifestError(
            f"{kind} {spec.name} has {len(node.shape)} dimensions, the manifest {len(spec.shape)}"
        )
    for axis, (have, want) in enumerate(zip(node.shape, spec.shape, strict=True)):
        if isinstance(want, int) and have != want:
            raise ManifestError(
                f"{kind} {spec.name} dimension {axis} is {have}, the manifest says {want}"
            )
        if isinstance(want, str) and isinstance(have, int):
            raise ManifestError(
                f"{kind} {spec.name} dimension {axis} is fixed at {have}; the manifest "
                f"declares it dynamic ({want})"
            )
