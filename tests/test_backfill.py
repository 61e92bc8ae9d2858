"""``filmless jobs backfill``: a model installed after studies were stored is run over
them, each missing job created once, on SQLite and on PostgreSQL.

The expected jobs are worked out here from the files' own headers (pydicom), not from
the routing code: a frontal chest radiograph is an instance job and a lateral one a
skipped job with its reason; a fundus or mammography study is one study job.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from filmless.cli import main
from inference.backfill import backfill
from models.manifest import dump
from models.zoo import GLAUCOMA as GLAUCOMA_TASK
from pacs.index import Index
from pacs.jobs import JobQueue, JobState
from tests.conftest import make_archive
from tests.support.zoo import ZOO, manifest_of

CHEST, FUNDUS, MAMMO = ZOO
# Installed after the studies were stored: the case backfill is for.
GLAUCOMA = manifest_of(GLAUCOMA_TASK)
MODELS = [*ZOO, GLAUCOMA]


@pytest.fixture
def stored(corpus: list[Path], index: Index, tmp_path: Path) -> tuple[Index, list[Path]]:
    """An archive holding part of the corpus, stored with no scheduler: no jobs yet."""
    archive = make_archive(tmp_path / "data", index)
    files = corpus[:80]
    for path in files:
        archive.ingest_file(path)
    return index, files


def _expected(files: list[Path]) -> dict[str, set[tuple[str, str, JobState]]]:
    found: dict[str, set[tuple[str, str, JobState]]] = {m.name: set() for m in MODELS}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        if ds.Modality == "DX":
            state = JobState.PENDING if ds.ViewPosition in ("PA", "AP") else JobState.SKIPPED
            found[CHEST.name].add((study, sop, state))
        elif ds.Modality == "OP":  # the same photographs, screened for both diseases
            found[FUNDUS.name].add((study, "", JobState.PENDING))
            found[GLAUCOMA.name].add((study, "", JobState.PENDING))
        elif ds.Modality == "MG":
            found[MAMMO.name].add((study, "", JobState.PENDING))
    return found


def _jobs(queue: JobQueue, model: str) -> set[tuple[str, str, JobState]]:
    return {
        (j.StudyInstanceUID, j.SOPInstanceUID, j.state) for j in queue.jobs() if j.model == model
    }


def test_each_missing_job_is_created_once(stored: tuple[Index, list[Path]]) -> None:
    index, files = stored
    queue = JobQueue(index)
    expected = _expected(files)
    assert all(expected.values()), "the corpus slice must hold every kind"
    for manifest in MODELS:
        done = backfill(index, queue, manifest)
        assert done.instances == len(files)
        wanted = expected[manifest.name]
        assert _jobs(queue, manifest.name) == wanted
        assert done.queued + done.skipped == len(wanted)
        assert done.skipped == sum(1 for *_, s in wanted if s == JobState.SKIPPED)
        again = backfill(index, queue, manifest)
        assert (again.queued, again.skipped) == (0, 0)
        assert _jobs(queue, manifest.name) == wanted
    skipped = [j for j in queue.jobs(JobState.SKIPPED) if j.model == CHEST.name]
    assert all(j.reason == "ViewPosition LL is not one of PA, AP" for j in skipped)


def test_an_interrupted_backfill_run_again_creates_none_twice(
    stored: tuple[Index, list[Path]],
) -> None:
    index, files = stored
    queue = JobQueue(index)
    seen = 0

    def stop_midway() -> None:
        nonlocal seen
        seen += 1
        if seen == len(files) // 2:
            raise KeyboardInterrupt  # the operator's Ctrl-C, or the process killed

    with pytest.raises(KeyboardInterrupt):
        backfill(index, queue, CHEST, advance=stop_midway)
    first = len(_jobs(queue, CHEST.name))
    assert 0 < first < len(_expected(files)[CHEST.name])
    rest = backfill(index, queue, CHEST)
    assert _jobs(queue, CHEST.name) == _expected(files)[CHEST.name]
    assert rest.queued + rest.skipped == len(_expected(files)[CHEST.name]) - first
    assert rest.existing == first


def test_jobs_already_there_are_left_as_they_are_and_since_limits_the_instances(
    stored: tuple[Index, list[Path]],
) -> None:
    index, _ = stored
    queue = JobQueue(index)
    backfill(index, queue, FUNDUS)
    claimed = queue.claim("w1")
    assert claimed is not None
    queue.complete(claimed, "1.2.3")
    again = backfill(index, queue, FUNDUS)
    assert again.queued == 0
    assert [j.state for j in queue.jobs() if j.id == claimed.id] == [JobState.DONE]
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert backfill(index, queue, CHEST, since=tomorrow).instances == 0
    assert _jobs(queue, CHEST.name) == set()


def test_the_command_summarises_and_refuses_a_model_not_installed(
    corpus: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in list(os.environ):
        if key.startswith("FILMLESS_"):
            monkeypatch.delenv(key)
    data = tmp_path / "data"
    monkeypatch.setenv("FILMLESS_DATA_DIR", str(data))
    monkeypatch.setenv("FILMLESS_SCREENING", "false")
    assert main(["import", *map(str, corpus[:40])]) == 0
    folder = data / "models" / CHEST.name
    folder.mkdir(parents=True)
    dump(CHEST, folder / "manifest.toml")
    capsys.readouterr()
    assert main(["jobs", "backfill", "--model", CHEST.name, "--since", "2000-01-01"]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert f"backfill of {CHEST.name}" in said
    assert main(["jobs", "backfill", "--model", "no-such-model"]) == 1
    with pytest.raises(SystemExit) as refused:  # argparse's usage error
        main(["jobs", "backfill", "--model", CHEST.name, "--since", "yesterday"])
    assert refused.value.code == 2
