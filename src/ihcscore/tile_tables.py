"""A slide's cell table, assembled from its tiles' tables with the table held once.

A slide holds up to ~10^6 cells, about 1 KB each with outlines. Tiles' tables wait on disk
(:class:`TileTables`, in a temporary folder named with the owner's process id) and are built into one
sorted table at the end; workers send them with their outlines packed (:func:`pack_tile`).
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .export import GEOMETRY_COLUMNS
from .runtime import process_alive

__all__ = ["TILE_TABLES_PREFIX", "TileTables", "pack_tile", "remove_stale_tile_tables"]


class TileTables:
    """The tiles' cell tables, kept on disk as they arrive and built into one sorted table at the end.

    A slide holds up to ~10^6 cells, about 1 KB each with outlines. Concatenating the tiles' tables
    and then sorting held the table twice; built here straight into its final arrays, in its final
    order, one tile at a time, the peak is the table plus one tile's. Outlines are stored as one
    array per tile and come back as views of it.

    Parameters
    ----------
    folder : path
        An empty folder for the tiles' files (removed by the caller).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.columns = None  # name -> dtype, of all the tables
        self._files = []  # (path, rows)
        self._keys = []  # (y_px, x_px) of every row, in arrival order

    def add(self, packed) -> None:
        """Keep one tile's table, as :func:`pack_tile` gives it."""
        table, rings, columns = packed
        if self.columns is None:
            self.columns = {}
        for name, dtype in columns.items():  # an empty tile has no outline columns: the union, as pd.concat
            self.columns.setdefault(name, dtype)
        if not len(table):
            return
        path = self.folder / f"{len(self._files)}.pkl"
        try:
            with open(path, "wb") as f:
                pickle.dump((table, rings), f, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as e:  # a full disk: say where, and what to do
            raise OSError(e.errno, f"cannot keep the tiles' cell tables in {self.folder} ({e.strerror}); "
                                   "free space there or point TMPDIR at a larger disk") from e
        self._files.append((path, len(table)))
        self._keys.append(table[["y_px", "x_px"]].to_numpy())

    def assemble(self, keep=None) -> pd.DataFrame:
        """One table sorted by ``y_px`` then ``x_px`` (stable); ``keep(y_px, x_px) -> bool array`` drops rows."""
        yx = np.concatenate(self._keys) if self._keys else np.empty((0, 2))
        rows = np.arange(len(yx)) if keep is None else np.flatnonzero(keep(yx[:, 0], yx[:, 1]))
        order = rows[np.lexsort((yx[rows, 1], yx[rows, 0]))]
        dest = np.full(len(yx), -1, dtype=np.int64)
        dest[order] = np.arange(len(order))
        names = list(self.columns)
        floats = [c for c in names if self.columns[c] == np.float64]
        # one float64 block, which the DataFrame takes as it is (building it from columns would copy)
        block = np.empty((len(floats), len(order)))
        others = {c: np.empty(len(order), dtype=self.columns[c]) for c in names if c not in floats}
        start = 0
        for path, n in self._files:
            with open(path, "rb") as f:
                table, rings = pickle.load(f)
            path.unlink()
            d = dest[start:start + n]
            start += n
            sel = d >= 0
            at = d[sel]
            for i, c in enumerate(floats):
                block[i, at] = table[c].to_numpy()[sel]
            for c, values in others.items():
                values[at] = (_unpack_rings(*rings[c]) if c in rings else table[c].to_numpy())[sel]
        self._files, self._keys = [], []
        cells = pd.DataFrame(block.T, columns=floats, copy=False)
        for i, c in enumerate(names):
            if c in others:
                cells.insert(i, c, others[c])
        return cells


#: Temporary folders of :class:`TileTables` are named this, the owner's process id, ``-`` and a random part.
TILE_TABLES_PREFIX = "ihcscore-tiles-"


def remove_stale_tile_tables(root=None) -> list[Path]:
    """Delete the tile-table folders of runs that were killed (their process is gone); returns them.

    A killed ``ihcscore score`` cannot remove its folder (up to ~1 KB per cell); the next slide scored
    on the machine does. Folders of live processes and of other users are left alone.

    Parameters
    ----------
    root : path, optional
        Where to look; default the system's temporary directory (``TMPDIR``).
    """
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{TILE_TABLES_PREFIX}*"):
        pid = folder.name[len(TILE_TABLES_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def pack_tile(cells: pd.DataFrame):
    """A tile's table without its outline columns, those as :func:`_pack_rings`, and every column's dtype.

    Workers send tiles this way: two arrays per outline column pickle much faster than ~10^3 small ones.
    """
    rings = {c: _pack_rings(cells[c].to_numpy()) for c in GEOMETRY_COLUMNS if c in cells}
    return cells.drop(columns=list(rings)), rings, dict(cells.dtypes)


def _pack_rings(rings):
    """(K_i, 2) arrays (or None) -> lengths (-1 for None) and all vertices in one array."""
    lengths = np.array([-1 if r is None else len(r) for r in rings], dtype=np.int64)
    present = [r for r in rings if r is not None]
    flat = np.concatenate(present) if present else np.empty((0, 2), np.float32)
    return lengths, flat


def _unpack_rings(lengths, flat):
    out = np.empty(len(lengths), dtype=object)
    has = np.flatnonzero(lengths >= 0)
    for i, ring in zip(has, np.split(flat, np.cumsum(lengths[has])[:-1]) if len(has) else []):
        out[i] = ring  # one by one: numpy would stack rings of equal length into one array
    return out
