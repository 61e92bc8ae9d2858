"""The screening tasks: what each model takes, gives and applies to.

Plain data, no torch: the manifest of every model of a task (built, imported or added)
starts from these definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.manifest import (
    Aggregation,
    OperatingPoint,
    OutputSpec,
    Preprocessing,
    Quality,
    Routing,
    TensorSpec,
)

# TorchXRayVision's "all" label set, in its order (xrv.datasets.default_pathologies).
CXR_LABELS = [
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
]
ICDR_GRADES = [
    "0 no apparent retinopathy",
    "1 mild NPDR",
    "2 moderate NPDR",
    "3 severe NPDR",
    "4 proliferative DR",
]
DENSITY = ["A", "B", "C", "D"]
DEMO_VERSION = "0.5.0-demo"

DX_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray For Presentation
]
MG_FOR_PRESENTATION = ["1.2.840.10008.5.1.4.1.1.1.2"]
FUNDUS_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (many fundus cameras)
]


@dataclass(frozen=True)
class Task:
    """A task and the demo model ``filmless models build`` makes for it."""

    task: str
    name: str
    architecture: str
    description: str
    intended_use: str
    input: TensorSpec
    outputs: list[OutputSpec]
    preprocessing: Preprocessing
    routing: Routing
    operating_points: list[OperatingPoint]
    aggregation: Aggregation | None = None
    quality: Quality | None = None
    parametric_maps: int = 0
    seed: int = 0
    options: dict[str, str] = field(default_factory=dict)


CHEST_XRAY = Task(
    task="chest-xray",
    name="cxr-densenet121",
    architecture="monai DenseNet121(spatial_dims=2, in_channels=1, out_channels=18)",
    description="Chest X-ray findings, 18 TorchXRayVision labels, frontal PA/AP views.",
    intended_use=(
        "Screening aid that flags frontal chest radiographs (PA or AP) of adults for review "
        "by a radiologist. Not for lateral views, children, or use without a reader."
    ),
    input=TensorSpec(name="image", shape=["batch", 1, 224, 224]),
    outputs=[
        OutputSpec(
            name="probabilities", shape=["batch", 18], labels=CXR_LABELS, activation="sigmoid"
        ),
        # Class activation maps on the 7x7 grid of the last dense block (32 input pixels a
        # cell), squashed like the probabilities: where each finding's evidence is.
        OutputSpec(
            name="activation_maps",
            shape=["batch", 18, 7, 7],
            labels=CXR_LABELS,
            activation="sigmoid",
            kind="map",
        ),
    ],
    preprocessing=Preprocessing(
        color="grayscale",
        size=(224, 224),
        keep_aspect=False,
        crop="center",
        voi="window",
        intensity_range=(-1024.0, 1024.0),
    ),
    routing=Routing(
        level="instance",
        match={
            "Modality": ["DX", "CR"],
            "SOPClassUID": DX_CLASSES,
            "ViewPosition": ["PA", "AP"],
            "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2"],
        },
    ),
    operating_points=[
        OperatingPoint(output="probabilities", label=label, threshold=0.5) for label in CXR_LABELS
    ],
    # Conservative limits (see the quality gate's tests): a radiograph burnt out or blank
    # over half its area, nearly flat, or blurred beyond what 224 pixels resolve.
    quality=Quality(
        max_underexposed=0.5, max_overexposed=0.5, min_contrast=0.02, min_sharpness=5e-6
    ),
    # The three most probable positive findings get a heatmap a viewer overlays.
    parametric_maps=3,
    seed=1,
)

FUNDUS = Task(
    task="fundus",
    name="fundus-efficientnet-b0",
    architecture="monai EfficientNetBN('efficientnet-b0', in_channels=3, num_classes=5)",
    description="Diabetic retinopathy: ICDR grade 0-4 per eye, referable DR (grade >= 2).",
    intended_use=(
        "Screening aid for diabetic retinopathy on colour fundus photographs, one eye per "
        "image, referring grade 2 or worse to an ophthalmologist."
    ),
    input=TensorSpec(name="image", shape=["batch", 3, 512, 512]),
    outputs=[
        OutputSpec(
            name="grade_probabilities",
            shape=["batch", 5],
            labels=ICDR_GRADES,
            activation="softmax",
        ),
        OutputSpec(
            name="referable", shape=["batch", 1], labels=["referable DR"], activation="softmax"
        ),
    ],
    preprocessing=Preprocessing(
        color="rgb",
        size=(512, 512),
        keep_aspect=True,
        crop="circle",
        voi="minmax",
        intensity_range=(0.0, 1.0),
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    ),
    # An exam: each eye, and the patient referable if either eye is, once the study's
    # photographs have all arrived.
    routing=Routing(
        level="study",
        match={
            "Modality": ["OP", "XC"],
            "SOPClassUID": FUNDUS_CLASSES,
            "PhotometricInterpretation": ["RGB", "YBR_FULL", "YBR_FULL_422"],
            # Results are per eye: an image of no known eye is skipped, with the reason.
            "ImageLaterality": ["L", "R"],
        },
    ),
    operating_points=[
        OperatingPoint(output="referable", label="referable DR", threshold=0.5),
    ],
    # Ungradable photographs as screening programmes grade them: too dark, washed out,
    # flat, blurred, or a field narrowed (small pupil, misaligned camera).
    quality=Quality(
        min_brightness=0.15,
        max_overexposed=0.25,
        min_contrast=0.02,
        min_sharpness=3e-6,
        min_field_of_view=0.6,
    ),
    seed=2,
    options={"variant": "efficientnet-b0"},
)

GLAUCOMA = Task(
    task="glaucoma",
    name="glaucoma-efficientnet-b0",
    architecture="monai EfficientNetBN('efficientnet-b0', in_channels=3, num_classes=2)",
    description=(
        "Glaucoma: referable glaucoma probability and vertical cup-to-disc ratio per eye "
        "(the AIROGS task)."
    ),
    intended_use=(
        "Screening aid for glaucoma on colour fundus photographs (the same photographs as "
        "diabetic retinopathy screening), one eye per image, referring eyes whose optic "
        "disc suggests glaucoma to an ophthalmologist. Not a diagnosis of glaucoma."
    ),
    input=FUNDUS.input,
    outputs=[
        # A ratio in [0, 1], not a probability: the sigmoid bounds it.
        OutputSpec(
            name="vertical_cdr",
            shape=["batch", 1],
            labels=["vertical cup-to-disc ratio"],
            activation="sigmoid",
        ),
        OutputSpec(
            name="referable",
            shape=["batch", 1],
            labels=["referable glaucoma"],
            activation="sigmoid",
        ),
    ],
    # The DR model's: the photograph is decoded and preprocessed once for both. The
    # circular crop keeps the whole field of view, and so the optic disc.
    preprocessing=FUNDUS.preprocessing,
    routing=FUNDUS.routing,
    # High specificity, as glaucoma screening needs (AIROGS judges sensitivity at 95%
    # specificity): a low prevalence makes every false positive a costly referral.
    operating_points=[
        OperatingPoint(output="referable", label="referable glaucoma", threshold=0.75),
    ],
    quality=FUNDUS.quality,
    seed=4,
    options={"variant": "efficientnet-b0"},
)

MAMMOGRAPHY = Task(
    task="mammography",
    name="mammo-efficientnet-b0",
    architecture="monai EfficientNetBN('efficientnet-b0', in_channels=1, num_classes=5)",
    description=(
        "Screening mammography: per-view malignancy score aggregated over L/R x CC/MLO, "
        "and BI-RADS breast density A-D."
    ),
    intended_use=(
        "Second-reader aid for four-view screening mammograms (FOR PRESENTATION), giving a "
        "suspicion score per breast and a density category. Not for diagnostic work-up."
    ),
    input=TensorSpec(name="image", shape=["batch", 1, 1024, 512]),
    outputs=[
        OutputSpec(
            name="malignancy", shape=["batch", 1], labels=["malignancy"], activation="sigmoid"
        ),
        OutputSpec(name="density", shape=["batch", 4], labels=DENSITY, activation="softmax"),
        # The malignancy logit's class activation map on the 32x16 grid of the last
        # feature map (32 input pixels a cell): where a positive view's evidence is.
        OutputSpec(
            name="activation_maps",
            shape=["batch", 1, 32, 16],
            labels=["malignancy"],
            activation="sigmoid",
            kind="map",
        ),
    ],
    preprocessing=Preprocessing(
        color="grayscale",
        size=(1024, 512),
        keep_aspect=True,
        crop="none",
        voi="window",
        laterality="left",
        intensity_range=(0.0, 1.0),
    ),
    routing=Routing(
        level="study",
        match={
            "Modality": ["MG"],
            "SOPClassUID": MG_FOR_PRESENTATION,
            "PresentationIntentType": ["FOR PRESENTATION"],
            "ViewPosition": ["CC", "MLO"],
            "ImageLaterality": ["L", "R"],
        },
        required_views=["L-CC", "L-MLO", "R-CC", "R-MLO"],
    ),
    operating_points=[
        OperatingPoint(output="malignancy", label="malignancy", threshold=0.5),
    ],
    aggregation=Aggregation(per_breast="mean", exam="max", density="mean"),
    # The air around the breast is black on every mammogram: no limit on black.
    quality=Quality(max_overexposed=0.3, min_contrast=0.03, min_sharpness=5e-6),
    seed=3,
    options={"variant": "efficientnet-b0"},
)

TASKS: dict[str, Task] = {t.task: t for t in (CHEST_XRAY, FUNDUS, GLAUCOMA, MAMMOGRAPHY)}
# Tasks read per eye on fundus photographs: an exam of each eye, then the patient.
EYE_TASKS = ("fundus", "glaucoma")
