"""Files in and out. Writes are atomic: a file or a whole directory is written beside its target, then
renamed over it, so readers (and a crash) see the old one or the new one, never half of one; for a
directory, the old one stays (as `previous_directory(out)` while the new one is renamed in) until the
new one is in place. Reads check the file they opened (a regular file, inside the directory it must
stay in), so a FIFO never blocks and a symlink swapped in after a path check cannot escape it. No
torch import here, so the light commands (bigram) can use it too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lorakit.errors import UserError


def atomic_write_bytes(path: str | Path, data: bytes, make_parents: bool = True) -> None:
    """Write `data` to `path` atomically; with make_parents=False a missing directory is an error."""
    path = Path(path)
    if not make_parents and not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist; create it first")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write to {path.parent} ({err.strerror}); choose a writable directory") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode of a new file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)  # the rename itself survives a power cut only once its directory is synced


def fsync_directory(path: str | Path) -> None:
    """Make the entries of directory `path` (files created, renamed or removed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not every platform opens directories; the data itself was synced already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png(fig, path: str | Path, make_parents: bool = True) -> None:
    """Render a matplotlib figure to PNG, write it atomically, and close the figure."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue(), make_parents=make_parents)


@contextlib.contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """A new, empty directory beside `out` to write into; when the block ends normally it replaces
    `out` whole (`replace_directory`), when it raises it is removed and `out` is left as it was."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise UserError(f"cannot write to {out.parent} ({err.strerror}); choose a writable directory") from None
    try:
        yield staging
        fsync_directory(staging)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(staging: Path, out: Path) -> None:
    """Move `staging` to `out`; an existing `out` is kept (as `previous_directory(out)`) until the new
    one is in place, and put back if the move fails."""
    old, moved = previous_directory(out), out.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if moved:
            old.rename(out)
        raise
    fsync_directory(out.parent)  # both renames durable before the old copy goes
    shutil.rmtree(old, ignore_errors=True)


def previous_directory(out: Path) -> Path:
    """Where `replace_directory` keeps the old `out` during the swap (a reader's fallback after a crash)."""
    return out.with_name(f".{out.name}.old")


def check_output(path: str | Path, what: str, directory: bool = False, make_parents: bool = True,
                 inputs: dict | None = None) -> Path:
    """Refuse, before any work, an output that cannot be written: a directory where a file goes (or the
    reverse), a parent that is a file, a missing parent (make_parents=False), an unwritable directory, or
    one of the command's own `inputs` ({role: path}; writing would destroy it)."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != directory:
            kind = "a directory" if path.is_dir() else "a file"
            raise UserError(f"{what} {path} is {kind}; give a {'directory' if directory else 'file'} path")
        for role, source in (inputs or {}).items():
            if source is not None and Path(source).exists() and os.path.samefile(source, path):
                raise UserError(f"{what} {path} is also the {role} this command reads; writing it would destroy "
                                f"the {role}, so choose another output path")
    elif path.is_symlink():
        raise UserError(f"{what} {path} is a dangling symbolic link; remove it or choose another path")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path}: {ancestor} is a file, not a directory")
    if not make_parents and ancestor != path.parent:
        raise UserError(f"{what} {path}: directory {path.parent} does not exist; create it first")
    writable = path if directory and path.exists() else ancestor
    if not os.access(writable, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {writable} is not writable; choose another path")
    return path


# -- reading: check what was opened, not what a path said a moment before ----------------------------

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


class OutsideRoot(UserError):
    """A file that resolved outside the directory it had to stay in (a symlink, or one swapped in)."""


def open_regular(path: str | Path, what: str = "file", inside: str | Path | None = None) -> BinaryIO:
    """Open `path` for reading if it is a regular file (checked on the open file, so nothing can be swapped in
    between); a FIFO or device is refused without blocking on it. With `inside`, the file actually opened must
    lie under that directory (after every symlink), else `OutsideRoot`.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UserError(_open_error(path, what, err)) from None
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise UserError(f"{path} is {_KINDS.get(kind, 'not a regular file')}, not a regular file; "
                            f"give the {what} itself")
        if inside is not None:
            real = _opened_path(fd, path)
            if not real.is_relative_to(Path(inside).resolve()):
                raise OutsideRoot(f"{path} resolves outside {inside}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, what: str = "file", inside: str | Path | None = None) -> bytes:
    """The whole content of a regular file (see `open_regular`); one clear line for every way it can fail."""
    with open_regular(path, what, inside) as f:
        try:
            return f.read()
        except OSError as err:
            raise UserError(_open_error(Path(path), what, err)) from None


def read_json(path: str | Path, what: str = "JSON file", inside: str | Path | None = None) -> Any:
    """A JSON file's value; broken JSON, bad UTF-8, 5000-digit numbers and deep nesting are one line each."""
    return parse_json(read_bytes(path, what, inside), str(path))


def parse_json(data: bytes | str, where: str) -> Any:
    """json.loads with every failure as a UserError naming `where` (Python's own limits included)."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as err:
        reason = f"not UTF-8 at byte {err.start}"
    except json.JSONDecodeError as err:
        reason = f"{err.msg} at line {err.lineno} column {err.colno}"
    except RecursionError:
        reason = "nested too deeply"
    except ValueError as err:  # a number beyond Python's 4300-digit limit for int()
        reason = str(err).split(";")[0].split(":")[0]
    raise UserError(f"{where} is not valid JSON ({reason}); fix or re-create it")


def check_directory(path: str | Path, what: str = "directory") -> Path:
    """`path` if it is a directory (after symlinks); else one line saying what it is instead."""
    path = Path(path)
    try:
        kind = stat.S_IFMT(os.stat(path).st_mode)
    except OSError as err:
        raise UserError(_open_error(path, what, err)) from None
    except ValueError:  # a NUL byte in the path
        raise UserError(f"{what} path {str(path)!r} contains a NUL byte") from None
    if kind != stat.S_IFDIR:
        raise UserError(f"{path} is {_KINDS.get(kind, 'a file')}, not a {what}")
    return path


def _opened_path(fd: int, path: Path) -> Path:
    """The real path of the file open on `fd` (Linux: from /proc; elsewhere the resolved path, if it is the
    same file as the one open)."""
    proc = Path(f"/proc/self/fd/{fd}")
    if proc.exists():
        return Path(os.readlink(proc))
    resolved = path.resolve()
    here, there = os.fstat(fd), os.stat(resolved)
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        raise UserError(f"{path} changed while it was being opened; try again")
    return resolved


def _open_error(path: Path, what: str, err: OSError) -> str:
    if err.errno == errno.ENOENT:
        return f"{what} {path} not found"
    if err.errno == errno.ELOOP:
        return f"{path} is a symbolic link loop; point it at a real {what}"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"cannot read {path} (permission denied); check its permissions"
    if err.errno == errno.ENAMETOOLONG:
        return f"{what} path is too long: {str(path)[:80]}..."
    return f"cannot read {what} {path} ({err.strerror})"
