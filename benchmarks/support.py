"""What every benchmark needs: loopback ports, a private network for Orthanc, run facts,
the memory of a server's processes."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NETNS_FLAG = "FILMLESS_BENCH_NETNS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"no server on port {port}")


def in_private_network() -> bool:
    return os.environ.get(NETNS_FLAG) == "1"


def rerun_in_private_network(module: str, argv: list[str]) -> int | None:
    """Run ``python -m module argv`` again inside ``unshare --net`` with only loopback up.

    Orthanc 1.10 listens on every interface; in a network namespace of its own nothing
    it opens is reachable from outside. Returns the exit status, or None when this is
    not possible (not root, no unshare): the caller then leaves Orthanc out.
    """
    if in_private_network():
        return None
    if not shutil.which("unshare") or os.geteuid() != 0:
        return None
    command = [sys.executable, "-m", module, *argv]
    script = 'ip link set lo up && exec "$@"'
    env = {**os.environ, NETNS_FLAG: "1"}
    return subprocess.call(["unshare", "--net", "sh", "-c", script, "sh", *command], env=env)


def run_facts(module: str, argv: list[str]) -> dict[str, object]:
    return {
        "command": f"python -m {module} " + " ".join(argv),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.python_version()})",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _session_files(session: int, name: str) -> Iterator[list[str]]:
    """The lines of /proc/PID/``name`` of every process in the session ``session`` leads:
    a server started in a session of its own, with its worker processes."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Field 6 of /proc/PID/stat is the session id; the name field may hold spaces.
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) != session:
                continue
            lines = (entry / name).read_text().splitlines()
        except OSError:
            continue
        yield lines


def _field_bytes(lines: list[str], field: str) -> int:
    return sum(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


def session_memory(session: int) -> tuple[int, int, int]:
    """(processes, RSS bytes, PSS bytes) of every process in the session ``session``
    leads."""
    count = rss = pss = 0
    for rollup in _session_files(session, "smaps_rollup"):
        count += 1
        rss += _field_bytes(rollup, "Rss:")
        pss += _field_bytes(rollup, "Pss:")
    return count, rss, pss


def session_peak_rss(session: int) -> int:
    """The sum of the peak RSS (VmHWM) of every process in the session ``session``
    leads: an upper bound of what the server and its workers ever held at once."""
    return sum(_field_bytes(status, "VmHWM:") for status in _session_files(session, "status"))


def tree_cpu_seconds(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by process ``root`` and its descendants
    that are alive (a server and its worker processes), from /proc/PID/stat."""
    parents: dict[int, int] = {}
    times: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # After the name field (which may hold spaces): state, ppid, ... utime, stime.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]), int(fields[12]))
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid, (utime, stime) in times.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == root:
            user += utime
            system += stime
    return user / tick, system / tick


def no_delay(assoc: Any) -> None:
    """Send each PDU at once, as dcmtk does by default: pynetdicom's requester leaves
    Nagle's algorithm on, so a request's data set PDU would wait for the server's
    delayed ACK (~40 ms) and the client, not the server, would be measured."""
    transport = assoc.dul.socket
    if transport is None or transport.socket is None:
        raise RuntimeError("the association has no socket")
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
