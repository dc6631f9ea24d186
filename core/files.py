"""Atomic file writes, shared by checkpoints (core/checkpoint.py) and shards (data/shards.py).

A file is written to a temporary name in its folder (`.NAME.tmp-HOST-PID`), fsynced, renamed over the final name,
and the folder fsynced, so a crash at any moment leaves either the previous file or the complete new one. A write
that fails (disk full, a signal) removes its temporary file. The host and pid in the name let a later writer tell
a dead writer's leftovers from a live one's (core/checkpoint.py: stale_temporaries).
"""

import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


def host() -> str:
    """This machine's name as temporary names carry it (no '-', which separates the pid)."""
    return socket.gethostname().replace("-", "_") or "host"


def temp_name(path: Path) -> Path:
    """This process's temporary name for `path` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{host()}-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry lives in the folder's own blocks)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a temporary file and a rename; on any failure the temporary file is removed and the
    previous `path`, if any, is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err} (nothing was left half-written; "
                          "the previous file, if any, is unchanged)") from err
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))
