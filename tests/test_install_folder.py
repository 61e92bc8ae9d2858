"""A folder written aside replaces an installed one whole (models, the viewer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.store import install_folder


def _folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "file.txt").write_text(content)
    return path


def test_replaces_an_installed_folder_and_leaves_nothing_aside(tmp_path: Path) -> None:
    target = _folder(tmp_path / "model", "old")
    install_folder(_folder(tmp_path / ".work", "new"), target)
    assert (target / "file.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_installs_where_nothing_was(tmp_path: Path) -> None:
    install_folder(_folder(tmp_path / ".work", "new"), tmp_path / "model")
    assert (tmp_path / "model" / "file.txt").read_text() == "new"


def test_a_failed_move_leaves_the_old_folder_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _folder(tmp_path / "model", "old")
    work = _folder(tmp_path / ".work", "new")
    rename = Path.rename

    def failing(self: Path, to: Path) -> Path:
        if self == work:
            raise OSError("disk gone")
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        install_folder(work, target)
    assert (target / "file.txt").read_text() == "old"
