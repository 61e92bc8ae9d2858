"""The README check's own logic: which commands it runs and how (no servers here).

The check itself (``scripts/readme_check.py``) runs in CI after ``make test``: it needs
the default ports, a fresh virtual environment and several minutes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from filmless.settings import Settings
from scripts.readme_check import (
    CheckFailed,
    checks_for,
    clean_environment,
    commands,
    placeholders,
    substitute,
    unmatched_checks,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def test_blocks_are_read_with_continuations_joined_and_comments_dropped() -> None:
    text = """intro
<!-- readme-check -->
```sh
# a comment line
make serve   # starts it
curl -f -X POST \\
     --data-binary @x "$B/studies"

echo done
```

```sh
not checked
```
"""
    found = commands(text)
    assert [c.text for c in found] == [
        "make serve   # starts it",
        'curl -f -X POST --data-binary @x "$B/studies"',
        "echo done",
    ]
    assert [c.line for c in found] == [5, 6, 9]
    assert found[0].starts_server
    assert not found[1].starts_server


def test_a_marker_without_a_shell_block_is_an_error() -> None:
    with pytest.raises(CheckFailed, match="must be followed"):
        commands("<!-- readme-check -->\nplain text\n")


def test_server_lines_with_settings_in_front_start_a_server() -> None:
    server, test = commands(
        '<!-- readme-check -->\n```sh\nFILMLESS_X=\'{"A": "b"}\' make serve\n'
        "make test    # the tests\n```\n"
    )
    assert server.starts_server
    assert not server.skipped
    assert test.skipped
    assert not test.starts_server


def test_placeholders_are_filled_in() -> None:
    text = 'curl "$B/studies/<study>/series/<series>" -o x.multipart'
    assert placeholders(text) == ["study", "series"]
    assert substitute(text, {"study": "1.2", "series": "1.2.3"}) == (
        'curl "$B/studies/1.2/series/1.2.3" -o x.multipart'
    )


def test_a_new_users_environment_has_no_settings_and_no_venv() -> None:
    env = clean_environment(
        {
            "PATH": "/work/x/.venv/bin:/usr/bin:/bin",
            "FILMLESS_DATA_DIR": "/tmp/d",
            "VIRTUAL_ENV": "/work/x/.venv",
            "HOME": "/root",
        }
    )
    assert env == {"PATH": "/usr/bin:/bin", "HOME": "/root"}


def test_every_check_has_its_command_in_the_readme_and_every_placeholder_is_known() -> None:
    found = commands(README.read_text())
    assert unmatched_checks(found) == []
    assert sum(c.starts_server for c in found) >= 1
    known = {"study", "series", "sop", "ct-study"}
    for command in found:
        assert set(placeholders(command.text)) <= known, command.text
    # The commands whose results matter are each looked at, not only run.
    for needle in ("storescu", "findscu", "movescu", "getscu", "-X POST", "-X DELETE"):
        (command,) = [c for c in found if needle in c.text]
        assert checks_for(command), needle


def test_every_setting_is_in_the_readme_table() -> None:
    """The settings table is how a user learns a limit exists: none may be missing."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`(\w+)`", rows))
    assert set(Settings.model_fields) - documented == set()
