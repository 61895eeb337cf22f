"""npe2 writers: a cell Points layer's table (CSV / Parquet), a cell Labels layer (TIFF)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
        Layer attributes; ``meta["features"]`` is the cell table, ``meta["shown"]`` the cells
        that count (the others are not written).

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
    shown = meta.get("shown")
    if shown is not None and len(shown) == len(table):
        # hidden points are the cells left out of the scores (excluded, or counted in another region)
        table = table[np.asarray(shown, bool)].reset_index(drop=True)
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        write_cells_parquet(p, table)
    else:
        write_cells_csv(p, table)
    return [str(p)]


#: ImageDescription key that marks a label image written here (the reader opens it as Labels again).
LABELS_MARK = "ihcscore_labels"
#: Labels-layer metadata key: the labels that count (the others, e.g. cells of the context around a
#: region or excluded cells, are not written).
KEPT_LABELS = "ihcscore_kept_labels"


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write a Labels layer as a TIFF (int32): µm scale in the resolution tags, placement in the description.

    The ImageDescription holds JSON ``{"ihcscore_labels": 1, "scale_um": [y, x], "translate_um":
    [y, x], "name": ...}``, so the plugin's reader puts the labels back where they were on the
    slide (a region's labels start at the region, not at the slide's corner).

    Parameters
    ----------
    path : str
    data : (M, N) int array
    meta : dict
        Layer attributes (``scale`` in µm/px, ``translate`` in µm, ``name``; in ``metadata``,
        :data:`KEPT_LABELS` lists the labels to write, the others become 0).
    """
    import tifffile

    from ihcscore.atomic import atomic_path

    scale = [float(v) for v in (meta.get("scale") or (1.0, 1.0))][-2:]
    translate = [float(v) for v in (meta.get("translate") or (0.0, 0.0))][-2:]
    res = 1e4 / scale[-1]  # pixels per cm
    info = {LABELS_MARK: 1, "scale_um": scale, "translate_um": translate,
            "name": str(meta.get("name") or Path(path).stem), "units": "µm"}
    affine = meta.get("affine")
    if affine is not None and not np.allclose(np.asarray(affine, dtype=float), np.eye(len(affine))):
        info["affine"] = np.asarray(affine, dtype=float).tolist()  # a rotated slide's labels
    description = json.dumps(info)
    labels = np.asarray(data).astype(np.int32)
    kept = (meta.get("metadata") or {}).get(KEPT_LABELS)
    if kept is not None:
        labels = np.where(np.isin(labels, np.asarray(kept, dtype=np.int64)), labels, 0).astype(np.int32)
    with atomic_path(path) as tmp:  # a failed write leaves no half TIFF under the name
        tifffile.imwrite(tmp, labels, resolution=(res, res),
                         resolutionunit="CENTIMETER", compression="zlib", description=description,
                         metadata=None)
    return [str(path)]


def read_labels_tiff(path) -> tuple | None:
    """The ``(data, kwargs, "labels")`` layer tuple of a TIFF :func:`write_labels` wrote, else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            desc = tf.pages[0].description or ""
            if LABELS_MARK not in desc:
                return None
            info = json.loads(desc)
            data = tf.asarray()
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    kwargs = {"name": info.get("name") or Path(path).stem, "scale": tuple(info.get("scale_um", (1.0, 1.0))),
              "translate": tuple(info.get("translate_um", (0.0, 0.0))), "metadata": {"units": "µm"}}
    if info.get("units"):
        kwargs["units"] = (info["units"], info["units"])
    if info.get("affine"):
        kwargs["affine"] = np.asarray(info["affine"], dtype=float)
    return (data, kwargs, "labels")
