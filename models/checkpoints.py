"""Public checkpoints into our architectures: key renames, checked, never silently lossy.

A TorchXRayVision DenseNet-121 uses torchvision's layout; MONAI's DenseNet121 nests each
dense layer's modules under ``layers`` and calls the classifier ``class_layers.out``.
Every key of the checkpoint must land on a parameter of the same shape and every
parameter must be filled; otherwise the import is refused with the keys that did not.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from models.manifest import OperatingPoint
from models.zoo import Task

_DENSE_LAYER = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.(?!layers\.)(.+)$")
_IGNORED_BUFFERS = ("num_batches_tracked",)
_SHOWN = 8


class CheckpointError(ValueError):
    """A checkpoint that does not fit the architecture; the message names the keys."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only``): a checkpoint cannot run code on import."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or pickled files
        raise CheckpointError(
            f"{path} is not a state dict of tensors ({exc}); save one with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise CheckpointError(f"{path} does not hold a state dict (names -> tensors)")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def from_torchxrayvision(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[float] | None]:
    """Rename a TorchXRayVision DenseNet state dict; returns it and its ``op_threshs``."""
    renamed: dict[str, torch.Tensor] = {}
    thresholds = None
    for key, value in state.items():
        if key == "op_threshs":
            thresholds = [float(v) for v in value.flatten()]
            continue
        if key.startswith("classifier."):
            target = "class_layers.out." + key.removeprefix("classifier.")
        else:
            target = _DENSE_LAYER.sub(r"\1.layers.\2", key)
        renamed[target] = value
    return renamed, thresholds


def load_into(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load with a message that says exactly what did not match."""
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.endswith(_IGNORED_BUFFERS))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} keys match no parameter: {_some(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} parameters are not in the checkpoint: {_some(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} shapes differ: {_some(wrong)}")
    if problems:
        raise CheckpointError("; ".join(problems))
    module.load_state_dict(state, strict=False)


def _some(keys: list[str]) -> str:
    more = f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def operating_points(task: Task, thresholds: list[float] | None) -> list[OperatingPoint]:
    """The checkpoint's calibrated thresholds where it has them, 0.5 elsewhere."""
    if thresholds is None:
        return task.operating_points
    output = task.outputs[0]
    if len(thresholds) != len(output.labels):
        raise CheckpointError(
            f"op_threshs has {len(thresholds)} values for {len(output.labels)} labels"
        )
    return [
        OperatingPoint(
            output=output.name,
            label=label,
            threshold=value if math.isfinite(value) and 0 <= value <= 1 else 0.5,
        )
        for label, value in zip(output.labels, thresholds, strict=True)
    ]
