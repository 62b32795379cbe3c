"""Atomic writes: a file or a whole directory is written beside its target, then renamed over it.

Readers (and a crash) see the old file or the new one, never half of one; for a directory, the old
one stays (as `previous_directory(out)` while the new one is renamed in) until the new one is in
place. No torch import here, so the light commands (bigram) can use it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
    shutil.rmtree(old, ignore_errors=True)


def previous_directory(out: Path) -> Path:
    """Where `replace_directory` keeps the old `out` during the swap (a reader's fallback after a crash)."""
    return out.with_name(f".{out.name}.old")
