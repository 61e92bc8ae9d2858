"""Manifests of the zoo's tasks without building any model: for routing and scheduling."""

from __future__ import annotations

from datetime import UTC, datetime

from models.manifest import Manifest, Provenance, Weights
from models.zoo import CHEST_XRAY, FUNDUS, MAMMOGRAPHY, Task


def manifest_of(task: Task, *, default: bool = True) -> Manifest:
    return Manifest(
        name=task.name,
        version="test",
        task=task.task,
        default=default,
        description=task.description,
        intended_use=task.intended_use,
        clinical_use=False,
        weights=Weights(file="model.onnx", sha256="0" * 64, demo=True),
        input=task.input,
        outputs=task.outputs,
        preprocessing=task.preprocessing,
        operating_points=task.operating_points,
        routing=task.routing,
        aggregation=task.aggregation,
        quality=task.quality,
        parametric_maps=task.parametric_maps,
        provenance=Provenance(
            source="test",
            architecture=task.architecture,
            created=datetime.now(UTC).isoformat(),
            exporter="test",
            opset=18,
        ),
    )


ZOO = [manifest_of(CHEST_XRAY), manifest_of(FUNDUS), manifest_of(MAMMOGRAPHY)]
