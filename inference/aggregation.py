"""How a study-level model's per-view outputs become a breast's and an exam's result.

One function for screening and for evaluation (:mod:`inference.evaluate`), so that a
study is scored the same way in both: pure, over the view names and outputs only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from inference.readings import View
from inference.report import Finding
from models.manifest import Manifest


def aggregate(manifest: Manifest, views: Sequence[View]) -> tuple[list[Finding], dict[str, float]]:
    """Mammography: malignancy per breast over its views, the exam over breasts, density
    over every view, each reduced as the manifest's aggregation says; and the score of
    each breast (by its laterality)."""
    assert manifest.aggregation is not None
    rule = manifest.aggregation
    reduce: dict[str, Callable[..., Any]] = {"max": np.max, "mean": np.mean}
    breasts: dict[str, list[float]] = defaultdict(list)
    densities = []
    for seen in views:
        breasts[seen.name.split("-")[0]].append(float(seen.outputs["malignancy"][0]))
        densities.append(seen.outputs["density"])
    per_breast = {side: float(reduce[rule.per_breast](v)) for side, v in sorted(breasts.items())}
    exam = float(reduce[rule.exam](list(per_breast.values())))
    threshold = manifest.threshold("malignancy")
    found = [
        Finding("malignancy", f"malignancy {side}", v, threshold) for side, v in per_breast.items()
    ]
    found.append(Finding("malignancy", "malignancy exam", exam, threshold))
    combined = reduce[rule.density](np.stack(densities), axis=0)
    labels = next(o for o in manifest.outputs if o.name == "density").labels
    found += [
        Finding("density", f"density {label}", float(p), None)
        for label, p in zip(labels, combined, strict=True)
    ]
    return found, per_breast
