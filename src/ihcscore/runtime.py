"""Process-wide settings for long scoring runs: memory allocator and thread count.

Nothing here runs on import. The command line (when it scores tiles in its
own process, ``--workers 1``) and the benchmarks call
:func:`retain_freed_memory`; a library user (a notebook, napari) may call it
too, or leave the allocator as it is. Tile worker processes do not need it: their buffers (a few MB for 1024 px tiles) stay
below glibc's adaptive mmap threshold and are reused anyway, and retaining
would hold every worker at its peak memory between tiles.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["retain_freed_memory", "default_threads"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(max_block_bytes: int = 1 << 30) -> bool:
    """Let the C allocator reuse freed image-sized buffers instead of returning them to the OS.

    glibc serves every allocation above its mmap threshold (32 MB at most) with a
    fresh ``mmap`` and unmaps it on ``free``, so each full-size temporary of a
    large region is page-faulted in again: on a 4096 x 4096 region that was
    ~30 % of the engine's CPU time, all of it system time
    (``benchmarks/bench_engine.py`` prints it). Raising ``M_MMAP_THRESHOLD``
    and ``M_TRIM_THRESHOLD`` to ``max_block_bytes`` keeps such blocks in the
    heap for reuse. The process's peak memory is unchanged; its resident size
    stays near that peak after a large region instead of shrinking.

    Parameters
    ----------
    max_block_bytes : int
        Blocks up to this size come from the heap and freed memory up to this
        size stays mapped (bytes).

    Returns
    -------
    bool
        ``True`` where it took effect (Linux with glibc); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(max_block_bytes)) == 1
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, int(max_block_bytes)) == 1)


def default_threads() -> int:
    """Threads one region may use: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
