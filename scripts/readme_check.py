"""Run the README's commands as a new user does, and check what each of them did.

A fresh copy of the checkout (tracked and untracked files, no ``.venv``, no ``data``) is
made in a temporary folder; there, with no ``FILMLESS_*`` variable set and no virtual
environment active, every shell block of README.md marked ``<!-- readme-check -->`` is
run line by line in one bash session, as a user pastes them into a terminal:

- ``make serve`` runs "in another terminal": in its own process group, until the
  server answers C-ECHO, serves the viewer and answers QIDO-RS. A second ``make serve``
  line stops the running one with Ctrl-C (SIGINT to the group) first. Every stop checks
  that the server shut down cleanly.
- ``make test`` is what CI runs before this check, so it is not run again.
- ``<study>``-style placeholders are filled in from the archive, as a user would from
  the answers of the commands before.

Every command must exit 0, and the checks below look at what it did (stored, found,
retrieved, the chest X-ray report...). A check whose command is no longer in the README
fails too, so the README and this script cannot drift apart. Only the standard library
is used: this runs before and outside any virtual environment.

    python3 scripts/readme_check.py [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "<!-- readme-check -->"
HOST = "127.0.0.1"
DIMSE_PORT = 11112
HTTP_PORT = 8080
BASE = f"http://{HOST}:{HTTP_PORT}/dicom-web"
_PLACEHOLDER = re.compile(r"<([a-z][a-z-]*)>")
_SERVER = re.compile(r"(^|\s)make serve(\s|$)")
_SKIPPED = re.compile(r"^make test(\s|$)")
# A fresh venv, the demo models and the viewer are built by the first ``make serve``.
FIRST_START_SECONDS = 1800.0
START_SECONDS = 300.0
STOP_SECONDS = 60.0
COMMAND_SECONDS = 600.0
REPORT_SECONDS = 600.0


class CheckFailed(Exception):
    """A README command did not do what the README says."""


@dataclass(frozen=True)
class Command:
    text: str
    line: int  # where it starts in README.md

    @property
    def starts_server(self) -> bool:
        return bool(_SERVER.search(_code(self.text)))

    @property
    def skipped(self) -> bool:
        return bool(_SKIPPED.match(self.text))


def _code(text: str) -> str:
    """The command without a trailing ``# comment`` (good enough for README lines)."""
    return re.sub(r"\s+#[^'\"]*$", "", text).strip()


def commands(readme: str) -> list[Command]:
    """The commands of the marked ``sh`` blocks, continuation lines joined."""
    found: list[Command] = []
    lines = readme.splitlines()
    n = 0
    while n < len(lines):
        if lines[n].strip() != MARKER:
            n += 1
            continue
        n += 1
        if n >= len(lines) or lines[n].strip() != "```sh":
            raise CheckFailed(f"README.md line {n}: {MARKER} must be followed by a ```sh block")
        n += 1
        pending: list[str] = []
        start = 0
        while n < len(lines) and lines[n].strip() != "```":
            line = lines[n]
            n += 1
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not pending:
                start = n
            if line.endswith("\\"):
                pending.append(line[:-1].rstrip())
                continue
            pending.append(line.strip() if pending else line.rstrip())
            found.append(Command(" ".join(pending), start))
            pending = []
        if pending:
            raise CheckFailed(f"README.md line {start}: a continued command never ends")
    return found


def placeholders(text: str) -> list[str]:
    return _PLACEHOLDER.findall(text)


def substitute(text: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def clean_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What a new user's shell has: no settings of ours, no virtual environment."""
    env = {
        name: value
        for name, value in environ.items()
        if not name.startswith("FILMLESS_") and name not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    path = [p for p in environ.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/"]
    env["PATH"] = os.pathsep.join(path)
    return env


# -- the session -------------------------------------------------------------------------


@dataclass
class Result:
    command: Command
    text: str  # as run, placeholders filled in
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        """Both streams, as a terminal shows them (dcmtk and rich write to stderr)."""
        return self.stdout + self.stderr


class Shell:
    """One bash session fed line by line; each command's output ends at a marker line."""

    def __init__(self, cwd: Path, env: Mapping[str, str], folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, text: str, timeout: float) -> tuple[int, str, str]:
        """Exit status, standard output and standard error of one command line.

        Nothing a command reads from stdin may be the next README line; a command sent to
        the background writes to a file of its own, not into the next command's output.
        """
        marker = f"__readme_check_{uuid.uuid4().hex}__"
        self.count += 1
        errors = self.folder / f"command-{self.count}.stderr"
        if text.rstrip().endswith("&"):
            redirect = f">{self.folder / f'command-{self.count}.log'} 2>&1"
        else:
            redirect = f"2>{errors}"
        assert self.process.stdin is not None
        self.process.stdin.write(
            f"{{ {text}\n}} </dev/null {redirect}\nprintf '\\n{marker} %s\\n' $?\n"
        )
        self.process.stdin.flush()
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"did not finish in {timeout:.0f} s:\n{''.join(output)[-3000:]}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise CheckFailed(f"the shell ended:\n{''.join(output)[-3000:]}")
            if line.startswith(marker):
                text_out = "".join(output)
                text_out = text_out[:-1] if text_out.endswith("\n") else text_out
                stderr = errors.read_text(errors="replace") if errors.exists() else ""
                return int(line.split()[1]), text_out, stderr
            output.append(line)

    def close(self) -> None:
        """Background jobs (storescp) and the shell itself."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Server:
    """``make serve`` as run in another terminal: its own process group, Ctrl-C to stop."""

    def __init__(self, text: str, cwd: Path, env: Mapping[str, str], log: Path) -> None:
        self.text = text
        self.log_path = log
        self.log = open(log, "wb")  # noqa: SIM115 - open as long as the server runs
        self.process = subprocess.Popen(
            ["bash", "-c", text],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float) -> float:
        """Seconds until C-ECHO, the viewer and QIDO-RS all answer."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise CheckFailed(
                    f"`{self.text}` exited with {self.process.returncode} before serving:\n"
                    + self.output()[-4000:]
                )
            if _listening(DIMSE_PORT) and _listening(HTTP_PORT) and _ready():
                return time.monotonic() - started
            time.sleep(2)
        raise CheckFailed(
            f"`{self.text}` not serving after {timeout:.0f} s:\n{self.output()[-4000:]}"
        )

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the whole foreground group, then a clean exit of everything."""
        os.killpg(self.process.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        # The leader is reaped first: a zombie still counts as a member of its group.
        while time.monotonic() < deadline and (
            self.process.poll() is None or _group_alive(self.process.pid)
        ):
            time.sleep(0.2)
        if _group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
            raise CheckFailed(f"the server did not stop within {STOP_SECONDS:.0f} s of Ctrl-C")
        self.process.wait()
        self.log.close()
        log = self.output()
        code = self.process.returncode
        # make itself dies of the SIGINT it was sent, as in a terminal; the server must not
        # have failed (make would exit 2 with "Error").
        if code not in (0, -signal.SIGINT, 128 + signal.SIGINT):
            raise CheckFailed(f"after Ctrl-C `{self.text}` exited with {code}:\n{log[-3000:]}")
        if "shutting down" not in log:
            raise CheckFailed(f"the server did not say it was shutting down:\n{log[-3000:]}")
        if "Traceback" in log:
            raise CheckFailed(f"the server log holds a traceback:\n{log[-6000:]}")
        for port in (DIMSE_PORT, HTTP_PORT):
            if _listening(port):
                raise CheckFailed(f"port {port} still answers after the server stopped")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2):
            return True
    except OSError:
        return False


def _ready() -> bool:
    echo = subprocess.run(
        ["echoscu", "-aec", "FILMLESS", HOST, str(DIMSE_PORT)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if echo.returncode != 0:
        return False
    try:
        page = _get(f"http://{HOST}:{HTTP_PORT}/viewer/").decode(errors="replace")
        _get(f"{BASE}/studies?limit=1")
    except (OSError, urllib.error.URLError):
        return False
    return "app-config.js" in page


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as answer:
        body: bytes = answer.read()
        return body


def qido(path: str) -> list[dict[str, Any]]:
    body = _get(f"{BASE}{path}")
    return list(json.loads(body)) if body.strip() else []


def value(entry: Mapping[str, Any], tag: str) -> Any:
    values = entry.get(tag, {}).get("Value") or [None]
    return values[0]


# -- what the commands must have done ----------------------------------------------------


@dataclass
class Context:
    root: Path
    results: list[Result] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def last_stdout(self, pattern: str) -> str:
        for result in reversed(self.results):
            if re.search(pattern, result.text):
                return result.stdout
        raise CheckFailed(f"no command matching {pattern!r} ran before")


def _non_report_instances() -> int:
    """Instances not made by screening: neither its reports (SR) nor its heatmaps (the
    series "AI heatmaps ...")."""
    return sum(
        int(value(s, "00201209") or 0)
        for s in qido("/series?limit=100000")
        if value(s, "00080060") != "SR" and not str(value(s, "0008103E") or "").startswith("AI ")
    )


def _study_instances(study: str) -> int:
    (entry,) = qido(f"/studies?StudyInstanceUID={study}")
    return int(value(entry, "00201208"))


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _wait_for_report(study: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < REPORT_SECONDS:
        if qido(f"/studies/{study}/series?Modality=SR"):
            return time.monotonic() - started
        time.sleep(2)
    raise CheckFailed(
        f"no screening report in the chest X-ray study {study} after {REPORT_SECONDS} s"
    )


def _after_demo_data(ctx: Context, _result: Result) -> None:
    count = _files(ctx.root / "demo-data")
    if count == 0:
        raise CheckFailed("make demo-data wrote no files")
    ctx.facts["demo files"] = count


def _after_store(ctx: Context, _result: Result) -> None:
    stored = _non_report_instances()
    if stored != ctx.facts["demo files"]:
        raise CheckFailed(f"{ctx.facts['demo files']} files sent, {stored} instances archived")
    # The rest of the README uses the chest X-ray study; its report must be there first,
    # so that what is retrieved from the study no longer changes.
    waited = _wait_for_report(_resolve(ctx, "study"))
    ctx.facts["chest X-ray report after s"] = round(waited, 1)


def _after_find(ctx: Context, result: Result) -> None:
    studies = [value(s, "0020000D") for s in qido("/studies?limit=100000")]
    answers = len(re.findall(r"Find Response: \d+ \(Pending\)", result.output))
    if answers != len(studies):
        raise CheckFailed(f"findscu printed {answers} matches; the archive has {len(studies)}")
    missing = [uid for uid in studies if uid not in result.output]
    if missing:
        raise CheckFailed(f"findscu did not print {missing}")


def _after_import(ctx: Context, result: Result) -> None:
    files = ctx.facts["demo files"]
    if not re.search(rf"duplicate\D+{files}\b", result.output):
        raise CheckFailed(f"filmless import did not report {files} duplicates")
    if _non_report_instances() != files:
        raise CheckFailed("filmless import of the same files changed the archive")


def _after_storescp(_ctx: Context, _result: Result) -> None:
    deadline = time.monotonic() + 30
    while not _listening(11113):
        if time.monotonic() > deadline:
            raise CheckFailed("storescp is not listening on 11113")
        time.sleep(0.5)


PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _retrieved_into(folder: str, *, unproposed: tuple[str, ...] = ()) -> Callable[..., None]:
    """Every instance of the study in ``folder``, but those of the SOP Classes the SCU
    does not propose (a C-GET can only send what the SCU accepts, PS3.4 C.4.3), which
    its final status must then count as failed (Warning B000)."""

    def check(ctx: Context, result: Result) -> None:
        study = _resolve(ctx, "study")
        left_out = sum(
            len(qido(f"/studies/{study}/instances?SOPClassUID={uid}")) for uid in unproposed
        )
        expected = _study_instances(study) - left_out
        got = _files(ctx.root / folder)
        if got != expected:
            raise CheckFailed(f"{got} files in {folder}/, {expected} expected of the study")
        if left_out and "SubOperationsCompleteOneOrMoreFailures" not in result.output:
            raise CheckFailed(f"{left_out} instances not sent, and no warning said so")

    return check


def _after_name_query(_ctx: Context, result: Result) -> None:
    names = [value(s, "00100010") for s in json.loads(result.stdout)]
    if not names or not all(n and n["Alphabetic"].startswith("M") for n in names):
        raise CheckFailed(f"PatientName=M* answered {names}")


def _after_instances(ctx: Context, result: Result) -> None:
    uids = {value(i, "00080018") for i in json.loads(result.stdout)}
    if _resolve(ctx, "sop") not in uids:
        raise CheckFailed("the study's instances do not list the chest X-ray")


def _after_metadata(ctx: Context, result: Result) -> None:
    entries = json.loads(result.stdout)
    study = _resolve(ctx, "study")
    series = _resolve(ctx, "series")
    expected = len(qido(f"/studies/{study}/series/{series}/instances"))
    if len(entries) != expected or not all("7FE00010" in e for e in entries):
        raise CheckFailed(f"metadata of {len(entries)} instances, expected {expected}")


def _after_rendered(ctx: Context, _result: Result) -> None:
    if not (ctx.root / "cxr.jpg").read_bytes().startswith(b"\xff\xd8\xff"):
        raise CheckFailed("cxr.jpg is not a JPEG")


def _after_retrieve(ctx: Context, _result: Result) -> None:
    body = (ctx.root / "study.multipart").read_bytes()
    boundary = body.split(b"\r\n", 1)[0]
    parts = body.count(boundary + b"\r\n")
    expected = _study_instances(_resolve(ctx, "study"))
    if not boundary.startswith(b"--") or parts != expected:
        raise CheckFailed(f"study.multipart holds {parts} parts, the study {expected} instances")


def _after_stow(_ctx: Context, result: Result) -> None:
    answer = json.loads(result.stdout)
    stored = answer.get("00081199", {}).get("Value", [])
    failed = answer.get("00081198", {}).get("Value", [])
    if len(stored) != 1 or failed:
        raise CheckFailed(f"STOW-RS answered {answer}")


def _after_delete(ctx: Context, _result: Result) -> None:
    if qido(f"/studies?StudyInstanceUID={_resolve(ctx, 'ct-study')}"):
        raise CheckFailed("the deleted study is still found")


def _after_failed_jobs(_ctx: Context, result: Result) -> None:
    if re.search(r"│\s*failed\s*│", result.output):
        raise CheckFailed(f"screening jobs failed on the demo data:\n{result.output}")


def _after_report_query(_ctx: Context, result: Result) -> None:
    if not any(value(s, "00080060") == "SR" for s in json.loads(result.stdout)):
        raise CheckFailed("no SR series in the chest X-ray study")


def _labelled(name: str, least: int) -> Callable[[Context, Result], None]:
    def check(ctx: Context, _result: Result) -> None:
        rows = (ctx.root / name).read_text().splitlines()[1:]
        if len(rows) < least:
            raise CheckFailed(f"{name} labels {len(rows)} radiographs, expected {least} or more")

    return check


def _evaluated(folder: str, source: str, least: int) -> Callable[[Context, Result], None]:
    """The run folder holds what the README says, for the chest model, with at least
    ``least`` labelled radiographs scored."""

    def check(ctx: Context, _result: Result) -> None:
        run = ctx.root / "runs" / folder
        for name in ("metrics.json", "predictions.csv", "manifest.json", "report.html"):
            if not (run / name).is_file():
                raise CheckFailed(f"runs/{folder}/{name} was not written")
        metrics = json.loads((run / "metrics.json").read_text())
        (model,) = metrics["models"]
        effusion = model["labels"].get("Effusion", {})
        if metrics["schema"] != "filmless.evaluate/1" or model["name"] != "cxr-densenet121":
            raise CheckFailed(f"runs/{folder}/metrics.json: {metrics['schema']}, {model['name']}")
        if effusion.get("n", 0) < least:
            raise CheckFailed(f"runs/{folder}: {effusion.get('n')} units scored for Effusion")
        manifest = json.loads((run / "manifest.json").read_text())
        if source not in manifest["input"]:
            raise CheckFailed(f"runs/{folder}/manifest.json: input {manifest['input']}")
        ctx.facts[f"evaluate {folder}"] = (
            f"{effusion['n']} units, AUROC {effusion.get('auroc', {}).get('value', 'n/a')}"
        )

    return check


@dataclass(frozen=True)
class Check:
    pattern: str
    after: Callable[[Context, Result], None]


CHECKS = (
    Check(r"^make demo-data", _after_demo_data),
    Check(r"^storescu .* demo-data$", _after_store),
    Check(r"^findscu ", _after_find),
    Check(r"^\.venv/bin/filmless import demo-data", _after_import),
    Check(r"^storescp ", _after_storescp),
    Check(r"^movescu ", _retrieved_into("moved")),
    # dcmtk's getscu proposes its own list of storage SOP Classes, without Parametric Map.
    Check(r"^getscu ", _retrieved_into("got", unproposed=(PARAMETRIC_MAP,))),
    Check(r"PatientName=M\*", _after_name_query),
    Check(r"/studies/<study>/instances\"$", _after_instances),
    Check(r"/metadata\"$", _after_metadata),
    Check(r"-o cxr\.jpg .*/rendered", _after_rendered),
    Check(r"-o study\.multipart$", _after_retrieve),
    Check(r"-X POST .*/studies\"$", _after_stow),
    Check(r"-X DELETE .*<ct-study>", _after_delete),
    Check(r"jobs list --state failed$", _after_failed_jobs),
    Check(r"series\?Modality=SR\"$", _after_report_query),
    Check(r"demo_labels eval-data labels\.csv", _labelled("labels.csv", 36)),
    Check(r"evaluate .*--folder eval-data .*--out runs/first$", _evaluated("first", "folder", 30)),
    Check(r"demo_labels demo-data demo-labels\.csv$", _labelled("demo-labels.csv", 1)),
    Check(r"evaluate .*--archive .*--out runs/archive$", _evaluated("archive", "archive_query", 1)),
)


def _resolve(ctx: Context, name: str) -> str:
    """A placeholder's value, found the way the README tells the user to find it."""
    if name in ctx.facts:
        return str(ctx.facts[name])
    if name == "study":
        studies = qido("/studies?ModalitiesInStudy=DX&limit=100000")
        if not studies:
            raise CheckFailed("no chest X-ray study in the archive")
        found = sorted(value(s, "0020000D") for s in studies)[0]
    elif name in ("series", "sop"):
        study = _resolve(ctx, "study")
        frontal = [
            i
            for i in qido(f"/studies/{study}/instances?ViewPosition=PA&includefield=00080060")
            if value(i, "00080060") == "DX"
        ]
        if not frontal:
            raise CheckFailed(f"no frontal chest X-ray in study {study}")
        ctx.facts["series"] = value(frontal[0], "0020000E")
        ctx.facts["sop"] = value(frontal[0], "00080018")
        return str(ctx.facts[name])
    elif name == "ct-study":
        answer = json.loads(ctx.last_stdout(r"-X POST"))
        found = str(value(answer, "00081190")).rstrip("/").rsplit("/", 1)[-1]
    else:
        raise CheckFailed(f"README placeholder <{name}> is not known to this check")
    ctx.facts[name] = found
    return str(found)


def checks_for(command: Command) -> list[Check]:
    return [c for c in CHECKS if re.search(c.pattern, command.text)]


def unmatched_checks(found: list[Command]) -> list[str]:
    return [c.pattern for c in CHECKS if not any(re.search(c.pattern, m.text) for m in found)]


# -- the run -----------------------------------------------------------------------------


def copy_checkout(source: Path, target: Path) -> None:
    """Tracked and untracked files as ``git`` sees them: a clone of the working tree."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        path = source / name
        if path.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)


def run(root: Path, work: Path) -> list[Result]:
    found = commands((root / "README.md").read_text())
    stale = unmatched_checks(found)
    if stale:
        raise CheckFailed(f"checks without a README command: {stale}")
    for port in (DIMSE_PORT, HTTP_PORT, 11113):
        if _listening(port):
            raise CheckFailed(f"port {port} is in use; the README's commands need it free")
    copy_checkout(root, work)
    env = clean_environment(os.environ)
    ctx = Context(work)
    shell = Shell(work, env, work / "readme-check")
    shell.folder.mkdir()
    server: Server | None = None
    starts = 0
    try:
        for command in found:
            if command.skipped:
                _say(f"skipped (run by CI before this check): {command.text}")
                continue
            if server is not None and not server.running():
                raise CheckFailed(f"the server exited:\n{server.output()[-4000:]}")
            text = substitute(
                command.text, {n: _resolve(ctx, n) for n in placeholders(command.text)}
            )
            started = time.monotonic()
            if command.starts_server:
                if server is not None:
                    server.interrupt()
                    _say("server stopped cleanly with Ctrl-C")
                starts += 1
                server = Server(text, work, env, work / f"serve-{starts}.log")
                server.wait_ready(FIRST_START_SECONDS if starts == 1 else START_SECONDS)
                result = Result(command, text, 0, "", "", time.monotonic() - started)
            else:
                code, output, errors = shell.run(text, COMMAND_SECONDS)
                result = Result(command, text, code, output, errors, time.monotonic() - started)
                if code != 0:
                    raise CheckFailed(f"exited with {code}:\n{(output + errors)[-4000:]}")
            ctx.results.append(result)
            for check in checks_for(command):
                check.after(ctx, result)
            _say(f"ok {result.seconds:7.1f} s  README.md:{command.line}  {text}")
        if server is not None:
            server.interrupt()
            _say("server stopped cleanly with Ctrl-C")
            server = None
    except (CheckFailed, OSError, ValueError, KeyError) as exc:
        # OSError covers what urllib raises; ValueError a JSON answer that is not JSON.
        detail = exc if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        raise CheckFailed(f"README.md:{command.line}: `{command.text}`: {detail}") from None
    finally:
        shell.close()
        if server is not None and _group_alive(server.process.pid):
            os.killpg(server.process.pid, signal.SIGKILL)
    for name, fact in ctx.facts.items():
        _say(f"{name}: {fact}")
    return ctx.results


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the copy it ran in")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="filmless-readme-"))
    started = time.monotonic()
    try:
        results = run(root, work)
    except CheckFailed as exc:
        print(f"README check FAILED: {exc}", file=sys.stderr)
        print(f"(the copy it ran in: {work})", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    _say(f"README check passed: {len(results)} commands in {elapsed:.0f} s")
    if args.keep:
        _say(f"the copy it ran in: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
