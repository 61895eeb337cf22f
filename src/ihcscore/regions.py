"""Scores over parts of a slide: annotated regions and a hotspot grid.

CXCR4 expression is heterogeneous, so a slide-level H-score is reported
beside (a) the scores of each annotated region (QuPath GeoJSON annotations or
napari shapes, in level-0 pixels) and (b) an H-score map on a square grid (in
µm) with its top-k hotspots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import shapely

from .scoring import COMPARTMENTS, ScoringScheme, assign_bins, score_counts, summarize

__all__ = ["cells_in_geometry", "region_summaries", "score_grid", "top_hotspots"]


def cells_in_geometry(cells: pd.DataFrame, geometry) -> np.ndarray:
    """Boolean mask of cells whose nucleus centroid (level-0 px) lies in a shapely geometry."""
    if len(cells) == 0:
        return np.zeros(0, bool)
    return shapely.contains_xy(geometry, cells["x_px"].to_numpy(), cells["y_px"].to_numpy())


def region_summaries(cells: pd.DataFrame, regions, scheme: ScoringScheme, mpp: float, dimensions=None) -> list[dict]:
    """Scores per annotated region.

    Parameters
    ----------
    cells : DataFrame with ``x_px``, ``y_px``, ``class`` and the DAB measurements.
    regions : list of (name, shapely geometry in level-0 px)
    scheme : ScoringScheme
    mpp : float
        Level-0 µm per pixel (for the region area in mm²).
    dimensions : (width, height), optional
        The slide's level-0 size: a region's area counts only its part on the slide.

    Returns
    -------
    list of dict
        ``{"name", "area_mm2", "n_cells", "tumour": {...}, "all": {...}}`` per region,
        the groups as in :func:`ihcscore.scoring.summarize`.
    """
    # the columns summarize reads: a slide's whole table is not copied per region
    used = dict.fromkeys(["class", scheme.measurement, *(scheme.measurement_for(c) for c in COMPARTMENTS)])
    scored = cells[[c for c in used if c in cells.columns]]
    out = []
    slide = None if dimensions is None else shapely.box(0, 0, dimensions[0], dimensions[1])  # as annotations see it
    for i, (name, geom) in enumerate(regions):
        inside = cells_in_geometry(cells, geom)
        area = geom if slide is None else geom.intersection(slide)
        scores = summarize(scored[inside], scheme)
        out.append({
            "name": name or f"region {i + 1}",
            "area_mm2": float(area.area * mpp * mpp / 1e6),
            "n_cells": int(inside.sum()),
            "tumour": scores["tumour"],
            "all": scores["all"],
        })
    return out


def score_grid(cells: pd.DataFrame, scheme: ScoringScheme, *, grid_um: float = 500.0,
               min_cells: int = 50) -> pd.DataFrame:
    """H-score and percent positive of the scheme's cells in each square of a grid.

    Parameters
    ----------
    cells : DataFrame with ``x_um``, ``y_um``, ``class`` and the scheme's measurement.
    grid_um : float
        Side of a grid square in µm.
    min_cells : int
        Squares with fewer scored cells get NaN scores (too few to mean anything).

    Returns
    -------
    DataFrame
        One row per occupied square: ``x0_um``, ``y0_um`` (top-left corner), ``size_um``,
        ``n``, ``h_score``, ``percent_positive``; no rows (the same columns) for a table without
        cells, whatever its columns.
    """
    cols = ["x0_um", "y0_um", "size_um", "n", "h_score", "percent_positive"]
    if len(cells) == 0:  # no cells, whatever columns the table has (even none): nothing to grid
        return pd.DataFrame(columns=cols)
    sel = cells[[scheme.measurement, "x_um", "y_um"]]  # a slide's whole table is not copied below
    if scheme.cells != "all":
        sel = sel[cells["class"].astype(str).to_numpy() == "tumour"]
    if len(sel) == 0:
        return pd.DataFrame(columns=cols)
    bins = assign_bins(sel[scheme.measurement].to_numpy(dtype=np.float64), scheme.thresholds)
    gx = np.floor(sel["x_um"].to_numpy() / grid_um).astype(np.int64)
    gy = np.floor(sel["y_um"].to_numpy() / grid_um).astype(np.int64)
    rows = []
    frame = pd.DataFrame({"gx": gx, "gy": gy, "bin": bins})
    for (x, y), group in frame.groupby(["gx", "gy"], sort=True):
        counts = score_counts(group["bin"].to_numpy(), len(scheme.thresholds))
        enough = counts["n"] >= min_cells
        rows.append({
            "x0_um": float(x * grid_um), "y0_um": float(y * grid_um), "size_um": float(grid_um),
            "n": counts["n"],
            "h_score": counts["h_score"] if enough and counts["h_score"] is not None else np.nan,
            "percent_positive": counts["percent_positive"] if enough else np.nan,
        })
    return pd.DataFrame(rows, columns=cols)


def top_hotspots(grid: pd.DataFrame, k: int = 3, by: str = "h_score") -> list[dict]:
    """The ``k`` grid squares with the highest score (``h_score``, or ``percent_positive``
    with a single threshold); squares with too few cells are never hotspots."""
    if len(grid) == 0:
        return []
    key = by if grid[by].notna().any() else "percent_positive"
    best = grid.dropna(subset=[key]).sort_values([key, "n"], ascending=[False, False]).head(k)
    return [{k_: (int(v) if k_ == "n" else float(v)) for k_, v in row.items()} for row in best.to_dict("records")]
