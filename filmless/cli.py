"""The ``filmless`` command: serve, config show, import, models, evaluate, jobs."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicomweb.auth import SCOPES, new_token
from filmless import evaluate_cli, models_cli
from filmless.app import serve
from filmless.settings import Settings, load_settings, to_toml
from filmless.viewer import HOW_TO, OHIF_VERSION, ViewerError, install, installed
from filmless.wiring import build_archive, configure_logging, routed
from inference.backfill import backfill
from models.manifest import ManifestError
from models.store import ModelStore
from pacs.archive import Archive, Origin
from pacs.audit import Actor, AuditEvent, Outcome
from pacs.errors import ArchiveInUse, IndexFailure, PacsError
from pacs.jobs import JobKind, JobQueue, JobState
from pacs.lock import ArchiveLock
from pacs.reindex import reindex
from pacs.router import backfill as route_backfill
from pacs.router import job_model
from pacs.status import StoreStatus
from pacs.verify import verify

_REJECTIONS_SHOWN = 20
# Who the audit trail names for `filmless import`: the operator's account on this host.
IMPORTER = Actor(os.environ.get("USER", "") or "operator", "localhost", "filmless import")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filmless", description=__doc__)
    parser.add_argument("--config", type=Path, help="filmless.toml to read settings from")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the DIMSE server in the foreground")
    serve_cmd.add_argument(
        "--role",
        choices=["all", "worker"],
        help="worker: screening only, no ports (beside other nodes on one index and bucket)",
    )
    serve_cmd.add_argument("--tls-cert", help="PEM certificate chain: DIMSE over TLS only")
    serve_cmd.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve_cmd.add_argument(
        "--tls-client-ca", help="PEM CA file: require DIMSE peers to present a certificate"
    )
    config = commands.add_parser("config", help="settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the effective settings as TOML")
    show.add_argument(
        "--secrets", action="store_true", help="print tokens and passwords instead of ***"
    )
    imp = commands.add_parser("import", help="store DICOM files and folders in the archive")
    imp.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    models_cli.add_parser(commands)
    evaluate_cli.add_parser(commands)
    viewer = commands.add_parser("viewer", help="the OHIF web viewer served at /viewer/")
    viewer_commands = viewer.add_subparsers(dest="viewer_command", required=True)
    install = viewer_commands.add_parser("install", help=f"fetch OHIF {OHIF_VERSION} with npm")
    install.add_argument(
        "--optional", action="store_true", help="without npm, say how to get it and exit 0"
    )
    install.add_argument("--force", action="store_true", help="install again")
    commands.add_parser("verify", help="re-hash every stored file against the index")
    commands.add_parser(
        "reindex", help="rebuild the index from the stored files (after an upgrade)"
    )
    token = commands.add_parser("token", help="DICOMweb bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    new = token_commands.add_parser("new", help="make a token and print its settings line")
    new.add_argument("--name", required=True)
    new.add_argument("--scope", choices=SCOPES, default="read")
    jobs = commands.add_parser("jobs", help="the screening job queue")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_commands.add_parser("list", help="jobs and their state")
    listing.add_argument("--state", choices=[s.value for s in JobState])
    retry = jobs_commands.add_parser("retry", help="run failed jobs again")
    retry.add_argument("ids", nargs="*", type=int, help="default: every failed job")
    backfill = jobs_commands.add_parser(
        "backfill", help="run a model over the studies already stored (the jobs they lack)"
    )
    backfill.add_argument("--model", required=True, help="an installed model's name")
    routes = commands.add_parser("routes", help="the routing rules' sends to other archives")
    routes_commands = routes.add_subparsers(dest="routes_command", required=True)
    routes_commands.add_parser("status", help="per destination: pending, sent, failed")
    resend = routes_commands.add_parser("resend", help="queue a route's failed sends again")
    resend.add_argument("name", help="the route's name")
    resend.add_argument(
        "--all", action="store_true", help="every instance it sent or skipped, not only failed"
    )
    route_backfill = routes_commands.add_parser(
        "backfill", help="queue a route's sends for what was stored before it was added"
    )
    route_backfill.add_argument("name", help="the route's name")
    route_backfill.add_argument(
        "--since", type=_date, help="only instances received on or after YYYY-MM-DD (UTC)"
    )
    backfill.add_argument(
        "--since", type=_date, help="only instances received on or after YYYY-MM-DD (UTC)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    configure_logging(verbose=args.verbose)
    if args.command != "serve" and not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    overrides = {}
    if args.command == "serve":
        flags = {"tls_cert": args.tls_cert, "tls_key": args.tls_key, "role": args.role}
        flags["tls_client_ca"] = args.tls_client_ca
        overrides = {name: value for name, value in flags.items() if value}
    try:
        settings = load_settings(args.config, **overrides)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]invalid settings:[/red] {exc}")
        return 2
    try:
        return _run(args, settings, console)
    except (IndexFailure, ArchiveInUse) as exc:
        # The index cannot be used (another schema version, a database that is down) or
        # another server holds the archive: the reason and what to do, not a traceback.
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1


def _run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    if args.command == "serve":
        serve(settings)
        return 0
    if args.command == "config":
        sys.stdout.write(to_toml(settings, secrets=args.secrets))
        return 0
    if args.command == "import":
        return import_paths(settings, args.paths, console)
    if args.command == "models":
        return models_cli.run(args, settings, console)
    if args.command == "evaluate":
        return evaluate_cli.run(args, settings, console)
    if args.command == "jobs":
        return jobs_command(settings, args, console)
    if args.command == "routes":
        return routes_command(settings, args, console)
    if args.command == "verify":
        return verify_command(settings, console)
    if args.command == "reindex":
        return reindex_command(settings, console)
    if args.command == "token":
        token, sha256 = new_token()
        console.print("the token (shown once; give it to the client):")
        sys.stdout.write(f"{token}\n")
        console.print(escape("add to [api_tokens] in filmless.toml:"))
        sys.stdout.write(f'{args.name} = "{args.scope}:{sha256}"\n')
        return 0
    if args.command == "viewer":
        return viewer_install(settings, console, optional=args.optional, force=args.force)
    raise AssertionError(args.command)


def verify_command(settings: Settings, console: Console) -> int:
    """1 when a file is missing or differs from what was acknowledged."""
    archive = build_archive(settings)
    try:
        records = archive.index.instances()
        columns = (TextColumn("verifying"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("verify", total=sum(r.size for r in records))
            result = verify(archive, lambda size: progress.advance(task, size), records)
    finally:
        archive.index.dispose()
    console.print(
        f"{result.checked} instance(s) checked: {len(result.missing)} missing, "
        f"{len(result.corrupt)} differing from the index"
    )
    for label, uids in (("missing", result.missing), ("differs", result.corrupt)):
        for uid in uids[:_REJECTIONS_SHOWN]:
            console.print(f"[red]{label}:[/red] {uid}")
    return 0 if result.ok else 1


def reindex_command(settings: Settings, console: Console) -> int:
    """1 when a stored file could not be indexed (it stays where it is, listed)."""
    archive = build_archive(settings, create_schema=False)
    lock = ArchiveLock(settings.data_dir, archive.index)
    try:
        lock.acquire()  # never under a running server
        blobs = list(archive.store.listing())
        files = len(blobs)
        columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("reindex", total=files)
            result = reindex(archive, blobs, lambda: progress.advance(task))
    finally:
        lock.release()
        archive.index.dispose()
    console.print(
        f"{result.indexed} of {files} stored file(s) indexed; {len(result.refused)} left out, "
        f"{len(result.changed)} changed a study's patient"
    )
    for label, entries in (("left out", result.refused), ("changed", result.changed)):
        for path, reason in entries[:_REJECTIONS_SHOWN]:
            console.print(f"[yellow]{label}[/yellow] {path}: {reason}")
    return 1 if result.refused else 0


def viewer_install(settings: Settings, console: Console, *, optional: bool, force: bool) -> int:
    """2 without npm, 1 when the install fails; 0 in both cases with ``optional``: the
    server then runs without a viewer and ``/viewer/`` says how to install it."""
    folder = settings.viewer_dir
    if installed(folder) and not force:
        console.print(f"OHIF {OHIF_VERSION} is installed in {folder}")
        return 0
    if shutil.which("npm") is None:
        console.print(f"[yellow]{HOW_TO}[/yellow]")
        return 0 if optional else 2
    try:
        with console.status(f"fetching OHIF {OHIF_VERSION} with npm"):
            install(folder)
    except ViewerError as exc:
        console.print(f"[red]viewer not installed:[/red] {exc}")
        if optional:
            console.print(
                "[yellow]going on without it: the server runs without the viewer; run "
                "`filmless viewer install` once the cause is fixed[/yellow]"
            )
            return 0
        return 1
    console.print(f"OHIF {OHIF_VERSION} installed in {folder}; served at /viewer/")
    return 0


def jobs_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    archive = build_archive(settings)
    queue = JobQueue(archive.index)
    try:
        if args.jobs_command == "retry":
            count = queue.retry(args.ids)
            console.print(f"{count} job(s) queued again")
            return 0
        if args.jobs_command == "backfill":
            return backfill_command(settings, archive, queue, args, console)
        state = JobState(args.state) if args.state else None
        table = Table(title="jobs")
        for column in ("id", "model", "study / instance", "state", "attempts", "reason"):
            table.add_column(column)
        for job in queue.jobs(state):
            target = job.SOPInstanceUID or job.StudyInstanceUID
            table.add_row(str(job.id), job.model, target, job.state, str(job.attempts), job.reason)
        console.print(table)
        return 0
    finally:
        archive.index.dispose()


def routes_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    archive = build_archive(settings)
    queue = JobQueue(archive.index)
    try:
        if args.routes_command in ("resend", "backfill") and args.name not in settings.routes:
            console.print(f"[red]no route {escape(args.name)}[/red] in the settings")
            return 2
        if args.routes_command == "backfill":
            return route_backfill_command(settings, archive, args, console)
        if args.routes_command == "resend":
            states = [JobState.FAILED]
            if args.all:
                states += [JobState.DONE, JobState.SKIPPED]
            count = queue.requeue(job_model(args.name), states)
            console.print(f"{count} send(s) of {args.name} queued again")
            return 0
        counts = queue.states(JobKind.ROUTE)
        table = Table(title="routes")
        for column in ("route", "destination", "pending", "sending", "sent", "failed", "why"):
            table.add_column(column)
        for name in sorted({*settings.routes, *counts}):
            found = counts.get(name, {})
            rule = settings.routes.get(name)
            failed = found.get(JobState.FAILED, 0)
            table.add_row(
                name,
                rule.destination if rule else "(no longer configured)",
                str(found.get(JobState.PENDING, 0)),
                str(found.get(JobState.RUNNING, 0)),
                str(found.get(JobState.DONE, 0)),
                str(failed),
                queue.last_reason(job_model(name), JobState.FAILED) if failed else "",
            )
        console.print(table)
        return 0
    finally:
        archive.index.dispose()


def route_backfill_command(
    settings: Settings, archive: Archive, args: argparse.Namespace, console: Console
) -> int:
    """A running server's senders pick the queued sends up."""
    rule = next(r for r in routed(settings) if r.route.name == args.name)
    total = archive.index.count_instances(since=args.since)
    columns = (TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("backfill", total=total)
        done = route_backfill(
            archive.index, rule, since=args.since, advance=lambda: progress.advance(task)
        )
    table = Table(title=f"backfill of route {args.name}")
    for column in ("instances", "sends queued", "had a send", "not matched"):
        table.add_column(column, justify="right")
    table.add_row(*map(str, (done.instances, done.queued, done.existing, done.not_matched)))
    console.print(table)
    return 0


def _date(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from exc


def backfill_command(
    settings: Settings,
    archive: Archive,
    queue: JobQueue,
    args: argparse.Namespace,
    console: Console,
) -> int:
    """Exit 1 for a model that is not installed; a running server picks the jobs up."""
    try:
        manifest = ModelStore(settings.models_dir).get(args.model).manifest
    except ManifestError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        return 1
    total = archive.index.count_instances(since=args.since)
    columns = (TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("backfill", total=total)
        done = backfill(
            archive.index,
            queue,
            manifest,
            since=args.since,
            without_view_position=settings.screen_without_view_position,
            advance=lambda: progress.advance(task),
        )
    table = Table(title=f"backfill of {manifest.name}")
    for column in ("instances", "jobs queued", "skipped (reason kept)", "had a job", "not for it"):
        table.add_column(column, justify="right")
    table.add_row(
        *map(str, (done.instances, done.queued, done.skipped, done.existing, done.not_concerned))
    )
    console.print(table)
    return 0


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for folder, _dirs, names in os.walk(path):
                for name in sorted(names):
                    yield Path(folder) / name
        else:
            yield path


def import_paths(settings: Settings, paths: Sequence[Path], console: Console) -> int:
    """Store every file under ``paths`` through the one ingest path; 1 if any was refused."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]no such file or folder:[/red] {', '.join(map(str, missing))}")
        return 2
    archive = build_archive(settings)
    files = list(_files(paths))
    counts: Counter[str] = Counter()
    rejected: list[tuple[Path, str]] = []
    columns = (
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("import", total=len(files))
        for path in files:
            result = import_one(archive, path)
            if result.refused is None:
                counts[result.action] += 1
            else:
                counts["rejected"] += 1
                rejected.append((path, result.refused))
            progress.advance(task)
    archive.index.dispose()
    _summary(console, counts, rejected, len(files))
    return 1 if rejected else 0


@dataclass(frozen=True)
class Imported:
    """One file's outcome: what the archive did, or why it refused (with the DICOM
    status a C-STORE of the same instance gets)."""

    action: str = ""
    refused: str | None = None
    status: int = 0
    SOPInstanceUID: str = ""


def import_one(archive: Archive, path: Path) -> Imported:
    try:
        outcome = archive.ingest_file(path, Origin.IMPORT)
    except PacsError as exc:
        archive.audit.record(
            AuditEvent.STORE, IMPORTER, Outcome.MINOR_FAILURE, detail=f"refused {path}: {exc}"
        )
        return Imported(refused=str(exc), status=exc.dimse_status)
    except OSError as exc:
        reason = f"cannot read the file: {exc.strerror or exc}"
        return Imported(refused=reason, status=StoreStatus.PROCESSING_FAILURE)
    archive.audit.record(
        AuditEvent.STORE,
        IMPORTER,
        Outcome.SUCCESS,
        StudyInstanceUID=outcome.record.StudyInstanceUID,
        detail="; ".join((f"{outcome.action} {path}", *outcome.notes)),
    )
    return Imported(action=str(outcome.action), SOPInstanceUID=outcome.record.SOPInstanceUID)


def _summary(
    console: Console, counts: Counter[str], rejected: list[tuple[Path, str]], total: int
) -> None:
    table = Table(title=f"{total} files")
    table.add_column("outcome")
    table.add_column("files", justify="right")
    for outcome in ("stored", "duplicate", "overwritten", "rejected"):
        table.add_row(outcome, str(counts.get(outcome, 0)))
    console.print(table)
    for path, reason in rejected[:_REJECTIONS_SHOWN]:
        console.print(f"[yellow]rejected[/yellow] {path}: {reason}")
    if len(rejected) > _REJECTIONS_SHOWN:
        console.print(f"... and {len(rejected) - _REJECTIONS_SHOWN} more rejected")


if __name__ == "__main__":
    raise SystemExit(main())
