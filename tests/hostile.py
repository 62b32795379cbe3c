"""Helpers for the hostile-input suites (tests/test_hostile_*.py): run a command the way a careless
user or a hostile client would, and check the promise: one line saying what to change, the documented
exit code, no traceback, and nothing left behind on disk that was not there before.

The CLI runs in-process (`lorakit.cli.main(argv)` with stdout/stderr captured), which keeps a case
at milliseconds; an exception escaping `main` is what a real process would print as a traceback, so
it is recorded as one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from lorakit import cli


@dataclass
class Run:
    code: int
    out: str
    err: str

    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(argv: list[str], cwd: Path | None = None) -> Run:
    """`lorakit ARGV` in this process: exit code, stdout, stderr (an escaping exception becomes its traceback)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in argv])
            except SystemExit as stop:  # argparse
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:  # noqa: BLE001 - exactly what the suite looks for
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(previous)
    return Run(code, out.getvalue(), err.getvalue())


def run_process(argv: list[str], cwd: Path | None = None, timeout: float = 60, env: dict | None = None) -> Run:
    """`lorakit ARGV` as a real process (for what an in-process run cannot show: blocking reads, exit codes)."""
    proc = subprocess.run([sys.executable, "-m", "lorakit", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_refused(run: Run, code: int = 2, mentions: str | None = None) -> None:
    """The documented refusal: exit `code`, exactly one stderr line, no traceback; `mentions` in that line."""
    assert "Traceback" not in run.err, run.err
    assert run.code == code, (run.code, run.err[-2000:])
    lines = run.lines()
    assert len(lines) == 1, run.err
    if mentions is not None:
        assert mentions.lower() in lines[0].lower(), lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> 'dir', 'link:<target>' or the file's sha256 (what "as it was" means)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                state[rel] = "dir"
            elif path.is_file():
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[rel] = "special"
    return state


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (new or gone or changed), f"left behind: {new}, removed: {gone}, changed: {changed}"
