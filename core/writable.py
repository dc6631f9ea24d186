"""Where a command will write, checked before it does any work: a folder that is (or can be made) a folder this
process may write into, or a file name in one. A path below a file, a folder in /proc or a read-only place is
found at the start, in one message naming the flag, instead of as a traceback after minutes of work.

Writing is tried, not predicted: os.access answers yes to root everywhere, and a file system mounted read-only
or a pseudo file system (/proc, /sys) says no only when written to."""

import tempfile
from pathlib import Path


def writable_folder(path: Path | str, what: str, create: bool = False) -> None:
    """ValueError starting with `what` unless `path` is a folder this process can write into, or (missing) can be
    made below its nearest existing ancestor. `create`: make it now (for a caller that would anyway)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: {path} is a file, not a folder")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what}: {ancestor} is a file, so no folder can be made below it")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{what}: cannot create it ({err.strerror or err})") from None
        ancestor = path
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise ValueError(f"{what}: cannot write in {ancestor} ({err.strerror or err})") from None


def writable_file(path: Path | str, what: str) -> None:
    """ValueError starting with `what` unless `path` names a file (not a folder) that can be written where it is."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: a folder; give a file name")
    writable_folder(path.absolute().parent, what)
