"""What glibc does with the memory a process frees: give it back at once, or keep it for the next step.

    heap.return_freed_memory()   # a 4-bit base on a small machine: the lowest peak
    heap.keep_freed_memory()     # full-precision training: big blocks reused, not faulted in again

glibc serves a block over its mmap threshold (at most 32 MiB) from a fresh mapping and unmaps it when
freed. A training step at real sizes makes such blocks by the dozen (a 0.5B base's MLP activation at
batch 4x512 is 40 MB, fp32) and the kernel zeroes every page of each one again, step after step. The two
policies trade that time against the process's peak:

- `return_freed_memory`: blocks of 1 MiB and more from mmap, so freeing one gives it back at once. The
  heap cannot shrink below a block still in use, and a step's kept activations pin the temporaries freed
  around them: a QLoRA step on a Llama-2-7B shape peaked at 6.24 GB without this, 5.17 GB with it (and
  without checkpointed activations took 65-68 s instead of 55-57 s: the price of fresh pages).
- `keep_freed_memory`: no block from mmap and nothing trimmed, so a freed activation's pages serve the
  next step's. The 0.5B step (`benchmarks/scale.py --only train`, fp32, 2-core AVX2 host): 54.8-55.4 s
  instead of 61.1-62.1 s, at 7.09 GB peak instead of 6.65-6.71 GB (two alternated rounds, the same
  settings through glibc's variables); against PEFT, 1.18-1.50x its speed over four rounds (1.28x on the
  median) at 0.46-0.48x its peak (BENCHMARKS.md).

The first policy a process sets stands for the rest of it, except that a 4-bit base asks for
`return_freed_memory` whatever came before: it is the one for small machines. Both do nothing off glibc
or when the user set any of glibc's own malloc variables (theirs stand).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
RETURN = {M_MMAP_THRESHOLD: 1 << 20}
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 << 20}  # mallopt takes an int
UNKEEP = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 << 10, M_TOP_PAD: 128 << 10}  # glibc's defaults (mallopt(3))
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_policy: list[str] = []  # the one set in this process, if any


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None  # musl and others have no mallopt worth setting


def _user_set() -> bool:
    return any(os.environ.get(name) for name in USER_VARIABLES) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", "")


def _set(name: str, settings: dict[int, int]) -> bool:
    libc = _libc()
    if libc is None or _user_set():
        return False
    if not all(libc.mallopt(param, value) for param, value in settings.items()):
        return False
    _policy[:] = [name]
    return True


def policy() -> str | None:
    """"return" or "keep": the policy this process set, or None."""
    return _policy[0] if _policy else None


def return_freed_memory() -> bool:
    """Have glibc serve blocks of 1 MiB and more straight from mmap, so that freeing one gives it back
    (and undo `keep_freed_memory`). True if set."""
    if policy() == "return":
        return True
    return _set("return", {**UNKEEP, **RETURN} if policy() == "keep" else RETURN)


def keep_freed_memory() -> bool:
    """Have glibc serve every block from its heap and never trim it, so freed big blocks are reused
    without the kernel faulting and zeroing their pages again. True if set; False, doing nothing, once
    the process returns freed memory (a 4-bit base)."""
    if policy() is not None:
        return policy() == "keep"
    return _set("keep", KEEP)
