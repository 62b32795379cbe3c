"""Atomic file writes: a temp file beside the target, fsync, then rename over it.

Readers (and a crash) see the old file or the new one, never half of one. No torch import here,
so the light commands (bigram) can use it too.
"""

from __future__ import annotations

import os
import tempfile
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
