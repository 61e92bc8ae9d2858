"""Start writing a file's dirty pages to disk while more of it is still arriving.

An instance of tens of megabytes is written in pieces as its PDUs arrive and must be
durable (fsync) before Success is sent. Left to the kernel, all of its pages are
written back only by that fsync, so the sender waits for the whole file to reach the
disk after the last byte. Asking for writeback of each piece as soon as it is written
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which starts the I/O and does not wait)
overlaps the disk with the network, and the final fsync finds little left to do. This
is what PostgreSQL does for the same reason (``backend_flush_after``). It is only a
hint: durability still comes from the fsync alone, so where the call is missing (not
Linux) or fails, nothing changes but the timing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

# <linux/fs.h>: start writeback of dirty pages in the range; do not wait for it.
_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load()


def available() -> bool:
    return _sync_file_range is not None


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to begin writing ``length`` bytes at ``offset`` of ``fd`` to disk;
    whether it took the request."""
    if _sync_file_range is None or length <= 0:
        return False
    return _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0
