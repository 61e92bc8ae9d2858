"""The model manifest: everything serving needs to know about an ONNX file, as TOML.

Serving reads only this and the ONNX file (never torch): input and output tensors,
labels, preprocessing, operating points, which instances the model applies to, where the
weights came from and whether they may be used clinically. A manifest is validated when
it is read, so a typo in a routing rule is an error at ``models add``, not a silent
no-op at three in the morning.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

# The sample input and outputs saved at export; `models verify` compares against them.
REFERENCE = "reference.npz"
MANIFEST = "manifest.toml"


class ManifestError(ValueError):
    """A manifest that cannot be read or does not describe its ONNX file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    shape: list[int | str] = Field(description="a string names a dynamic axis, e.g. 'batch'")
    dtype: Literal["float32", "float16"] = "float32"


class OutputSpec(TensorSpec):
    labels: list[str]
    activation: Literal["sigmoid", "softmax", "none"] = Field(
        description="already applied in the graph: the values are probabilities"
    )
    kind: Literal["scores", "map"] = Field(
        "scores",
        description="scores: (batch, labels); map: (batch, labels, rows, columns), where in "
        "the input tensor each label's evidence lies (a class activation map)",
    )

    @model_validator(mode="after")
    def _labels_match_shape(self) -> OutputSpec:
        if self.kind == "map" and len(self.shape) != 4:
            raise ValueError(f"output {self.name}: a map is (batch, labels, rows, columns)")
        width = self.shape[1] if self.kind == "map" else self.shape[-1]
        if isinstance(width, int) and width != len(self.labels):
            raise ValueError(f"output {self.name}: {len(self.labels)} labels for width {width}")
        return self

    def fits(self, shape: tuple[int, ...], batch: int) -> bool:
        """Whether an array of ``shape`` is this output for ``batch`` images."""
        if len(shape) != len(self.shape) or shape[0] != batch:
            return False
        labels_axis = 1 if self.kind == "map" else len(shape) - 1
        if shape[labels_axis] != len(self.labels):
            return False
        return all(
            not isinstance(want, int) or want == got
            for want, got in zip(self.shape[1:], shape[1:], strict=True)
        )


class OperatingPoint(_Strict):
    """Probability at and above which a finding is called positive."""

    output: str
    label: str
    threshold: float = Field(ge=0, le=1)
    sensitivity: float | None = None
    specificity: float | None = None


class Preprocessing(_Strict):
    """DICOM pixels to the input tensor; carried out by the inference pipeline."""

    color: Literal["grayscale", "rgb"]
    size: tuple[int, int] = Field(description="rows, columns of the tensor")
    keep_aspect: bool = Field(description="pad instead of stretching to the size")
    crop: Literal["none", "center", "circle"] = "none"
    voi: Literal["window", "minmax"] = "window"
    invert_monochrome1: bool = True
    laterality: Literal["none", "left"] = Field(
        "none",
        description="'left': flip so the breast faces the left edge; with keep_aspect the "
        "chest wall stays at the input's left edge (padded or cut on the right)",
    )
    intensity_range: tuple[float, float] = Field(description="display range is scaled to this")
    mean: list[float] | None = Field(None, description="per channel, after scaling")
    std: list[float] | None = None


class Quality(_Strict):
    """What an image must be for the model to read it; outside it, it is not assessable.

    Measured on the model's input (intensities in [0, 1], at the input's size, over the
    field: the fundus disc, else the whole image); each threshold is optional.
    """

    min_brightness: float | None = Field(None, ge=0, le=1, description="mean intensity")
    max_underexposed: float | None = Field(
        None, ge=0, le=1, description="largest fraction of the field at black"
    )
    max_overexposed: float | None = Field(
        None, ge=0, le=1, description="largest fraction of the field at white"
    )
    min_contrast: float | None = Field(
        None, ge=0, description="least standard deviation of intensity"
    )
    min_sharpness: float | None = Field(
        None, ge=0, description="least variance of the Laplacian (4-neighbour)"
    )
    min_field_of_view: float | None = Field(
        None,
        ge=0,
        le=1,
        description="colour photographs: least diameter of the bright field over the "
        "photograph's shorter side",
    )


class Routing(_Strict):
    """Which arriving instances the model is run on (all rules must hold)."""

    level: Literal["instance", "study"]
    match: dict[str, list[str]] = Field(description="DICOM keyword -> accepted values")
    required_views: list[str] = Field(
        default_factory=list, description="study level: ImageLaterality-ViewPosition needed"
    )

    @field_validator("match")
    @classmethod
    def _keywords(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for keyword in value:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"routing rule on {keyword!r}, which is not a DICOM keyword")
        return value


class Aggregation(_Strict):
    """How per-view outputs become an exam result (mammography)."""

    per_breast: Literal["max", "mean"]
    exam: Literal["max", "mean"]
    density: Literal["mean", "max"] = "mean"


class Weights(_Strict):
    file: str
    sha256: str
    demo: bool = Field(description="generated weights, not trained: no diagnostic meaning")


class Provenance(_Strict):
    source: str
    architecture: str
    created: str
    exporter: str
    opset: int = Field(ge=17)
    checkpoint_sha256: str | None = None
    torch: str | None = None
    monai: str | None = None
    calibration: str | None = None


class Manifest(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")
    version: str
    task: Literal["chest-xray", "fundus", "glaucoma", "mammography"]
    variant: Literal["fp32", "fp16", "int8"] = "fp32"
    default: bool = Field(True, description="the variant serving uses for this task")
    description: str
    intended_use: str
    clinical_use: bool
    weights: Weights
    input: TensorSpec
    outputs: list[OutputSpec]
    preprocessing: Preprocessing
    operating_points: list[OperatingPoint]
    routing: Routing
    aggregation: Aggregation | None = None
    quality: Quality | None = Field(None, description="the gate before inference")
    parametric_maps: int = Field(
        0,
        ge=0,
        le=32,
        description="how many positive findings (the most probable first) get their class "
        "activation map stored as a DICOM Parametric Map beside the report; 0 for none",
    )
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.weights.demo and self.clinical_use:
            raise ValueError("demo weights are never cleared for clinical use")
        names = {o.name: o for o in self.outputs}
        for point in self.operating_points:
            output = names.get(point.output)
            if output is None or point.label not in output.labels:
                raise ValueError(f"operating point for unknown {point.output}/{point.label}")
        if self.parametric_maps and not any(o.kind == "map" for o in self.outputs):
            raise ValueError("parametric maps need an output of kind 'map'")
        if self.variant == "int8" and self.default:
            raise ValueError(
                "an int8 variant is never the default: its accuracy must be re-checked"
            )
        return self

    def threshold(self, output: str) -> float | None:
        """The operating point of an output (its first label's), None when it has none."""
        return next((p.threshold for p in self.operating_points if p.output == output), None)


def load(path: Path) -> Manifest:
    try:
        return Manifest.model_validate(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ManifestError(f"{path}: {exc}") from exc


def dump(manifest: Manifest, path: Path) -> None:
    path.write_text(tomli_w.dumps(manifest.model_dump(mode="json", exclude_none=True)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
