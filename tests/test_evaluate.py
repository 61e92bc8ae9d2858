"""``filmless evaluate`` end to end, on a labelled set whose truth the test controls.

The planted-truth set (:mod:`tests.support.planted`) gives every score from the pixels
the test wrote, so each metric is checked against scikit-learn or a count made here, not
against the code under test. The same set is read from a DICOM folder, from the archive
(after ``filmless import``) and from a folder of PNGs, locally and on a real two-worker
Dask cluster; the checklists' demand that the same inputs and seed give the same result
is checked byte for byte.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from distributed import LocalCluster
from PIL import Image
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from filmless.cli import main
from tests.support import planted

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Planted:
    folder: Path
    model: Path
    cases: list[planted.Case]
    labels: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("evaluate")
    cases = planted.dicom_set(root / "dicom")
    return Planted(
        root / "dicom",
        planted.model(root / "model"),
        cases,
        planted.labels_csv(root / "labels.csv", cases),
    )


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith("FILMLESS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FILMLESS_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _evaluate(*args: str | Path) -> int:
    return main(["evaluate", "--resamples", "300", *map(str, args)])


def _metrics(out: Path) -> Any:
    return json.loads((out / "metrics.json").read_text())


def _bright(metrics: Any, model: int = 0) -> Any:
    return metrics["models"][model]["labels"]["Bright"]


def test_a_dicom_folder_is_scored_as_the_planted_truth_says(
    setup: Planted, env: Path, tmp_path: Path
) -> None:
    """Every metric against scikit-learn or a count made here, from scores computed
    from the pixels; a second run reads the cache and writes the same metrics.json."""
    cases = setup.cases
    out = tmp_path / "run"
    cache = tmp_path / "cache.sqlite"
    args: list[str | Path] = ["--model", setup.model, "--folder", setup.folder]
    assert _evaluate(*args, "--labels", setup.labels, "--out", out, "--cache", cache) == 0
    truth = np.array([c.bright for c in cases])
    scores = np.array([c.score for c in cases])
    found = _bright(_metrics(out))
    assert found["n"] == len(cases)
    assert found["positives"] == int(truth.sum())
    assert found["patients"] == len({c.patient for c in cases})
    auroc = found["auroc"]
    assert isinstance(auroc, dict)
    assert auroc["value"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
    assert 0.5 < auroc["value"] < 1.0, "the planted set must be neither trivial nor random"
    assert auroc["delong"]["low"] < auroc["value"] < auroc["delong"]["high"]
    assert auroc["bootstrap"]["low"] < auroc["value"] < auroc["bootstrap"]["high"]
    assert found["auprc"] == pytest.approx(average_precision_score(truth, scores), abs=1e-6)
    assert found["brier"] == pytest.approx(brier_score_loss(truth, scores), abs=1e-6)
    (point,) = found["operating_points"]
    called = scores >= 0.5
    assert point["threshold"] == 0.5
    assert point["counts"] == {
        "TP": int((called & (truth == 1)).sum()),
        "FP": int((called & (truth == 0)).sum()),
        "TN": int((~called & (truth == 0)).sum()),
        "FN": int((~called & (truth == 1)).sum()),
    }
    assert point["sensitivity"]["value"] == pytest.approx(
        point["counts"]["TP"] / truth.sum(), abs=1e-6
    )
    # Subgroups: the header's sex and vendor, the labels file's site.
    groups = found["subgroups"]
    assert isinstance(groups, dict)
    assert groups["PatientSex"]["F"]["n"] == sum(c.sex == "F" for c in cases)
    assert set(groups["site"]) == {"north", "south"}
    assert set(groups["Manufacturer"]) == {"Vendor A", "Vendor B"}
    assert all(
        v["small"] == (min(v["positives"], v["negatives"]) < 10) for v in groups["site"].values()
    )
    # Mismatches are listed, not dropped: the model's other label has no column.
    reference = _metrics(out)["reference_standard"]
    assert isinstance(reference, dict)
    assert reference["model_labels_without_column"] == ["Dark"]
    with (out / "predictions.csv").open() as stream:
        rows = {r["unit"]: r for r in csv.DictReader(stream)}
    for c in cases:
        assert float(rows[c.path]["score Bright"]) == pytest.approx(c.score, abs=1e-5)
        assert rows[c.path]["truth Bright"] == str(c.bright)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"][0]["weights_sha256"] == planted.sha256(setup.model / "model.onnx")
    assert manifest["labels"]["sha256"] == planted.sha256(setup.labels)
    assert manifest["models"][0]["throughput"]["images_run"] == len(cases)
    for name in ("report.html", "report.md", "roc.png", "pr.png", "calibration.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "Reporting checklist" in report
    assert "false positive" in report or "false negative" in report

    again = tmp_path / "again"
    assert _evaluate(*args, "--labels", setup.labels, "--out", again, "--cache", cache) == 0
    assert (again / "metrics.json").read_bytes() == (out / "metrics.json").read_bytes()
    repeat = json.loads((again / "manifest.json").read_text())
    assert repeat["models"][0]["throughput"]["images_from_cache"] == len(cases)
    assert repeat["models"][0]["throughput"]["images_run"] == 0


def test_the_archive_and_a_dask_cluster_give_the_folders_metrics_byte_for_byte(
    setup: Planted, env: Path, tmp_path: Path
) -> None:
    """The same images queried from the archive (QIDO-RS keys), and run on a real local
    Dask cluster of two worker processes, give the same metrics.json as the folder."""
    labels, model = setup.labels, setup.model
    folder = tmp_path / "folder"
    assert (
        _evaluate(
            "--model",
            model,
            "--folder",
            setup.folder,
            "--labels",
            labels,
            "--out",
            folder,
            "--cache",
            tmp_path / "a.sqlite",
        )
        == 0
    )
    assert main(["import", str(setup.folder)]) == 0
    archived = tmp_path / "archived"
    assert (
        _evaluate(
            "--model",
            model,
            "--archive",
            "Modality=DX&PatientID=P*",
            "--labels",
            labels,
            "--out",
            archived,
            "--cache",
            tmp_path / "b.sqlite",
            "--viewer-url",
            "http://127.0.0.1:8080",
        )
        == 0
    )
    assert (archived / "metrics.json").read_bytes() == (folder / "metrics.json").read_bytes()
    report = (archived / "report.md").read_text()
    assert "](http://127.0.0.1:8080/viewer/viewer?StudyInstanceUIDs=" in report
    with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        remote = tmp_path / "cluster"
        assert (
            _evaluate(
                "--model",
                model,
                "--folder",
                setup.folder,
                "--labels",
                labels,
                "--out",
                remote,
                "--cache",
                tmp_path / "c.sqlite",
                "--cluster",
                cluster.scheduler_address,
            )
            == 0
        )
    assert (remote / "metrics.json").read_bytes() == (folder / "metrics.json").read_bytes()
    spent = json.loads((remote / "manifest.json").read_text())["models"][0]["throughput"]
    assert spent["where"].startswith("tcp://127.0.0.1:")
    assert spent["workers"] == 2
    assert spent["images_run"] == len(setup.cases)


def test_pictures_keyed_by_path_are_clustered_by_the_labels_patients(
    setup: Planted, env: Path, tmp_path: Path
) -> None:
    cases = planted.picture_set(tmp_path / "png")
    labels = planted.labels_csv(tmp_path / "labels.csv", cases, by_path=True)
    out = tmp_path / "run"
    assert (
        _evaluate(
            "--model",
            setup.model,
            "--folder",
            tmp_path / "png",
            "--labels",
            labels,
            "--key",
            "path",
            "--out",
            out,
            "--cache",
            tmp_path / "c.sqlite",
        )
        == 0
    )
    found = _bright(_metrics(out))
    truth = np.array([c.bright for c in cases])
    scores = np.array([c.score for c in cases])
    assert found["n"] == len(cases)
    assert found["patients"] == len(cases) // 2  # two pictures per patient
    assert found["auroc"]["value"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command printed, with the terminal's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def _youden(scores: np.ndarray, truth: np.ndarray) -> float:
    """Brute force: the threshold among the scores with the highest J, the highest
    threshold among ties."""
    best, chosen = -2.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        called = scores >= t
        j = called[truth == 1].mean() - called[truth == 0].mean()
        if j > best + 1e-12:
            best, chosen = j, t
    return chosen


def test_operating_points_are_derived_on_the_validation_set_only(
    setup: Planted, env: Path, tmp_path: Path
) -> None:
    cases = setup.cases
    validation = [c for c in cases if int(c.patient[1:]) < 15]
    test = [c for c in cases if int(c.patient[1:]) >= 15]
    val_csv = planted.labels_csv(tmp_path / "validation.csv", validation)
    test_csv = planted.labels_csv(tmp_path / "test.csv", test)
    out = tmp_path / "run"
    base: list[str | Path] = [
        "--model",
        setup.model,
        "--folder",
        setup.folder,
        "--cache",
        tmp_path / "c.sqlite",
    ]
    assert (
        _evaluate(
            *base, "--labels", test_csv, "--derive", "youden", "--validation", val_csv, "--out", out
        )
        == 0
    )
    found = _bright(_metrics(out))
    assert found["n"] == len(test)
    (point,) = found["operating_points"]
    wanted = _youden(
        np.array([c.score for c in validation]), np.array([c.bright for c in validation])
    )
    assert point["threshold"] == pytest.approx(wanted, abs=1e-6)
    assert point["source"].startswith("derived: youden on the validation set")
    # The same units in both files, or a patient in both sets, is refused.
    assert (
        _evaluate(
            *base,
            "--labels",
            test_csv,
            "--derive",
            "youden",
            "--validation",
            test_csv,
            "--out",
            tmp_path / "x",
        )
        == 2
    )
    # P000's first image for validation, its second in the test set: one patient, two sets.
    shared = planted.labels_csv(tmp_path / "shared.csv", [cases[0]])
    others = planted.labels_csv(tmp_path / "others.csv", cases[1:])
    assert (
        _evaluate(
            *base,
            "--labels",
            others,
            "--derive",
            "sensitivity>=0.9",
            "--validation",
            shared,
            "--out",
            tmp_path / "y",
        )
        == 2
    )
    assert (
        _evaluate(*base, "--labels", test_csv, "--derive", "youden", "--out", tmp_path / "z") == 2
    )


def test_two_scorers_are_compared_on_the_same_units(
    setup: Planted, env: Path, tmp_path: Path
) -> None:
    """The model against scores made elsewhere (the planted score plus noise): the
    AUROC difference is the difference of scikit-learn's, McNemar's counts are counted
    here."""
    cases = setup.cases
    rng = np.random.default_rng(9)
    other = {c.sop: float(np.clip(c.score + rng.normal(0, 0.15), 0, 1)) for c in cases}
    elsewhere = tmp_path / "elsewhere.csv"
    with elsewhere.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["SOPInstanceUID", "Bright", "model", "version"])
        writer.writerows([sop, repr(score), "reader-study", "2"] for sop, score in other.items())
    thresholds = tmp_path / "points.json"
    thresholds.write_text(json.dumps({"Bright": 0.5}))
    out = tmp_path / "run"
    assert (
        _evaluate(
            "--model",
            setup.model,
            "--folder",
            setup.folder,
            "--predictions",
            elsewhere,
            "--labels",
            setup.labels,
            "--thresholds",
            thresholds,
            "--out",
            out,
            "--cache",
            tmp_path / "c.sqlite",
        )
        == 0
    )
    metrics = _metrics(out)
    truth = np.array([c.bright for c in cases])
    first = np.array([c.score for c in cases])
    second = np.array([other[c.sop] for c in cases])
    (comparison,) = metrics["comparisons"]
    assert (comparison["first"], comparison["second"]) == ("planted", "reader-study")
    found = comparison["labels"]["Bright"]
    assert found["n"] == len(cases)
    difference = roc_auc_score(truth, first) - roc_auc_score(truth, second)
    assert found["auroc_difference"]["difference"]["value"] == pytest.approx(difference, abs=1e-6)
    assert 0 <= found["auroc_difference"]["p"] <= 1
    right_first = (first >= 0.5) == truth
    right_second = (second >= 0.5) == truth
    assert found["mcnemar"]["only_first_right"] == int((right_first & ~right_second).sum())
    assert found["mcnemar"]["only_second_right"] == int((~right_first & right_second).sum())
    assert _bright(metrics, 1)["auroc"]["value"] == pytest.approx(
        roc_auc_score(truth, second), abs=1e-6
    )
    assert "planted against reader-study" in (out / "report.md").read_text()


def test_requests_that_cannot_be_run_exit_2_with_the_reason(
    setup: Planted, env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder: list[str | Path] = ["--folder", setup.folder]
    out: list[str | Path] = ["--out", tmp_path / "run"]
    assert _evaluate("--model", "no-such-model", *folder, "--labels", setup.labels, *out) == 2
    assert "no such model" in _said(capsys)
    keyless = tmp_path / "keyless.csv"
    keyless.write_text("Bright\n1\n")
    assert _evaluate("--model", setup.model, *folder, "--labels", keyless, *out) == 2
    assert "no key column" in _said(capsys)
    assert (
        _evaluate(
            "--model",
            setup.model,
            *folder,
            "--labels",
            setup.labels,
            "--derive",
            "sensitivity>=2",
            "--validation",
            setup.labels,
            *out,
        )
        == 2
    )
    assert "--derive" in _said(capsys)
    assert (
        _evaluate("--model", setup.model, *folder, "--labels", setup.labels, "--unit", "eye", *out)
        == 2
    )
    assert "fundus" in _said(capsys)


def test_files_from_other_sources_are_scored_or_listed_with_their_reason(
    env: Path, tmp_path: Path
) -> None:
    """pydicom's bundled files (many vendors, syntaxes and malformations), pictures of
    every depth, a broken one and a text file: each is scored or listed, nothing is
    dropped, nothing stops the run."""
    folder = tmp_path / "mixed"
    shutil.copytree(Path(pydicom.__file__).parent / "data" / "test_files", folder / "pydicom")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(
        folder / "wide.png"
    )
    Image.fromarray(np.tile(np.array([10, 200, 30], np.uint8), (16, 16, 1))).save(
        folder / "colour.png"
    )
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(folder / "grey-as-rgb.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "notes.txt").write_text("not an image")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,Bright\nwide.png,1\ngrey-as-rgb.jpg,0\n")
    model = planted.model(tmp_path / "model", any_image=True)
    out = tmp_path / "run"
    assert (
        _evaluate(
            "--model",
            model,
            "--folder",
            folder,
            "--labels",
            labels,
            "--key",
            "path",
            "--out",
            out,
            "--cache",
            tmp_path / "c.sqlite",
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    with (out / "predictions.csv").open() as stream:
        scored = {r["unit"] for r in csv.DictReader(stream)}
    excluded = {e["unit"]: e["reason"] for e in manifest["excluded"]["planted"]}
    skipped = {s["path"]: s["reason"] for s in manifest["skipped_files"]}
    assert "notes.txt" in skipped
    assert {"wide.png", "grey-as-rgb.jpg"} <= scored
    assert "colour picture" in excluded["colour.png"]
    assert "broken.png" in excluded
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert manifest["images"]["count"] + len(skipped) == len(files)
    assert len(scored) + len(excluded) == manifest["images"]["count"]
    assert sum(1 for u in scored if u.startswith("pydicom/")) > 10
    found = _bright(_metrics(out))
    assert (found["n"], found["positives"]) == (2, 1)
