"""Process-wide settings for long scoring runs: memory allocator, thread count, worker lifetime.

Nothing here runs on import. The command line (when it scores tiles in its
own process, ``--workers 1``) and the benchmarks call
:func:`retain_freed_memory`; a library user (a notebook, napari) may call it
too, or leave the allocator as it is. Tile worker processes do not need it: their buffers (a few MB for 1024 px tiles) stay
below glibc's adaptive mmap threshold and are reused anyway, and retaining
would hold every worker at its peak memory between tiles.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

__all__ = ["retain_freed_memory", "release_freed_memory", "default_threads", "die_with_parent", "process_alive",
           "worker_pool"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_PR_SET_PDEATHSIG = 1


def _linux_libc():
    """The C library of this Linux process (ctypes), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


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
    mallopt = getattr(_linux_libc(), "mallopt", None)  # musl and other C libraries have none
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(max_block_bytes)) == 1
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, int(max_block_bytes)) == 1)


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS now (glibc ``malloc_trim(0)``).

    After a phase whose large temporaries are done with (a slide's tissue detection, its tiles),
    so that memory retained for reuse (:func:`retain_freed_memory`) does not add to the peak of the
    next phase, which needs differently sized blocks. ``True`` where it ran (Linux with glibc).
    """
    trim = getattr(_linux_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def default_threads() -> int:
    """Threads one region may use: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a worker ends when the process that started it dies, even by SIGKILL.

    Without it, workers of a killed ``ihcscore score`` stay blocked on their queue forever (orphans
    holding memory). Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a no-op.
    """
    import signal

    prctl = getattr(_linux_libc(), "prctl", None)
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def init_worker(parent_pid: int) -> None:
    """Pool initializer: :func:`die_with_parent`, and Ctrl-C is left to the parent.

    A terminal's Ctrl-C reaches every process of the foreground group; the parent stops the pool
    and says so in one line, where each worker would print a traceback of its own. SIGTERM ends a
    worker plainly (a forked worker would otherwise inherit the CLI's handler, which unwinds).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)


@contextmanager
def worker_pool(workers: int, start_method: str | None = None):
    """A process pool whose workers die with this process and ignore Ctrl-C (:func:`init_worker`).

    On leaving, also after an error or an early close, the tasks not started are dropped, not run first.
    ``start_method``: ``multiprocessing``'s ("spawn" for workers that use CUDA, which a forked child of a
    process that has used it cannot); default the platform's.
    """
    context = multiprocessing.get_context(start_method) if start_method else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=init_worker,
                               initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (this one included; another user's counts as running).

    On Windows always ``True``: there ``os.kill(pid, 0)`` would send the process a Ctrl-C.
    """
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
