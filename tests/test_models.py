"""The model zoo: build, export, verify, import, add and variants, through the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tomli_w
import torch

from filmless.cli import main
from models.architectures import Screening, backbone, demo_weights
from models.manifest import Manifest, ManifestError, load
from models.store import ModelStore
from models.zoo import CXR_LABELS, TASKS
from tests.support.torchvision_densenet import seeded


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three demo models, built once through ``filmless models build``."""
    root = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FILMLESS_DATA_DIR", str(root))
        assert main(["models", "build"]) == 0
    return root / "models"


def _cli(models_dir: Path, *args: str) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FILMLESS_MODELS_DIR", str(models_dir))
        return main(["models", *args])


def _run(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(runtime.run(None, {runtime.get_inputs()[0].name: batch}))


@pytest.mark.slow
def test_demo_models_are_built_exported_and_verified(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    installed = {m.manifest.task: m for m in store.installed()}
    assert set(installed) == set(TASKS)
    for task, model in installed.items():
        manifest = model.manifest
        assert manifest.weights.demo
        assert not manifest.clinical_use
        assert manifest.provenance.opset >= 17
        assert store.verify(manifest.name).ok
        # The batch axis is dynamic and the outputs are probabilities.
        shape = [3, *(int(v) for v in manifest.input.shape[1:])]
        batch = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
        outputs = _run(model.onnx, batch)
        for output, value in zip(manifest.outputs, outputs, strict=True):
            assert output.fits(value.shape, batch=3)
            assert np.all((value >= 0) & (value <= 1))
        # Rebuilding the module from the same seed gives what the ONNX file gives.
        spec = TASKS[task]
        module = Screening(spec, backbone(spec))
        demo_weights(module, spec, spec.seed)
        with torch.inference_mode():
            expected = [t.numpy() for t in module(torch.from_numpy(batch))]
        for got, want in zip(outputs, expected, strict=True):
            assert np.abs(got - want).max() < 1e-4
        card = (model.folder / "card.md").read_text()
        assert "Not for clinical use" in card
        assert manifest.weights.sha256 in card
    cxr = installed["chest-xray"].manifest
    assert cxr.outputs[0].labels == CXR_LABELS
    assert cxr.outputs[0].labels[0] == "Atelectasis"
    assert cxr.routing.match["ViewPosition"] == ["PA", "AP"]
    mammo = installed["mammography"].manifest
    assert mammo.routing.required_views == ["L-CC", "L-MLO", "R-CC", "R-MLO"]
    assert mammo.routing.match["PresentationIntentType"] == ["FOR PRESENTATION"]
    fundus = _run(installed["fundus"].onnx, np.zeros((1, 3, 512, 512), np.float32))
    assert np.isclose(fundus[1][0, 0], fundus[0][0, 2:].sum(), atol=1e-6)  # referable


@pytest.mark.slow
def test_demo_outputs_read_like_a_screening_population(models_dir: Path) -> None:
    """On the demo data, most calls are negative and a few positive, so a viewer shows a
    readable report (the weights themselves mean nothing)."""
    import io  # noqa: PLC0415

    from inference.preprocess import preprocess  # noqa: PLC0415
    from pacs.pixels import read_image  # noqa: PLC0415
    from scripts.synthetic_corpus import Patient, Rng, chest_dx, fundus_op, mammography  # noqa: PLC0415

    patient = Patient("DW", "Demo^Weights", "ISO_IR 192", "19700101", "F")
    makers = {
        "chest-xray": chest_dx,
        "fundus": fundus_op,
        "glaucoma": fundus_op,  # the same photographs
        "mammography": mammography,
    }
    store = ModelStore(models_dir)
    for installed in store.installed():
        manifest = installed.manifest
        points = {(p.output, p.label): p.threshold for p in manifest.operating_points}
        for seed, scale in ((1, 0.05), (2, 0.2)):
            ds = makers[manifest.task](Rng(seed), patient, scale, "20260101", "DW")[0]
            stream = io.BytesIO()
            ds.save_as(stream, enforce_file_format=True)
            stream.seek(0)
            tensor = preprocess(stream, manifest.preprocessing, read_image(stream))
            outputs = dict(
                zip(
                    [o.name for o in manifest.outputs],
                    _run(installed.onnx, tensor[None]),
                    strict=True,
                )
            )
            calls = [
                float(outputs[o.name][0][i]) >= points[(o.name, label)]
                for o in manifest.outputs
                for i, label in enumerate(o.labels)
                if (o.name, label) in points
            ]
            if manifest.task == "chest-xray":
                assert 1 <= sum(calls) <= 3, outputs
            else:
                assert not any(calls), outputs
            if manifest.task == "fundus":
                assert int(np.argmax(outputs["grade_probabilities"][0])) == 0
            if manifest.task == "glaucoma":  # the ratio of a healthy disc
                assert 0.2 < float(outputs["vertical_cdr"][0][0]) < 0.5


@pytest.mark.slow
def test_build_is_cached(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in models_dir.glob("*/model.onnx")}
    assert _cli(models_dir, "build") == 0
    assert "cached" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in models_dir.glob("*/model.onnx")} == before


@pytest.mark.slow
def test_torchxrayvision_checkpoint_import(tmp_path: Path) -> None:
    source = seeded()
    checkpoint = tmp_path / "xrv-densenet121.pt"
    torch.save(source.state_dict(), checkpoint)
    assert any(".denselayer1.norm1." in k for k in source.state_dict())
    models_dir = tmp_path / "models"
    assert (
        _cli(
            models_dir,
            "import",
            str(checkpoint),
            "--task",
            "chest-xray",
            "--layout",
            "torchxrayvision",
            "--name",
            "cxr-xrv",
            "--version",
            "1.0",
        )
        == 0
    )
    model = ModelStore(models_dir).get("cxr-xrv")
    assert not model.manifest.weights.demo
    assert model.manifest.provenance.checkpoint_sha256 is not None
    thresholds = [p.threshold for p in model.manifest.operating_points]
    assert np.allclose(thresholds, np.linspace(0.2, 0.7, 18), atol=1e-6)
    batch = np.random.default_rng(1).standard_normal((2, 1, 224, 224)).astype(np.float32)
    with torch.inference_mode():
        expected = source(torch.from_numpy(batch)).numpy()
    got, _maps = _run(model.onnx, batch)
    assert expected.std() > 0.01  # not saturated: the comparison means something
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_own_architecture_checkpoint_import(tmp_path: Path) -> None:
    task = TASKS["chest-xray"]
    source = Screening(task, backbone(task))
    demo_weights(source, task, seed=11)
    torch.save({"state_dict": source.network.state_dict()}, tmp_path / "own.pt")
    args = ["--task", "chest-xray", "--name", "cxr-own", "--version", "2.0"]
    assert _cli(tmp_path / "models", "import", str(tmp_path / "own.pt"), *args) == 0
    model = ModelStore(tmp_path / "models").get("cxr-own")
    assert [p.threshold for p in model.manifest.operating_points] == [0.5] * 18
    batch = np.random.default_rng(2).uniform(-1024, 1024, (2, 1, 224, 224)).astype(np.float32)
    with torch.inference_mode():
        expected = source(torch.from_numpy(batch))
    got = _run(model.onnx, batch)
    for ours, theirs in zip(got, expected, strict=True):  # probabilities and maps
        assert np.abs(ours - theirs.numpy()).max() < 1e-4


@pytest.mark.slow
def test_a_glaucoma_checkpoint_is_imported(tmp_path: Path) -> None:
    """The glaucoma task takes an external state dict like the others: the network's
    two logits (cup-to-disc ratio, referable glaucoma), squashed in the graph."""
    task = TASKS["glaucoma"]
    source = Screening(task, backbone(task))
    demo_weights(source, task, seed=12)
    torch.save(source.network.state_dict(), tmp_path / "glaucoma.pt")
    args = ["--task", "glaucoma", "--name", "glaucoma-own", "--version", "1.0"]
    assert _cli(tmp_path / "models", "import", str(tmp_path / "glaucoma.pt"), *args) == 0
    model = ModelStore(tmp_path / "models").get("glaucoma-own")
    assert [o.name for o in model.manifest.outputs] == ["vertical_cdr", "referable"]
    assert model.manifest.routing == TASKS["fundus"].routing  # the same photographs
    assert model.manifest.preprocessing == TASKS["fundus"].preprocessing  # read once
    batch = np.random.default_rng(3).standard_normal((2, 3, 512, 512)).astype(np.float32)
    with torch.inference_mode():
        expected = source(torch.from_numpy(batch))
    for ours, theirs in zip(_run(model.onnx, batch), expected, strict=True):
        assert np.abs(ours - theirs.numpy()).max() < 1e-4


def test_checkpoint_with_a_wrong_key_or_shape_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = seeded().state_dict()
    renamed = dict(state)
    renamed["features.denseblock1.denselayer1.extra.weight"] = renamed.pop(
        "features.denseblock1.denselayer1.conv1.weight"
    )
    torch.save(renamed, tmp_path / "renamed.pt")
    args = ["--task", "chest-xray", "--layout", "torchxrayvision", "--name", "x", "--version", "1"]
    assert _cli(tmp_path / "models", "import", str(tmp_path / "renamed.pt"), *args) == 1
    message = capsys.readouterr().err.replace("\n", "")
    assert "features.denseblock1.denselayer1.layers.extra.weight" in message
    assert "not in the checkpoint" in message

    shapes = dict(state)
    shapes["classifier.weight"] = torch.zeros(14, 1024)
    shapes["classifier.bias"] = torch.zeros(14)
    torch.save(shapes, tmp_path / "shapes.pt")
    assert _cli(tmp_path / "models", "import", str(tmp_path / "shapes.pt"), *args) == 1
    assert "class_layers.out.weight (14, 1024) != (18, 1024)" in capsys.readouterr().err.replace(
        "\n", ""
    )

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert _cli(tmp_path / "models", "import", str(tmp_path / "junk.pt"), *args) == 1
    assert not (tmp_path / "models" / "x").exists()


def _copy_for_add(models_dir: Path, tmp_path: Path, **changes: object) -> tuple[Path, Path]:
    source = ModelStore(models_dir).get("cxr-densenet121")
    onnx_path = tmp_path / "model.onnx"
    shutil.copyfile(source.onnx, onnx_path)
    data = tomllib.loads((source.folder / "manifest.toml").read_text())
    data["name"] = "cxr-added"
    data["weights"]["demo"] = False
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(tomli_w.dumps(data))
    return onnx_path, manifest


@pytest.mark.slow
def test_add_validates_against_the_graph(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "installed"
    onnx_path, manifest = _copy_for_add(models_dir, tmp_path)
    assert _cli(target, "add", str(onnx_path), str(manifest)) == 0
    assert ModelStore(target).verify("cxr-added").ok

    cases = {
        "input__name": ("input", "input is named 'image'"),
        "input__shape": (["batch", 1, 256, 256], "dimension 2 is 224"),
        "input__dtype": ("float16", "is float32, the manifest says float16"),
        "weights__sha256": ("0" * 64, "the file has"),
    }
    for key, (value, reason) in cases.items():
        onnx_path, manifest = _copy_for_add(models_dir, tmp_path, **{key: value})
        assert _cli(target, "add", str(onnx_path), str(manifest)) == 1, key
        assert reason in capsys.readouterr().err.replace("\n", ""), key

    data = tomllib.loads(manifest.read_text())
    outputs, points = data["outputs"], data["operating_points"][:17]
    outputs[0]["labels"] = outputs[0]["labels"][:17]
    outputs[0]["shape"] = ["batch", "labels"]
    onnx_path, manifest = _copy_for_add(
        models_dir, tmp_path, outputs=outputs, operating_points=points
    )
    assert _cli(target, "add", str(onnx_path), str(manifest)) == 1
    assert "dimension 1 is fixed at 18" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.slow
def test_verify_notices_a_changed_file(models_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(models_dir / "cxr-densenet121", copy / "cxr-densenet121")
    assert _cli(copy, "verify") == 0
    onnx_file = copy / "cxr-densenet121" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    assert _cli(copy, "verify") == 1
    assert not ModelStore(copy).verify("cxr-densenet121").sha256_ok


@pytest.mark.slow
def test_fp16_and_int8_variants_are_never_the_default(models_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(models_dir / "cxr-densenet121", copy / "cxr-densenet121")
    assert _cli(copy, "fp16", "cxr-densenet121") == 0
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(3)
    for n in range(8):
        np.save(calibration / f"{n}.npy", rng.uniform(-1024, 1024, (1, 224, 224)).astype("f4"))
    assert _cli(copy, "int8", "cxr-densenet121", "--calibration", str(calibration)) == 0
    store = ModelStore(copy)
    for name, variant in (("cxr-densenet121-fp16", "fp16"), ("cxr-densenet121-int8", "int8")):
        manifest = store.get(name).manifest
        assert manifest.variant == variant
        assert not manifest.default
        assert store.verify(name).ok
    int8 = store.get("cxr-densenet121-int8").manifest
    assert int8.provenance.calibration is not None
    with pytest.raises(ValueError, match="never the default"):
        Manifest.model_validate(int8.model_dump() | {"default": True})


@pytest.mark.slow
def test_manifest_routing_must_name_dicom_keywords(models_dir: Path, tmp_path: Path) -> None:
    data = tomllib.loads((models_dir / "cxr-densenet121" / "manifest.toml").read_text())
    data["routing"]["match"]["ViewPositon"] = ["PA"]
    path = tmp_path / "manifest.toml"
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(ManifestError, match="'ViewPositon', which is not a DICOM keyword"):
        load(path)


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys, filmless.app, filmless.cli, models.store, models.manifest, dicomweb.app\n"
        "import inference.routing, inference.runtime, inference.scheduler, filmless.wiring\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_manifests_are_reread_only_when_changed(models_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(models_dir / "cxr-densenet121", copy / "cxr-densenet121")
    store = ModelStore(copy)
    first = store.manifests()
    assert store.manifests() is first  # unchanged files: the parsed list is reused
    path = copy / "cxr-densenet121" / "manifest.toml"
    data = tomllib.loads(path.read_text())
    data["version"] = "9.9"
    path.write_text(tomli_w.dumps(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert [m.version for m in store.manifests()] == ["9.9"]
    shutil.copytree(models_dir / "fundus-efficientnet-b0", copy / "fundus-efficientnet-b0")
    assert len(store.manifests()) == 2
