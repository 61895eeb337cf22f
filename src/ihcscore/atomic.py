"""Files that appear only when complete: write to a temporary name, fsync, rename.

Every output of ihcscore goes through here, so a crash, a full disk or Ctrl-C never leaves half a file
under the final name. No dependency on the rest of the package: any module may write with it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_path", "atomic_write", "atomic_open"]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable; not possible on every platform (Windows).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Context manager yielding a temporary path to write ``path`` through.

    The temporary file is ``<name>.tmp-<pid>`` in the same folder (so the final
    ``os.replace`` is a rename on one file system). On normal exit it is
    fsynced and renamed to ``path``; on an exception it is removed and ``path``
    is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        Final file name. Its folder must exist.

    Yields
    ------
    tmp : pathlib.Path
        Where to write the content.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the writer produced no file")
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path, writer: Callable[[Path], Any]):
    """Write a file atomically with ``writer(tmp_path)``.

    Parameters
    ----------
    path : str or os.PathLike
        Final file name.
    writer : callable
        Called with the temporary path (a :class:`pathlib.Path`); must write the
        complete file there (e.g. ``lambda p: df.to_parquet(p)``).

    Returns
    -------
    path : pathlib.Path
        The final path.

    Notes
    -----
    If ``writer`` raises, the temporary file is removed, ``path`` keeps its
    previous content (or stays absent) and the exception propagates.
    """
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8", newline=None):
    """Context manager like :func:`open` whose file appears only when complete.

    Parameters
    ----------
    path : str or os.PathLike
        Final file name.
    mode : {"w", "wb"}
        Text or binary writing.
    encoding : str, optional
        Text encoding (ignored for binary mode).
    newline : str, optional
        Passed to :func:`open` (use ``""`` for :mod:`csv`).

    Yields
    ------
    file : file object
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        if "b" in mode:
            f = open(tmp, mode)
        else:
            f = open(tmp, mode, encoding=encoding, newline=newline)
        with f:
            yield f
            f.flush()
