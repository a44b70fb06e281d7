"""Writing files so that nothing the user had is lost: every file or folder bit_keras writes goes to a temporary
name beside its target (`.NAME.tmp-HOST-PID...`) and is renamed into place when complete. The temporary is removed
when writing fails and, after a kill, by the next writer of the same target; a full disk is a one-line error
naming the path, never a crash."""

import contextlib
import errno
import os
import re
import shutil
import socket
import stat

DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no space, over the file-size limit, over the quota
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
_KINDS |= {stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the path and says that nothing else changed."""


def temporary(path: str, suffix: str = "") -> str:
    """The temporary name of `path` for this process (Keras wants its own `suffix` at the end)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}{suffix}")


@contextlib.contextmanager
def replacing(path: str, suffix: str = ""):
    """Yield a temporary path to write; when the block succeeds, rename it to `path` (a folder replaces the old one
    only once complete). On failure the temporary is removed, and a full disk becomes a `DiskFullError`."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale(path)
    tmp = temporary(path, suffix)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            old = temporary(path, ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise disk_full(err, path) from None
        raise
    finally:
        _remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` (UTF-8) through a temporary file."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def disk_full(err: OSError, path: str) -> DiskFullError:
    """The one-line error of a write to `path` that failed with `err` (ENOSPC, EFBIG or EDQUOT)."""
    reason = os.strerror(err.errno)
    error = DiskFullError(f"{path}: cannot write ({reason}); nothing was replaced: free space and rerun")
    error.errno = err.errno
    return error


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)(\..*)?")


def remove_stale(path: str) -> None:
    """Remove the temporaries of `path` left by killed processes of this host."""
    directory, name = os.path.split(os.path.abspath(path))
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            match = _TEMPORARY.fullmatch(entry)
            if match and match["name"] == name and _dead(match["host"], int(match["pid"])):
                _remove(os.path.join(directory, entry))


def remove_temporaries(folder: str) -> None:
    """Remove every temporary in `folder` (a folder this process holds the lock of: nobody else writes there)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(folder):
            if _TEMPORARY.fullmatch(entry):
                _remove(os.path.join(folder, entry))


def _dead(host: str, pid: int) -> bool:
    """Whether process `pid` of `host` is gone (a process of another host may be alive: kept)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def open_regular(path: str, what: str = "file"):
    """`open(path, "rb")` of a regular file (a link to one is followed); a one-line ValueError naming `path` for a
    FIFO, device, socket or folder, which would block the open or a read, or never end. Opened without blocking
    and checked on the open descriptor, so nothing can swap the file in between."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise ValueError(f"{path}: {kind}, not a regular file: only regular files are read as {what}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str, what: str = "file") -> None:
    """A one-line ValueError naming `path` unless it is a regular file (see `open_regular`); FileNotFoundError if it
    does not exist."""
    open_regular(path, what).close()


def read_regular(path: str, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at `path` (see `open_regular`), refused naming it when over `max_bytes`."""
    with open_regular(path, what) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{path}: over the {max_bytes:,} bytes read as {what}")
    return data
