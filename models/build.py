"""``models build`` and ``models import``: torch modules made or loaded, then exported.

This is the only place (with :mod:`models.export`) that needs torch and MONAI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from models.architectures import Screening, backbone, demo_weights
from models.checkpoints import (
    from_torchxrayvision,
    load_into,
    operating_points,
    read_state_dict,
)
from models.export import export
from models.manifest import Manifest, sha256_file
from models.store import ModelStore, cached_demo
from models.zoo import DEMO_VERSION, TASKS, Task


@dataclass(frozen=True)
class Built:
    manifest: Manifest
    seconds: float
    cached: bool


def build_demo(models_dir: Path, task: Task, *, force: bool = False) -> Built:
    """The demo model of ``task``: seeded weights, exported and checked; cached on disk."""
    start = time.perf_counter()
    if not force and (existing := cached_demo(ModelStore(models_dir), task)) is not None:
        return Built(existing, time.perf_counter() - start, cached=True)
    module = Screening(task, backbone(task))
    demo_weights(module, task, task.seed)
    manifest = export(
        module,
        task,
        models_dir,
        name=task.name,
        version=DEMO_VERSION,
        source=f"demo: seeded weights (seed {task.seed}), batch-norm statistics from noise",
        demo=True,
    )
    return Built(manifest, time.perf_counter() - start, cached=False)


def import_checkpoint(
    models_dir: Path,
    checkpoint: Path,
    *,
    task: str,
    layout: str,
    name: str,
    version: str,
    variant: str | None = None,
) -> Manifest:
    """Convert a user's state dict: ``layout`` is ``torchxrayvision`` or ``filmless``."""
    spec = TASKS[task]
    state = read_state_dict(checkpoint)
    thresholds = None
    if layout == "torchxrayvision":
        if task != "chest-xray":
            raise ValueError("the torchxrayvision layout is a chest X-ray DenseNet-121")
        state, thresholds = from_torchxrayvision(state)
    elif layout != "filmless":
        raise ValueError(f"unknown checkpoint layout {layout!r}")
    network = backbone(spec, variant)
    load_into(network, state)
    architecture = spec.architecture
    if variant:
        architecture = architecture.replace(spec.options.get("variant", variant), variant)
    return export(
        Screening(spec, network),
        spec,
        models_dir,
        name=name,
        version=version,
        source=f"imported from {checkpoint.name} ({layout} layout)",
        demo=False,
        checkpoint_sha256=sha256_file(checkpoint),
        operating_points=operating_points(spec, thresholds),
        architecture=architecture,
    )
