"""npe2 writers: a cell Points layer's table (CSV / Parquet), a cell Labels layer (TIFF)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["write_cells", "write_labels"]


def write_cells(path: str, data, meta: dict) -> list[str]:
    """Write the ``features`` of a cell Points layer with :mod:`ihcscore.export`.

    Parameters
    ----------
    path : str
        ``.csv`` or ``.parquet``.
    data : (N, 2) array
        Point coordinates (µm, unused: the table has ``x_um``, ``y_um``).
    meta : dict
        Layer attributes; ``meta["features"]`` is the cell table.

    Returns
    -------
    list of str
        The path written.
    """
    from ihcscore.export import write_cells_csv, write_cells_parquet

    features = meta.get("features")
    table = pd.DataFrame(features) if features is not None else pd.DataFrame()
    if table.empty and len(data):
        table = pd.DataFrame({"y": [p[-2] for p in data], "x": [p[-1] for p in data]})
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        write_cells_parquet(p, table)
    else:
        write_cells_csv(p, table)
    return [str(p)]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write a Labels layer as a TIFF (int32) with its µm scale in the resolution tags.

    Parameters
    ----------
    path : str
    data : (M, N) int array
    meta : dict
        Layer attributes (``scale`` in µm/px).
    """
    import numpy as np
    import tifffile

    from ihcscore.export import atomic_path

    scale = meta.get("scale") or (1.0, 1.0)
    res = 1e4 / float(scale[-1])  # pixels per cm
    with atomic_path(path) as tmp:  # a failed write leaves no half TIFF under the name
        tifffile.imwrite(tmp, np.asarray(data).astype(np.int32), resolution=(res, res),
                         resolutionunit="CENTIMETER", compression="zlib")
    return [str(path)]
