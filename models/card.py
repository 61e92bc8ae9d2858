"""A model card (Markdown) written from the manifest, so the two never disagree."""

from __future__ import annotations

from pathlib import Path

from models.codes import SCHEME, card_rows
from models.manifest import Manifest


def render_card(m: Manifest) -> str:
    status = (
        "**Not for clinical use.** "
        + (
            "These are generated demonstration weights with no diagnostic meaning."
            if m.weights.demo
            else "Not cleared for clinical use by the party that supplied it."
        )
        if not m.clinical_use
        else "Cleared for clinical use as stated by its supplier."
    )
    p = m.preprocessing
    lines = [
        f"# {m.name} {m.version} ({m.variant})",
        "",
        status,
        "",
        m.description,
        "",
        "## Intended use",
        "",
        m.intended_use,
        "",
        "## Applies to",
        "",
        f"Runs per {m.routing.level} when all of these hold:",
        "",
    ]
    lines += [f"- {keyword}: {', '.join(values)}" for keyword, values in m.routing.match.items()]
    if m.routing.required_views:
        lines.append(f"- views required in the study: {', '.join(m.routing.required_views)}")
    shape = "x".join(str(v) for v in m.input.shape)
    lines += [
        "",
        "## Input",
        "",
        f"`{m.input.name}` {m.input.dtype} {shape}: {p.color}, {p.size[0]}x{p.size[1]}"
        + (", aspect kept (padded)" if p.keep_aspect else "")
        + (f", {p.crop} crop" if p.crop != "none" else "")
        + f", VOI by {p.voi}, scaled to [{p.intensity_range[0]:g}, {p.intensity_range[1]:g}]"
        + (", MONOCHROME1 inverted" if p.invert_monochrome1 else "")
        + (
            ", flipped so the breast faces left, the chest wall kept at the left edge"
            if p.laterality == "left"
            else ""
        )
        + ".",
        "",
        "## Outputs",
        "",
        "| output | activation | labels |",
        "|---|---|---|",
    ]
    for output in m.outputs:
        lines.append(f"| `{output.name}` | {output.activation} | {', '.join(output.labels)} |")
    lines += ["", "## Operating points", "", "| output | label | threshold |", "|---|---|---:|"]
    for point in m.operating_points:
        lines.append(f"| {point.output} | {point.label} | {point.threshold:.3f} |")
    if m.task in ("fundus", "glaucoma") and m.routing.level == "study":
        lines += [
            "",
            "## Exam-level aggregation",
            "",
            "Each eye: its gradable photograph with the highest referable probability; an "
            "eye with none is ungradable. The exam: referable if either eye is, else "
            "ungradable if an eye is, else not referable.",
        ]
    if m.aggregation is not None:
        a = m.aggregation
        lines += [
            "",
            "## Exam-level aggregation",
            "",
            f"Per breast: {a.per_breast} over its views; exam: {a.exam} over breasts; "
            f"density: {a.density} over all views.",
        ]
    if m.quality is not None:
        lines += ["", "## Quality gate", ""]
        lines.append(
            "Before the model runs, its input (intensities in [0, 1], over the field) is "
            "measured; an image outside these limits is not assessable and gets no result:"
        )
        lines.append("")
        lines += [
            f"- {QUALITY_WORDS[name]}: {value:g}"
            for name, value in m.quality.model_dump(exclude_none=True).items()
        ]
    if m.parametric_maps:
        lines += [
            "",
            "## Heatmaps",
            "",
            f"The class activation maps of the {m.parametric_maps} most probable positive "
            "findings are stored as DICOM Parametric Maps in their own series beside the "
            "report, which lists them as evidence: on the source image's pixels, each map "
            "scaled from its lowest cell (0) to its highest (1), and 0 below 0.5.",
        ]
    lines += [
        "",
        "## Codes in reports",
        "",
        "Standard codes (SNOMED CT, DICOM) where DICOM PS3.16 lists one; the others are in "
        f"the private scheme {SCHEME}, declared in every report.",
        "",
        "| label or concept | code |",
        "|---|---|",
    ]
    labels = [label for output in m.outputs if output.kind != "map" for label in output.labels]
    lines += [f"| {label} | {code} |" for label, code in card_rows(m.task, labels)]
    v = m.provenance
    lines += [
        "",
        "## Provenance",
        "",
        f"- source: {v.source}",
        f"- architecture: `{v.architecture}`",
        f"- weights: `{m.weights.file}`, sha256 `{m.weights.sha256}`",
    ]
    if v.checkpoint_sha256:
        lines.append(f"- checkpoint sha256: `{v.checkpoint_sha256}`")
    if v.calibration:
        lines.append(f"- calibration: {v.calibration}")
    lines += [
        f"- exported: {v.exporter}; created {v.created}",
        f"- torch {v.torch or 'n/a'}, MONAI {v.monai or 'n/a'}",
        "",
    ]
    return "\n".join(lines)


QUALITY_WORDS = {
    "min_brightness": "mean brightness at least",
    "max_underexposed": "fraction at black at most",
    "max_overexposed": "fraction at white at most",
    "min_contrast": "intensity standard deviation at least",
    "min_sharpness": "variance of the Laplacian at least",
    "min_field_of_view": "field of view (diameter over the shorter side) at least",
}


def write_card(manifest: Manifest, path: Path) -> None:
    path.write_text(render_card(manifest))
