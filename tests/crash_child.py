"""Runs `lorakit` commands and kills them with SIGKILL just before their Nth change to the files under a
directory (tests/test_crash_resume.py). A job per line on stdin, a result per line on stdout:

    {"root": DIR, "kill_at": N, "argv": ["train", ...]}  ->  {"code": EXIT or null, "signal": SIG or null,
                                                              "changes": COUNT}

A change is a call that creates, writes, fsyncs, renames or removes a path under DIR: os.open with
O_CREAT (temporary files), open() for writing or appending (metrics.jsonl), os.fsync, os.replace,
os.rename, os.mkdir, os.unlink, os.rmdir, shutil.rmtree. Between two changes a process only computes,
so what a kill at any instant leaves on disk is what a kill just before some change leaves: a kill
before the Nth change, over every N, reaches every state a crash can. N = 0 never kills.

Each job runs in a process forked from this one, which imported lorakit once (and ran no torch op, so
the fork copies no thread pool): a job costs its run, not a Python start.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import sys


def _hook_changes(root: str, kill_at: int, seen: list[int]) -> None:
    def under(path) -> bool:
        if isinstance(path, int):  # fsync(fd): the file the descriptor is open on
            path = os.readlink(f"/proc/self/fd/{path}")
        elif not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def hook(owner, name, changes=lambda *args, **kwargs: True):
        real = getattr(owner, name)

        def call(path, *args, **kwargs):
            if changes(*args, **kwargs) and under(path):
                seen[0] += 1
                if seen[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(path, *args, **kwargs)

        setattr(owner, name, call)

    for name in ("fsync", "replace", "rename", "mkdir", "unlink", "rmdir"):
        hook(os, name)
    hook(shutil, "rmtree")
    hook(os, "open", lambda flags, *a, **k: bool(flags & os.O_CREAT))
    hook(builtins, "open", lambda mode="r", *a, **k: any(c in mode for c in "wax+"))


def _job(root: str, kill_at: int, argv: list[str], report: int) -> None:
    """In the forked process: hook, run, write the number of changes to `report`, exit with lorakit's code."""
    os.dup2(2, 1)  # stdout is the results channel: the run's own output goes to stderr
    seen = [0]
    code = 1
    try:
        from lorakit.cli import main

        _hook_changes(os.path.realpath(root), kill_at, seen)
        code = main(argv)
    finally:
        os.write(report, str(seen[0]).encode())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    import lorakit.cli  # noqa: F401 - imported once, before the forks

    for line in sys.stdin:
        job = json.loads(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _job(job["root"], job["kill_at"], job["argv"], write)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        changes = os.read(read, 64)
        os.close(read)
        result = {"code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "changes": int(changes) if changes else None}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
