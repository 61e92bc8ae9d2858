"""torch module -> ONNX file + manifest + reference outputs + model card, checked on the way.

The export is refused unless ONNX Runtime, with every graph optimisation on, gives the
torch module's outputs within :data:`PARITY` on a seeded batch. The first sample and its
outputs are kept as ``reference.npz`` so that ``filmless models verify`` can re-check the
file later without torch. A model folder appears complete or not at all (written aside,
then renamed into place).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path

import monai
import numpy as np
import onnx
import torch

from models.architectures import Screening
from models.card import write_card
from models.manifest import (
    MANIFEST,
    REFERENCE,
    Manifest,
    ManifestError,
    OperatingPoint,
    Provenance,
    Weights,
    dump,
    sha256_file,
)
from models.runtime import parity, reference_sample, session
from models.store import install_folder
from models.zoo import Task

OPSET = 18
PARITY = 1e-4


class ExportError(ManifestError):
    """The exported graph does not reproduce the module: refused like a bad manifest, so
    the CLI reports it with its reason instead of a traceback."""


def export(
    module: Screening,
    task: Task,
    models_dir: Path,
    *,
    name: str,
    version: str,
    source: str,
    demo: bool,
    checkpoint_sha256: str | None = None,
    operating_points: list[OperatingPoint] | None = None,
    architecture: str | None = None,
) -> Manifest:
    """Export ``module`` as model ``name`` under ``models_dir``; returns its manifest."""
    module.eval()
    models_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        onnx_path = work / "model.onnx"
        sample = reference_sample(task.input, task.preprocessing)
        output_names = [o.name for o in task.outputs]
        axes = {task.input.name: {0: "batch"}} | {n: {0: "batch"} for n in output_names}
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated upstream but exact and fast here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.from_numpy(sample),),
                str(onnx_path),
                opset_version=OPSET,
                input_names=[task.input.name],
                output_names=output_names,
                dynamic_axes=axes,
                dynamo=False,
            )
        onnx.checker.check_model(str(onnx_path), full_check=True)
        with torch.inference_mode():
            expected = [t.numpy() for t in module(torch.from_numpy(sample))]
        runtime = session(onnx_path, threads=1)
        difference = parity(runtime, sample, expected)
        if difference > PARITY:
            raise ExportError(
                f"ONNX Runtime differs from torch by {difference:.2e} (limit {PARITY:.0e})"
            )
        np.savez(
            work / REFERENCE,
            input=sample[:1],
            **{n: e[:1] for n, e in zip(output_names, expected, strict=True)},
        )
        manifest = Manifest(
            name=name,
            version=version,
            task=task.task,
            description=task.description,
            intended_use=task.intended_use,
            clinical_use=False,
            weights=Weights(file="model.onnx", sha256=sha256_file(onnx_path), demo=demo),
            input=task.input,
            outputs=task.outputs,
            preprocessing=task.preprocessing,
            operating_points=operating_points or task.operating_points,
            routing=task.routing,
            aggregation=task.aggregation,
            quality=task.quality,
            parametric_maps=task.parametric_maps,
            provenance=Provenance(
                source=source,
                architecture=architecture or task.architecture,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                exporter=f"torch.onnx (TorchScript) opset {OPSET}, parity {difference:.1e}",
                opset=OPSET,
                checkpoint_sha256=checkpoint_sha256,
                torch=torch.__version__,
                monai=monai.__version__,
            ),
        )
        dump(manifest, work / MANIFEST)
        write_card(manifest, work / "card.md")
        install_folder(work, models_dir / name)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
