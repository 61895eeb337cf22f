"""Outputs: cell tables (Parquet, CSV), QuPath-compatible GeoJSON, summary JSON/CSV.

Every file is written through :func:`atomic_write`: the bytes go to
``<name>.tmp-<pid>`` in the destination folder, are flushed to disk
(``fsync``) and only then renamed over the final name with ``os.replace``.
A reader therefore sees either the previous complete file or the new
complete file, never a partial one. :func:`write_slide_outputs` writes a
``_COMPLETE`` marker last, so a batch can tell a finished slide folder from an
interrupted one (:func:`is_complete`).

Cell table contract (one row per cell)
--------------------------------------
``x_px``, ``y_px`` (nucleus centroid, level-0 px), ``x_um``, ``y_um``,
``class`` (``"tumour"`` / ``"other"``), ``bin`` (0-3, -1 = unscored), then the
measurements with QuPath's names (``"Nucleus: Area µm^2"``,
``"Cell: DAB OD mean"``, ...). Two optional geometry columns:

``nucleus_polygon``, ``cell_polygon``
    One entry per cell: an ``(N, 2)`` float array-like of ``(x, y)`` vertices
    in level-0 pixels (the outer ring; it may be open or closed, the writers
    close it), or ``None`` when unknown. Geometry columns are written only to
    ``cells.geojson``; the Parquet and CSV tables hold the measurements.

QuPath GeoJSON conventions followed
-----------------------------------
Checked against QuPath's own serialiser (``qupath-core``
``qupath/lib/io/PathObjectTypeAdapters.java`` and ``GsonTools.java``, v0.4+
and the v0.3 branch) and the QuPath docs page "Exporting annotations"
(coordinates in full-resolution pixels, origin at the top-left corner):

* A ``FeatureCollection``; each cell is a ``Feature`` whose ``id`` is a UUID
  string (QuPath >= 0.4 keeps it as the object ID), ``geometry`` is the cell
  boundary and ``nucleusGeometry`` (a foreign member QuPath reads for cells) the
  nucleus boundary, both GeoJSON ``Polygon`` with closed rings in level-0 px.
* ``properties.objectType = "cell"`` (QuPath >= 0.4; 0.3 reads
  ``object_type``, written with ``qupath_version="0.3"``).
* ``properties.classification = {"name": "Tumor: 2+", "color": [r, g, b]}``.
  QuPath >= 0.4 splits the name on ``":"`` into a derived class (base
  ``Tumor``, intensity ``2+``); it needs both ``name`` and ``color``.
* ``properties.measurements``: a ``{name: value}`` object (QuPath >= 0.4); the
  v0.3 reader accepts only a list of ``{"name", "value"}`` objects, written with
  ``qupath_version="0.3"`` (v0.4+ reads that form too). Non-finite values are
  left out: JSON has no NaN and QuPath shows a missing measurement as NaN.
* ``properties.isLocked = false``.

Classification mapping (QuPath's intensity classes and colours)
----------------------------------------------------------------
``class`` ``"tumour"`` -> base class ``Tumor`` (QuPath's built-in spelling),
``"other"`` -> ``Other``; ``bin`` 0/1/2/3 -> ``Negative`` / ``1+`` / ``2+`` /
``3+`` (with a single threshold: ``Negative`` / ``Positive``), so a cell is
e.g. ``"Tumor: 3+"``. Unscored cells (``bin == -1``) get the base class only.
Colours are QuPath's intensity colours: Negative (90, 90, 180) blue,
1+ (255, 215, 0) yellow, 2+ (225, 150, 50) orange, 3+ and Positive
(200, 50, 50) red; base classes Tumor (200, 0, 0), Other (255, 200, 0).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import datetime as _dt
import functools
import gc
import hashlib
import io
import itertools
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .atomic import atomic_open, atomic_path, atomic_write  # noqa: F401 - part of this module's API
from .runtime import process_alive, worker_pool

__all__ = [
    "GEOMETRY_COLUMNS",
    "BIN_NAMES",
    "BIN_COLORS",
    "SUMMARY_CSV_COLUMNS",
    "FAILURES_CSV_COLUMNS",
    "COMPLETE_MARKER",
    "slide_source",
    "recorded_source",
    "same_source",
    "file_sample",
    "claim_folder",
    "release_folder",
    "record_source_path",
    "SOURCE_CLAIM",
    "same_place",
    "source_key",
    "atomic_write",
    "atomic_open",
    "atomic_path",
    "to_jsonable",
    "hash_params",
    "qupath_class_name",
    "qupath_class_color",
    "write_cells_parquet",
    "write_cells_csv",
    "cells_to_geojson",
    "write_cells_geojson",
    "read_cells_geojson",
    "write_summary_json",
    "write_slide_outputs",
    "is_complete",
    "summary_row",
    "write_summary_csv",
    "append_summary_row",
    "read_csv_rows",
    "folder_lock",
    "update_folder_tables",
    "write_failures_csv",
    "write_failures",
]

#: Per-cell geometry columns (vertex arrays in level-0 px); never in CSV/Parquet.
GEOMETRY_COLUMNS = ("nucleus_polygon", "cell_polygon")

#: QuPath intensity class names by bin (three thresholds).
BIN_NAMES = {0: "Negative", 1: "1+", 2: "2+", 3: "3+"}
#: QuPath intensity class names by bin (single threshold).
BIN_NAMES_SINGLE = {0: "Negative", 1: "Positive"}
#: QuPath's intensity class colours (RGB 0-255), keyed by class name.
BIN_COLORS = {
    "Negative": (90, 90, 180),
    "1+": (255, 215, 0),
    "2+": (225, 150, 50),
    "3+": (200, 50, 50),
    "Positive": (200, 50, 50),
}
#: Base class names and colours (QuPath built-ins).
CLASS_NAMES = {"tumour": "Tumor", "tumor": "Tumor", "other": "Other"}
CLASS_COLORS = {"Tumor": (200, 0, 0), "Other": (255, 200, 0)}
UNCLASSIFIED_COLOR = (64, 64, 64)

#: Columns of ``DIR/summary.csv``, in order (contract; extras only appended).
SUMMARY_CSV_COLUMNS = (
    "slide",
    "status",
    "n_cells",
    "tumour_n",
    "tumour_h_score",
    "tumour_percent_positive",
    "tumour_allred",
    "tumour_irs",
    "all_n",
    "all_h_score",
    "all_percent_positive",
    "all_allred",
    "all_irs",
    "runtime_s",
    # Added after the contract's columns: the H-score of every compartment.
    "tumour_h_score_nucleus",
    "tumour_h_score_cytoplasm",
    "tumour_h_score_membrane",
    "tumour_h_score_cell",
    "all_h_score_nucleus",
    "all_h_score_cytoplasm",
    "all_h_score_membrane",
    "all_h_score_cell",
    "error",
    "warnings",
    "resumed",  # True: the slide's complete outputs were found and kept (not rescored) by this run
    "preset",  # what scored it: rows of several runs (other presets, other versions) can be told apart
    "software_version",
    "scored_cells",  # tumour | all: the group of the slide's headline score (the preset's scoring.cells)
)
#: Columns of ``DIR/failures.csv``.
FAILURES_CSV_COLUMNS = ("slide", "path", "error")
#: Name of the marker :func:`write_slide_outputs` writes last.
COMPLETE_MARKER = "_COMPLETE"

_SCORE_KEYS = ("n", "h_score", "percent_positive", "allred", "irs")


# --------------------------------------------------------------------------- #
# JSON helpers
# --------------------------------------------------------------------------- #
def to_jsonable(obj):
    """Convert ``obj`` to plain JSON types.

    NumPy scalars and arrays become Python numbers and lists, NaN and
    infinities become ``None`` (JSON ``null``), tuples and sets become lists,
    paths become strings, objects with ``to_dict()`` (e.g. ``StainVectors``) or
    dataclasses become dicts. Mapping keys become strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if obj is pd.NA or obj is pd.NaT:
        return None
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):  # 0-d arrays, other scalars
        return to_jsonable(obj.item())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def _dumps(obj, indent=2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def hash_params(params) -> str:
    """SHA-256 hex digest of ``params`` as canonical JSON (sorted keys).

    Use it as the ``params_hash`` of :func:`write_slide_outputs` so that a
    resumed batch recomputes slides whose parameters changed.
    """
    text = json.dumps(to_jsonable(params), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- #
# Cell tables
# --------------------------------------------------------------------------- #
#: The columns a cell table file starts with (DESIGN.md's output contract: position, class, bin, then every
#: measurement); ``object_id`` (slides) or ``label`` (regions) before them.
LEADING_COLUMNS = ("object_id", "label", "x_px", "y_px", "x_um", "y_um", "class", "bin")


def table_columns(cells: pd.DataFrame) -> list:
    """The columns written for a cell table, in file order: :data:`LEADING_COLUMNS`, then the others as
    they come; outlines (:data:`GEOMETRY_COLUMNS`) left out."""
    lead = [c for c in LEADING_COLUMNS if c in cells.columns]
    return lead + [c for c in cells.columns if c not in lead and c not in GEOMETRY_COLUMNS]


def _table_only(cells: pd.DataFrame) -> pd.DataFrame:
    columns = table_columns(cells)
    return cells if list(cells.columns) == columns else cells[columns]


def write_cells_parquet(path, cells: pd.DataFrame):
    """Write the cell table to Parquet (geometry columns dropped).

    Column names are kept exactly (including ``µ`` and ``^``); the index is
    not written.

    Parameters
    ----------
    path : str or os.PathLike
    cells : pandas.DataFrame
        Cell table (see module docstring).

    Returns
    -------
    path : pathlib.Path
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = table_columns(cells)

    def _w(p):
        # Row groups of PARQUET_ROWS converted one at a time: a whole slide's table (10^6 cells) is
        # never copied whole (pandas' to_parquet holds a second copy plus the Arrow table).
        with contextlib.ExitStack() as stack:
            writer = None
            for start in range(0, max(len(cells), 1), PARQUET_ROWS):
                chunk = cells.iloc[start:start + PARQUET_ROWS][columns].reset_index(drop=True)
                chunk.columns = [str(c) for c in columns]
                table = pa.Table.from_pandas(chunk, preserve_index=False)
                if writer is None:
                    writer = stack.enter_context(pq.ParquetWriter(p, table.schema))
                writer.write_table(table)

    return atomic_write(path, _w)


#: Rows per Parquet row group (and per conversion to Arrow) in ``cells.parquet``.
PARQUET_ROWS = 65536


def write_cells_csv(path, cells: pd.DataFrame):
    """Write the cell table to CSV, UTF-8, comma separated (geometry dropped).

    Column names are kept exactly; missing values are empty fields; floats are
    written with full precision (round trip exact).

    Returns
    -------
    path : pathlib.Path
    """
    table = _table_only(cells)

    def _w(p):
        table.to_csv(p, index=False, encoding="utf-8", lineterminator="\n")

    return atomic_write(path, _w)


# --------------------------------------------------------------------------- #
# GeoJSON
# --------------------------------------------------------------------------- #
def qupath_class_name(cell_class, bin_, n_thresholds: int = 3) -> str | None:
    """QuPath classification name for one cell, e.g. ``"Tumor: 2+"``.

    Parameters
    ----------
    cell_class : str or None
        ``"tumour"`` / ``"other"`` (other strings are capitalised as given).
    bin_ : int
        0-3, or -1 / None for an unscored cell (base class only).
    n_thresholds : int
        1 for positive/negative scoring (``Negative`` / ``Positive``), else 3.

    Returns
    -------
    name : str or None
        ``None`` when the cell has neither class nor bin.
    """
    base = None
    if cell_class is not None and not (isinstance(cell_class, float) and math.isnan(cell_class)):
        s = str(cell_class).strip()
        if s:
            base = CLASS_NAMES.get(s.lower(), s[:1].upper() + s[1:])
    intensity = None
    if bin_ is not None and not (isinstance(bin_, float) and math.isnan(bin_)):
        b = int(bin_)
        names = BIN_NAMES_SINGLE if n_thresholds == 1 else BIN_NAMES
        intensity = names.get(b)
    if base and intensity:
        return f"{base}: {intensity}"
    return base or intensity


def qupath_class_color(name: str | None) -> tuple[int, int, int]:
    """RGB colour QuPath uses for a classification name (intensity part first)."""
    if not name:
        return UNCLASSIFIED_COLOR
    last = name.split(":")[-1].strip()
    if last in BIN_COLORS:
        return BIN_COLORS[last]
    return CLASS_COLORS.get(name.split(":")[0].strip(), UNCLASSIFIED_COLOR)


def _ring(vertices) -> list | None:
    """Closed ring ``[[x, y], ...]`` from an ``(N, 2)`` array-like, or None."""
    if vertices is None:
        return None
    if isinstance(vertices, float) and math.isnan(vertices):
        return None
    arr = np.asarray(vertices, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3 or not np.isfinite(arr).all():
        return None
    if not np.array_equal(arr[0], arr[-1]):
        arr = np.vstack([arr, arr[:1]])
    if arr.shape[0] < 4:
        return None
    return arr.tolist()


def _circle_ring(x, y, radius, n=16) -> list:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.column_stack([x + radius * np.cos(t), y + radius * np.sin(t)])
    ring = np.vstack([ring, ring[:1]])
    return ring.tolist()


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


_CENTROID_NAMES = {"x_um": "Centroid X µm", "y_um": "Centroid Y µm"}
_NOT_MEASUREMENTS = {"x_px", "y_px", "x_um", "y_um", "bin", "class", *GEOMETRY_COLUMNS}


def _default_measurement_columns(cells: pd.DataFrame) -> list[str]:
    return [
        c
        for c in cells.columns
        if c not in _NOT_MEASUREMENTS and pd.api.types.is_numeric_dtype(cells[c])
        and not pd.api.types.is_bool_dtype(cells[c])
    ]


def cells_to_geojson(
    cells: pd.DataFrame,
    mpp: float,
    measurement_columns: Sequence[str] | None = None,
    n_thresholds: int = 3,
    qupath_version: str = "0.4",
    seed: int | None = None,
) -> dict:
    """Build a QuPath-importable GeoJSON ``FeatureCollection`` of cells.

    Parameters
    ----------
    cells : pandas.DataFrame
        Cell table (module docstring); ``nucleus_polygon`` / ``cell_polygon``
        optional.
    mpp : float
        Level-0 pixel size in µm/px (for the fallback circles).
    measurement_columns : sequence of str, optional
        Columns written as QuPath measurements. Default: every numeric column
        except ``x_px``, ``y_px``, ``x_um``, ``y_um``, ``bin``; ``x_um`` and
        ``y_um`` are always added as QuPath's ``Centroid X µm`` and
        ``Centroid Y µm``.
    n_thresholds : int
        1 for positive/negative scoring, 3 otherwise (class names).
    qupath_version : {"0.4", "0.3"}
        ``"0.4"`` (default) writes what QuPath 0.4-0.6 write and read;
        ``"0.3"`` writes ``object_type``, a measurement list and the old
        ``colorRGB`` classification, which QuPath 0.3 needs.
    seed : int, optional
        Seed for the feature UUIDs (reproducible files); random by default.

    Returns
    -------
    collection : dict

    Notes
    -----
    ``geometry`` is the cell polygon, or the nucleus polygon when the cell has
    none; ``nucleusGeometry`` the nucleus polygon. A GeoJSON Point is not a
    cell in QuPath, so a cell without polygons gets circles around
    (``x_px``, ``y_px``) with the area of ``Nucleus: Area µm^2`` (nucleus) and
    ``Cell: Area µm^2`` (cell; nucleus circle if absent); without an area the
    nucleus circle has a 3 µm radius. Circles have 16 vertices.
    """
    features = _geojson_features(cells, mpp, measurement_columns, n_thresholds, qupath_version, seed)
    return {"type": "FeatureCollection", "features": list(features)}


def _checked_geojson_args(cells, mpp, measurement_columns, qupath_version):
    """``(mpp, measurement columns)`` of :func:`cells_to_geojson`, checked (the default columns resolved)."""
    if qupath_version not in ("0.4", "0.3"):
        raise ValueError(f"qupath_version must be '0.4' or '0.3', not {qupath_version!r}")
    if mpp is None or not (float(mpp) > 0):
        raise ValueError(f"mpp must be a positive pixel size in µm/px, got {mpp!r}")
    if measurement_columns is None:
        return float(mpp), _default_measurement_columns(cells)
    missing = [c for c in measurement_columns if c not in cells.columns]
    if missing:
        raise KeyError(f"measurement columns not in the cell table: {missing}")
    return float(mpp), list(measurement_columns)


def _feature_ids(seed):
    """Feature UUIDs, endless: random, or from ``seed`` (the same sequence for the same seed)."""
    rng = np.random.default_rng(seed) if seed is not None else None
    while True:
        yield str(uuid.UUID(bytes=rng.bytes(16), version=4)) if rng is not None else str(uuid.uuid4())


def _geojson_features(cells, mpp, measurement_columns, n_thresholds, qupath_version, seed=None, ids=None,
                      first_row=0):
    """The features of :func:`cells_to_geojson`, one at a time (checks run before the first).

    ``ids``: the features' ids (default :func:`_feature_ids` of ``seed``); ``first_row``: the row number of
    ``cells``' first row in the whole table (for messages).
    """
    mpp, measurement_columns = _checked_geojson_args(cells, mpp, measurement_columns, qupath_version)
    ids = iter(ids) if ids is not None else _feature_ids(seed)
    names = list(measurement_columns) + [_CENTROID_NAMES[c] for c in ("x_um", "y_um") if c in cells.columns]
    sources = list(measurement_columns) + [c for c in ("x_um", "y_um") if c in cells.columns]
    values = np.column_stack([pd.to_numeric(cells[c], errors="coerce").to_numpy(float) for c in sources]) \
        if sources else np.zeros((len(cells), 0))

    n = len(cells)
    xs = cells["x_px"].to_numpy(float) if "x_px" in cells else np.full(n, np.nan)
    ys = cells["y_px"].to_numpy(float) if "y_px" in cells else np.full(n, np.nan)
    classes = cells["class"].tolist() if "class" in cells else [None] * n
    bins = cells["bin"].tolist() if "bin" in cells else [None] * n
    nuc_polys = cells["nucleus_polygon"].tolist() if "nucleus_polygon" in cells else [None] * n
    cell_polys = cells["cell_polygon"].tolist() if "cell_polygon" in cells else [None] * n
    nuc_area = cells["Nucleus: Area µm^2"].to_numpy(float) if "Nucleus: Area µm^2" in cells else np.full(n, np.nan)
    cell_area = cells["Cell: Area µm^2"].to_numpy(float) if "Cell: Area µm^2" in cells else np.full(n, np.nan)

    finite = np.isfinite(values).all(axis=1)
    for i in range(n):
        nuc = _ring(nuc_polys[i])
        cel = _ring(cell_polys[i])
        if nuc is None:
            if not (math.isfinite(xs[i]) and math.isfinite(ys[i])):
                raise ValueError(f"cell {first_row + i} has no nucleus polygon and no finite x_px/y_px")
            a = nuc_area[i]
            r_um = math.sqrt(a / math.pi) if math.isfinite(a) and a > 0 else 3.0
            nuc = _circle_ring(xs[i], ys[i], r_um / mpp)
        if cel is None:
            a = cell_area[i]
            if cell_polys[i] is None and math.isfinite(a) and a > 0 and _ring(nuc_polys[i]) is None:
                cel = _circle_ring(xs[i], ys[i], math.sqrt(a / math.pi) / mpp)
            else:
                cel = nuc
        cname = qupath_class_name(classes[i], bins[i], n_thresholds)
        row = values[i].tolist()
        meas = dict(zip(names, row)) if finite[i] else {k: v for k, v in zip(names, row) if math.isfinite(v)}
        fid = next(ids)
        props: dict[str, Any] = {}
        if qupath_version == "0.4":
            props["objectType"] = "cell"
            if cname:
                props["classification"] = {"name": cname, "color": list(qupath_class_color(cname))}
            props["isLocked"] = False
            props["measurements"] = meas
        else:
            props["object_type"] = "cell"
            if cname:
                props["classification"] = _legacy_class(cname)
            props["isLocked"] = False
            props["measurements"] = [{"name": k, "value": v} for k, v in meas.items()]
        yield {
            "type": "Feature",
            "id": fid,
            "geometry": {"type": "Polygon", "coordinates": [cel]},
            "nucleusGeometry": {"type": "Polygon", "coordinates": [nuc]},
            "properties": props,
        }


def _pack_rgb(rgb) -> int:
    r, g, b = rgb
    v = (255 << 24) | (r << 16) | (g << 8) | b
    return v - (1 << 32)  # Java signed int, as QuPath 0.3 writes it


def _legacy_class(name: str) -> dict:
    # QuPath <= 0.3 serialises PathClass with its fields: name, colorRGB, parentClass.
    parts = [p.strip() for p in name.split(":")]
    obj = None
    for k, part in enumerate(parts):
        sub = ": ".join(parts[: k + 1])
        d = {"name": part, "colorRGB": _pack_rgb(qupath_class_color(sub))}
        if obj is not None:
            d["parentClass"] = obj
        obj = d
    return obj


def write_cells_geojson(
    path,
    cells: pd.DataFrame,
    mpp: float,
    measurement_columns: Sequence[str] | None = None,
    n_thresholds: int = 3,
    qupath_version: str = "0.4",
    seed: int | None = None,
    workers: int = 1,
):
    """Write ``cells.geojson`` that QuPath imports as cell objects.

    Drag the file onto the slide in QuPath, or ``File > Object data... >
    Import objects``. See :func:`cells_to_geojson` for the parameters and the
    module docstring for the conventions. ``workers > 1`` encodes blocks of
    :data:`GEOJSON_ROWS` features in that many processes (the same bytes).

    Returns
    -------
    path : pathlib.Path
    """
    mpp, measurement_columns = _checked_geojson_args(cells, mpp, measurement_columns, qupath_version)
    ids = _feature_ids(seed)
    # Blocks of features encoded by the C encoder and written in order: memory does not grow with the
    # slide, and the bytes are those of json.dump of the whole FeatureCollection.
    blocks = ((cells.iloc[a:a + GEOJSON_ROWS], mpp, measurement_columns, n_thresholds, qupath_version,
               list(itertools.islice(ids, min(GEOJSON_ROWS, len(cells) - a))), a)
              for a in range(0, len(cells), GEOJSON_ROWS))
    with atomic_open(path, "w") as f:
        f.write('{"type":"FeatureCollection","features":[')
        for k, text in enumerate(_in_order(_encode_features, blocks, workers if len(cells) > GEOJSON_ROWS else 1)):
            f.write(("," if k else "") + text)
        f.write("]}")
    return Path(path)


#: Features per block of :func:`write_cells_geojson` (what one process encodes at a time: the block's
#: measurements, not the whole slide's, are held at once).
GEOJSON_ROWS = 5000


def _encode_features(args) -> str:
    encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
    cells, mpp, columns, n_thresholds, qupath_version, ids, first_row = args
    return ",".join(encode(feature) for feature in _geojson_features(
        cells, mpp, columns, n_thresholds, qupath_version, ids=ids, first_row=first_row))


def _in_order(fn, items, workers: int):
    """``fn(item)`` for each item, in order: inline, or in ``workers`` processes, a few items ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with worker_pool(workers) as pool:
        # The workers are forked at the first submit and share this process's objects (a slide's table):
        # frozen, the workers' garbage collector leaves them, and their pages, untouched.
        gc.freeze()
        try:
            pending = collections.deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                gc.unfreeze()
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            gc.unfreeze()


def _class_from_name(name: str | None):
    """Inverse of :func:`qupath_class_name`: (class, bin)."""
    if not name:
        return None, -1
    parts = [p.strip() for p in name.split(":")]
    inv_bins = {"Negative": 0, "1+": 1, "2+": 2, "3+": 3, "Positive": 1}
    b = -1
    if parts and parts[-1] in inv_bins:
        b = inv_bins[parts[-1]]
        parts = parts[:-1]
    cls = None
    if parts:
        base = parts[0]
        cls = {"Tumor": "tumour", "Other": "other"}.get(base, base.lower())
    return cls, b


def _legacy_class_name(obj) -> str | None:
    names = []
    while isinstance(obj, dict):
        if obj.get("name"):
            names.append(obj["name"])
        obj = obj.get("parentClass")
    return ": ".join(reversed(names)) if names else None


def read_cells_geojson(path, mpp: float | None = None) -> pd.DataFrame:
    """Read a cell GeoJSON (this module's or QuPath's) into a cell table.

    Parameters
    ----------
    path : str or os.PathLike
    mpp : float, optional
        Level-0 pixel size (µm/px). When given, ``x_px``/``y_px`` come from
        ``Centroid X µm``/``Centroid Y µm`` divided by ``mpp``; otherwise from
        the nucleus polygon centroid.

    Returns
    -------
    cells : pandas.DataFrame
        ``x_px``, ``y_px``, ``x_um``, ``y_um`` (NaN when unknown), ``class``,
        ``bin``, the measurements (names as in the file), ``nucleus_polygon``
        and ``cell_polygon`` (closed-ring ``(N, 2)`` arrays), ``id``.
    """
    from shapely.geometry import shape

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    features = data["features"] if isinstance(data, dict) else data
    rows = []
    for feat in features:
        props = feat.get("properties") or {}
        otype = props.get("objectType", props.get("object_type", props.get("type")))
        if otype not in (None, "cell", "detection", "PathCellObject", "PathDetectionObject"):
            continue
        cls_obj = props.get("classification")
        if isinstance(cls_obj, dict):
            if "names" in cls_obj:
                cname = ": ".join(cls_obj["names"])
            elif "parentClass" in cls_obj or "colorRGB" in cls_obj:
                cname = _legacy_class_name(cls_obj)
            else:
                cname = cls_obj.get("name")
        elif isinstance(cls_obj, str):
            cname = cls_obj
        else:
            cname = None
        cls, b = _class_from_name(cname)
        meas = props.get("measurements") or {}
        if isinstance(meas, list):
            meas = {m["name"]: m["value"] for m in meas}
        meas = {k: (np.nan if v is None else float(v)) for k, v in meas.items()}
        geom = feat.get("geometry")
        ngeom = feat.get("nucleusGeometry") or geom
        nuc = np.asarray(ngeom["coordinates"][0], float) if ngeom and ngeom.get("type") == "Polygon" else None
        cel = np.asarray(geom["coordinates"][0], float) if geom and geom.get("type") == "Polygon" else None
        x_um = meas.pop("Centroid X µm", np.nan)
        y_um = meas.pop("Centroid Y µm", np.nan)
        if mpp and math.isfinite(x_um) and math.isfinite(y_um):
            x_px, y_px = x_um / mpp, y_um / mpp
        elif ngeom:
            c = shape(ngeom).centroid
            x_px, y_px = c.x, c.y
        else:
            x_px = y_px = np.nan
        row = {"x_px": x_px, "y_px": y_px, "x_um": x_um, "y_um": y_um, "class": cls, "bin": b}
        row.update(meas)
        row["nucleus_polygon"] = nuc
        row["cell_polygon"] = cel
        row["id"] = feat.get("id")
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["bin"] = df["bin"].astype("int8")
        front = ["x_px", "y_px", "x_um", "y_um", "class", "bin"]
        back = ["nucleus_polygon", "cell_polygon", "id"]
        mid = [c for c in df.columns if c not in front and c not in back]
        df = df[front + mid + back]
    return df


# --------------------------------------------------------------------------- #
# Summary JSON and per-slide folder
# --------------------------------------------------------------------------- #
def write_summary_json(path, summary: Mapping):
    """Write ``summary.json`` (UTF-8, indented).

    NaN and infinities become ``null``; NumPy types become Python types, so the
    file is strict JSON (``allow_nan=False``).

    Returns
    -------
    path : pathlib.Path
    """
    text = _dumps(summary)
    with atomic_open(path, "w") as f:
        f.write(text)
        f.write("\n")
    return Path(path)


def _n_thresholds(summary: Mapping) -> int:
    t = summary.get("thresholds") if isinstance(summary, Mapping) else None
    try:
        return 1 if t is not None and len(t) == 1 else 3
    except TypeError:
        return 3


def write_slide_outputs(
    out_dir,
    summary,
    cells: pd.DataFrame | None = None,
    mpp: float | None = None,
    csv: bool = False,
    report: bool = True,
    overlay_images: Mapping | None = None,
    params_hash: str | None = None,
    geojson: bool = True,
    workers: int = 1,
    source: Mapping | None = None,
):
    """Write one slide's output folder; the ``_COMPLETE`` marker last.

    Parameters
    ----------
    out_dir : str or os.PathLike
        ``DIR/<slide stem>``; created if needed.
    summary : dict or result object
        The summary.json content. An object with ``.summary`` and ``.cells``
        attributes (a pipeline ``SlideResult``) is accepted in its place.
    cells : pandas.DataFrame
        Cell table (optional geometry columns).
    mpp : float, optional
        Level-0 µm/px; default ``summary["mpp"]``.
    csv : bool
        Also write ``cells.csv``.
    report : bool
        Write ``report.html`` (:func:`ihcscore.report.write_slide_report`).
    overlay_images : dict, optional
        Images for the report: ``thumbnail`` (RGB array), ``tissue_mask``
        (bool array, any size), ``thumbnail_downsample`` (float, level-0 px per
        thumbnail px), ``fields`` (see :func:`ihcscore.report.slide_report_html`).
    params_hash : str, optional
        Hash of the parameters (:func:`hash_params`) stored in the marker.
    geojson : bool
        Write ``cells.geojson`` (default True).
    workers : int
        Processes that encode ``cells.geojson`` (:func:`write_cells_geojson`).
    source : dict, optional
        The slide file these outputs are of (:func:`slide_source`), stored in the marker.

    Returns
    -------
    written : dict
        File role -> path.

    Notes
    -----
    An existing ``_COMPLETE`` is removed first, so an interrupted rewrite never
    looks complete, and so are ``cells.csv``, ``cells.geojson`` and ``report.html``
    when this call does not write them (they would be of earlier parameters). The marker is JSON with ``params_hash``, the file names,
    the software version, the time and ``source``.
    """
    if cells is None and hasattr(summary, "summary") and hasattr(summary, "cells"):
        summary, cells = summary.summary, summary.cells
    if cells is None:
        cells = pd.DataFrame(columns=["x_px", "y_px", "x_um", "y_um", "class", "bin"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / COMPLETE_MARKER
    # The marker first (an interrupted rewrite never looks complete), then the optional files this call does
    # not write: a report or cells.csv of earlier parameters must not sit beside the new results.
    skipped = {"cells.csv": not csv, "cells.geojson": not geojson, "report.html": not report}
    for name in [COMPLETE_MARKER] + [n for n, skip in skipped.items() if skip]:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    if mpp is None:
        mpp = summary.get("mpp")
    written: dict[str, Path] = {}
    written["summary"] = write_summary_json(out / "summary.json", summary)
    written["cells_parquet"] = write_cells_parquet(out / "cells.parquet", cells)
    if csv:
        written["cells_csv"] = write_cells_csv(out / "cells.csv", cells)
    if geojson:
        if mpp is None:
            raise ValueError("write_slide_outputs: mpp is needed for cells.geojson (not in summary either)")
        written["cells_geojson"] = write_cells_geojson(
            out / "cells.geojson", cells, mpp, n_thresholds=_n_thresholds(summary), workers=workers,
            seed=_geojson_seed(params_hash, source),
        )
    if report:
        from . import report as _report

        imgs = dict(overlay_images or {})
        written["report"] = _report.write_slide_report(
            out / "report.html",
            summary,
            cells,
            thumbnail=imgs.get("thumbnail"),
            tissue_mask=imgs.get("tissue_mask"),
            fields=imgs.get("fields"),
            thumbnail_downsample=imgs.get("thumbnail_downsample"),
            hotspot_grid=imgs.get("hotspot_grid"),
        )
    try:
        from . import __version__ as version
    except ImportError:  # pragma: no cover
        version = None
    info = {
        "params_hash": params_hash,
        "files": sorted(p.name for p in written.values()),
        "software_version": version,
        "completed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if source is not None:
        info["source"] = dict(source)
    _write_marker(out, info)
    written["complete"] = marker
    claim = _read_claim(out)
    if claim is not None and (source is None or same_source(claim, source)):  # the marker names the slide now
        with contextlib.suppress(FileNotFoundError):
            (out / SOURCE_CLAIM).unlink()
    return written


def _geojson_seed(params_hash, source) -> int | None:
    """The seed of a slide's GeoJSON feature ids: the same slide file scored with the same parameters gets
    the same ids (reproducible files), another slide or other parameters others; None (random) when
    neither is known."""
    if params_hash is None and source is None:
        return None
    key = json.dumps([params_hash, None if source is None else list(source_key(source))])
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)


#: Chunks :func:`file_sample` reads, and their size in bytes.
SAMPLE_CHUNKS, SAMPLE_CHUNK_BYTES = 16, 65536


def file_sample(path) -> str:
    """A digest of a file's first and last bytes and of chunks spread between them (about 1 MiB read).

    Two files of one name and size (uncompressed TIFFs of one shape always have it) differ in it unless
    their bytes agree wherever it looks; reading the whole of a multi-GB slide on every rerun would not pay.
    """
    st = Path(path).stat()
    return _file_sample(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@functools.lru_cache(maxsize=4096)
def _file_sample(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """:func:`file_sample` of one version of a file (a batch asks several times per slide)."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_CHUNK_BYTES) / (SAMPLE_CHUNKS - 1)
            for k in range(SAMPLE_CHUNKS):
                f.seek(int(k * step))
                h.update(f.read(SAMPLE_CHUNK_BYTES))
    return h.hexdigest()[:32]


#: What identifies a slide file (:func:`slide_source`); ``path`` only says where it was.
SOURCE_KEYS = ("file", "bytes", "sample")


def slide_source(path) -> dict:
    """What identifies a slide file for resuming: its name, size in bytes and :func:`file_sample` (and
    where it was).

    Resuming compares these (:func:`same_source`), not the folder (a moved cohort still resumes) nor the
    time stamp (a copy still resumes). ``path`` tells a file replaced in place from another slide of that
    name (:func:`same_place`).
    """
    path = Path(path)
    return {"file": path.name, "bytes": path.stat().st_size, "sample": file_sample(path),
            "path": str(path.resolve())}


#: The file in a slide's output folder naming the slide file it belongs to (:func:`claim_folder`).
SOURCE_CLAIM = ".ihcscore-source.json"


def _read_json_object(path) -> dict | None:
    """The JSON object in a file this module wrote (a marker, a claim), or None (missing, unreadable)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_claim(out_dir) -> dict | None:
    return _read_json_object(Path(out_dir) / SOURCE_CLAIM)


def _claimant(out_dir) -> dict | None:
    """``{"pid", "host", "run"}`` of the run whose claim ``out_dir`` holds, or None (no claim)."""
    claim = _read_claim(out_dir)
    if claim is None:
        return None
    by = claim.get("claimed_by")
    return by if isinstance(by, dict) else {}


def _this_process(run=None) -> dict:
    import socket

    return {"pid": os.getpid(), "host": socket.gethostname(), "run": run}


def _claim_is_live(by: dict | None) -> bool:
    """Whether a claim's process may still run: alive on this machine, or on another (it cannot be asked)."""
    if by is None:
        return False
    if by.get("host") == _this_process()["host"] and isinstance(by.get("pid"), int):
        return process_alive(by["pid"])
    return True


def claim_folder(out_dir, source: Mapping, run: str | None = None) -> bool:
    """Mark ``out_dir`` as the outputs of the slide file ``source`` while run ``run`` (a token of one
    :func:`~ihcscore.batch.score_batch` call) of this process scores it, so another run choosing folders
    (:func:`recorded_source`) leaves it to this slide; False (nothing written) when another live run holds the
    claim. The marker of :func:`write_slide_outputs` replaces the claim, :func:`release_folder` drops it (a
    slide resumed, failed, or not reached), and a claim whose process died on this machine (a killed run)
    counts for nothing; one left by a run on another machine that died is deleted by hand (the file
    ``.ihcscore-source.json``) or replaced when its slide is scored again."""
    out = Path(out_dir)
    by = _claimant(out)
    if by is not None and by != _this_process(run) and _claim_is_live(by):
        return False
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / SOURCE_CLAIM, "w") as f:
        f.write(_dumps({**dict(source), "claimed_by": _this_process(run)}))
    return True


def release_folder(out_dir, run: str | None = None) -> None:
    """Drop the claim run ``run`` of this process made (:func:`claim_folder`; never another run's), and the
    folder when that leaves it empty: the name is free again, e.g. for the file re-exported in another format."""
    out = Path(out_dir)
    if _claimant(out) == _this_process(run):
        with contextlib.suppress(FileNotFoundError):
            (out / SOURCE_CLAIM).unlink()
    with contextlib.suppress(OSError):
        out.rmdir()  # only when empty


def record_source_path(out_dir, source: Mapping) -> None:
    """Note in a finished folder's marker where its slide file now is (it was resumed from another path, the
    cohort moved): a later re-export at the new path is then rescored in this folder."""
    out = Path(out_dir)
    info = _marker(out)
    if info is None or not isinstance(info.get("source"), dict) or info["source"].get("path") == source.get("path"):
        return
    info["source"] = {**info["source"], "path": source.get("path")}
    _write_marker(out, info)


def _marker(out_dir) -> dict | None:
    return _read_json_object(Path(out_dir) / COMPLETE_MARKER)


def _write_marker(out_dir, info: Mapping) -> None:
    with atomic_open(Path(out_dir) / COMPLETE_MARKER, "w") as f:
        f.write(_dumps(info))
        f.write("\n")


def recorded_source(out_dir) -> dict | None:
    """The slide file whose finished outputs ``out_dir`` holds (:func:`slide_source`), else the one that
    claimed it (:func:`claim_folder`: being scored, or failed), or None (a free folder).

    Outputs written before markers named their slide give ``{"file": ...}`` from summary.json's ``path``.
    """
    info = _marker(out_dir)
    if info is not None:
        return _source_in(out_dir, info)
    claim = _read_claim(out_dir)
    if claim is None:
        return None
    if not _claim_is_live(claim.pop("claimed_by", None) or {}):
        return None  # left by a run that was killed
    return claim


def _source_in(out_dir, info: dict) -> dict | None:
    """:func:`recorded_source` from the folder's already-read marker ``info``."""
    if isinstance(info.get("source"), dict):
        return dict(info["source"])
    try:
        path = json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8")).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    return {"file": Path(path).name} if isinstance(path, str) else None


def same_source(recorded: Mapping | None, source: Mapping) -> bool:
    """Whether :func:`recorded_source` names the file of ``source``: same name, size and sample of its bytes
    (of what old outputs recorded: name and size, or the name alone)."""
    if recorded is None:
        return False
    keys = [k for k in SOURCE_KEYS if k in recorded]
    return "file" in keys and all(recorded.get(k) == source.get(k) for k in keys)


def source_key(source: Mapping) -> tuple:
    """What :func:`same_source` compares of a :func:`slide_source`, as a key (old records lack some)."""
    return tuple(source.get(k) for k in SOURCE_KEYS)


def same_place(recorded: Mapping | None, source: Mapping) -> bool:
    """Whether the recorded outputs came from the path ``source`` is at (the slide file may have been
    replaced since: its outputs are then rescored in the same folder, not beside it)."""
    return recorded is not None and recorded.get("path") is not None and recorded.get("path") == source.get("path")


def is_complete(out_dir, params_hash: str | None, source: Mapping | None = None, required=()) -> bool:
    """True when ``out_dir`` holds complete outputs written with ``params_hash`` (of ``source``).

    False when the ``_COMPLETE`` marker is missing or unreadable, was written
    with another hash, or a file it lists is missing, or a file in ``required`` (what this run
    asks for, e.g. ``cells.csv`` with ``--csv``) is not among them; with ``source``
    (:func:`slide_source`), also when the outputs are of another slide file.
    """
    out = Path(out_dir)
    info = _marker(out)
    if info is None or info.get("params_hash") != params_hash:
        return False
    files = info.get("files", [])
    if not all((out / name).is_file() for name in [*files, *required]) or not set(required) <= set(files):
        return False
    return source is None or same_source(_source_in(out, info), source)


# --------------------------------------------------------------------------- #
# Cohort-level CSVs
# --------------------------------------------------------------------------- #
def summary_row(
    summary: Mapping | None,
    status: str = "ok",
    runtime_s: float | None = None,
    error: str | None = None,
    slide: str | None = None,
) -> dict:
    """One ``summary.csv`` row (keys :data:`SUMMARY_CSV_COLUMNS`).

    Parameters
    ----------
    summary : dict or None
        summary.json content; ``None`` for a failed slide.
    status : str
        ``"ok"``, ``"failed"``, ``"skipped"``, ...
    runtime_s : float, optional
        Default ``summary["runtime_s"]``.
    error : str, optional
        Error message (failed slides).
    slide : str, optional
        Slide stem; default ``summary["slide"]``.

    Returns
    -------
    row : dict
        Missing numbers are ``None``; ``warnings`` joins the summary's warnings
        with ``"; "``.
    """
    summary = summary or {}
    row = {k: None for k in SUMMARY_CSV_COLUMNS}
    row["slide"] = slide if slide is not None else summary.get("slide")
    row["status"] = status
    row["n_cells"] = summary.get("n_cells")
    for group in ("tumour", "all"):
        g = summary.get(group) or {}
        for k in _SCORE_KEYS:
            row[f"{group}_{k}"] = g.get(k)
        for comp, counts in (g.get("by_compartment") or {}).items():
            row[f"{group}_h_score_{comp}"] = (counts or {}).get("h_score")
    row["runtime_s"] = runtime_s if runtime_s is not None else summary.get("runtime_s")
    row["error"] = error
    row["preset"] = summary.get("preset")
    row["software_version"] = summary.get("software_version")
    row["scored_cells"] = summary.get("scored_cells")
    w = summary.get("warnings")
    if w:
        row["warnings"] = "; ".join(str(x) for x in w) if not isinstance(w, str) else w
    return to_jsonable(row)


def _csv_value(v):
    v = to_jsonable(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return v


def _write_rows(path, rows: Iterable[Mapping], columns: Sequence[str]):
    rows = list(rows)
    cols = list(columns)
    extra = []
    for r in rows:
        for k in r:
            if k not in cols and k not in extra:
                extra.append(k)
    cols += extra
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_value(r.get(c)) for c in cols])
    with atomic_open(path, "w", newline="") as f:
        f.write(buf.getvalue())
    return Path(path)


def write_summary_csv(path, rows: Iterable[Mapping]):
    """Write ``summary.csv``: :data:`SUMMARY_CSV_COLUMNS` in order (keys not in
    the contract are appended after them), one row per slide, atomically.

    Returns
    -------
    path : pathlib.Path
    """
    return _write_rows(path, rows, SUMMARY_CSV_COLUMNS)


def read_csv_rows(path) -> list[dict]:
    """The rows of a table this module wrote (``summary.csv``, ``failures.csv``), empty cells as None;
    ``[]`` when the file does not exist.

    A spreadsheet's re-save may have added a byte-order mark (read as UTF-8 all the same).

    Raises
    ------
    ValueError
        The file is not UTF-8 text (saved in another encoding): its rows cannot be merged.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [{k: (None if v == "" else v) for k, v in r.items()} for r in csv.DictReader(f)]
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}; re-saved in another encoding?): "
                         "save it as UTF-8 CSV or move it aside") from None


def _merged_rows(path, rows: list, slides: set) -> list:
    """The rows of the table at ``path`` whose ``slide`` is not in ``slides``, then ``rows``."""
    return [r for r in read_csv_rows(path) if r.get("slide") not in slides] + rows


@contextlib.contextmanager
def folder_lock(out_dir):
    """Hold an exclusive lock on ``out_dir``'s tables (``.ihcscore.lock``; POSIX ``flock``, elsewhere none).

    Several runs may write into one folder (a job per slide on a cluster): each reads, merges and
    rewrites the tables under the lock, so none drops another's rows.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(Path(out_dir) / ".ihcscore.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_folder_tables(out_dir, rows: Iterable[Mapping], failures: Iterable[Mapping] = (), index: bool = False,
                         dropped: Iterable[str] = (), paths: Mapping[str, str] | None = None):
    """Merge slides' rows into ``out_dir/summary.csv`` and their failures into ``failures.csv``.

    A row replaces the row of the same ``slide``; rows of other slides (earlier runs, other jobs) are kept,
    in their order, before the new ones. A slide named in ``rows`` keeps only the failures given here;
    a slide in ``dropped`` (being scored again) loses its rows. ``paths`` (slide name -> file) of ``rows``:
    an earlier failure of one of these files under another name (the batch around it named it otherwise)
    is dropped with its row, so a file has one row. Both files (and ``index.html``,
    :func:`ihcscore.report.write_cohort_index`, with ``index`` or when the folder has one: it links the
    reports that exist) are rewritten atomically under :func:`folder_lock`.

    Returns
    -------
    rows : list of dict
        The whole ``summary.csv`` as written.
    """
    out = Path(out_dir)
    rows, failures = [dict(r) for r in rows], [dict(f) for f in failures]
    names = {str(r.get("slide")) for r in rows} | {str(n) for n in dropped}
    with folder_lock(out):
        if paths:
            mine = {}
            for name, p in paths.items():
                mine[str(p)] = mine[os.path.abspath(p)] = str(name)
            for f in read_csv_rows(out / "failures.csv"):
                owner = mine.get(str(f.get("path"))) or mine.get(os.path.abspath(str(f.get("path"))))
                if owner is not None and owner != f.get("slide"):
                    names.add(str(f.get("slide")))
        merged = _merged_rows(out / "summary.csv", rows, names)
        write_summary_csv(out / "summary.csv", merged)
        write_failures(out, _merged_rows(out / "failures.csv", failures, names))
        if index or (out / "index.html").exists():
            from .report import report_href, write_cohort_index

            links = {r.get("slide"): report_href(r.get("slide")) for r in merged
                     if str(r.get("status")) == "ok" and (out / str(r.get("slide")) / "report.html").is_file()}
            write_cohort_index(out / "index.html", merged, links)
    return merged


def append_summary_row(out_dir, row: Mapping):
    """Add or replace (same ``slide``) one row of ``out_dir/summary.csv``, under :func:`folder_lock`
    (:func:`update_folder_tables` does this for ``failures.csv`` too). Returns the path.
    """
    path = Path(out_dir) / "summary.csv"
    with folder_lock(out_dir):
        return write_summary_csv(path, _merged_rows(path, [dict(row)], {str(row.get("slide"))}))


def write_failures_csv(path, failures: Iterable):
    """Write ``failures.csv`` with columns ``slide``, ``path``, ``error``.

    Parameters
    ----------
    failures : iterable of dict or (slide, path, error) tuples
        The header is written even when there are none.

    Returns
    -------
    path : pathlib.Path
    """
    rows = []
    for f in failures:
        if isinstance(f, Mapping):
            rows.append({k: f.get(k) for k in FAILURES_CSV_COLUMNS})
        else:
            slide, p, err = f
            rows.append({"slide": slide, "path": os.fspath(p) if p is not None else None, "error": err})
    for r in rows:
        if r["error"] is not None:
            r["error"] = " ".join(str(r["error"]).split())  # one line
        if r["path"] is not None:
            r["path"] = os.fspath(r["path"])
    return _write_rows(path, rows, FAILURES_CSV_COLUMNS)


def write_failures(out_dir, failures: Iterable):
    """Write ``out_dir/failures.csv`` (see :func:`write_failures_csv`)."""
    return write_failures_csv(Path(out_dir) / "failures.csv", failures)
