"""Small pure helpers for the widget: geometry, colours, rows of the results table.

No Qt and no napari imports here; no detection or scoring either: bins and
scores come from :mod:`ihcscore.scoring`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ihcscore.export import BIN_COLORS, BIN_NAMES, BIN_NAMES_SINGLE
from ihcscore.scoring import COMPARTMENTS, ScoringScheme, assign_bins, summarize

__all__ = [
    "UNSCORED_RGBA", "bin_rgba", "label_color_dict", "Region", "RegionCells", "ScoredCells",
    "bbox_from_points", "ellipse_polygon", "shape_area", "first_copies", "visible_corners", "points_in_polygons",
    "placement", "summary_rows", "SCORE_COLUMNS", "nearest_cells", "format_value",
]

#: RGBA (0-1) of unscored cells (NaN measurement) and of excluded cells.
UNSCORED_RGBA = (0.5, 0.5, 0.5, 1.0)
EXCLUDED_RGBA = (0.0, 0.0, 0.0, 0.0)


def bin_rgba(bins, n_thresholds: int = 3, alpha: float = 1.0) -> np.ndarray:
    """QuPath intensity-class colours, (N, 4) floats in 0-1.

    Negative blue, 1+ yellow, 2+ orange, 3+ red (``Positive`` red with a
    single threshold); unscored (``-1``) grey.
    """
    names = BIN_NAMES_SINGLE if n_thresholds == 1 else BIN_NAMES
    lut = {b: tuple(c / 255 for c in BIN_COLORS[n]) + (alpha,) for b, n in names.items()}
    lut[-1] = UNSCORED_RGBA[:3] + (alpha,)
    b = np.asarray(bins).astype(int).ravel()
    out = np.empty((b.size, 4), dtype=np.float32)
    for k, c in lut.items():
        out[b == k] = c
    return out


def label_color_dict(labels, bins, n_thresholds: int = 3, shown=None) -> dict:
    """``{label: RGBA}`` for a ``DirectLabelColormap``; hidden and unlisted labels are transparent."""
    labels = np.asarray(labels).astype(int).ravel()
    colors = bin_rgba(bins, n_thresholds)
    if shown is not None:
        colors[~np.asarray(shown, bool)] = EXCLUDED_RGBA
    d = {None: np.zeros(4, np.float32), 0: np.zeros(4, np.float32)}
    d.update({int(lab): col for lab, col in zip(labels, colors)})
    return d


@dataclass
class Region:
    """A level-0 rectangle to analyse, with the annotation it came from."""

    name: str
    x: int
    y: int
    w: int
    h: int
    polygon: np.ndarray | None = None  # (K, 2) level-0 (x, y) when cells must be clipped to it

    @property
    def origin(self) -> tuple[int, int]:
        return (self.x, self.y)


@dataclass
class RegionCells:
    """What one analysed region left for display: its label images and placement.

    ``origin`` is the level-0 position of the label images' first pixel (they cover the region
    plus the context it was segmented with).
    """

    region: Region
    nuclei: np.ndarray | None
    cells: np.ndarray | None
    downsample: float
    pixel_size_um: float
    origin: tuple | None = None

    def __post_init__(self):
        if self.origin is None:
            self.origin = self.region.origin


@dataclass
class ScoredCells:
    """The widget's result state: the cell table plus what re-scoring needs.

    ``cells`` holds the engine's table plus ``region`` (index into
    ``regions``); ``auto_class`` the engine's classes (before hand edits);
    ``excluded`` cells are left out of every score; ``duplicate`` cells were
    found again by a later, overlapping region: they count in that region's
    scores but once in the union's and in exports.
    """

    cells: pd.DataFrame
    regions: list = field(default_factory=list)  # RegionCells, or Region for whole-slide runs
    mpp: float = 1.0
    stains: object = None
    preset: object = None
    kind: str = "regions"  # "regions" | "slide"
    slide_summary: dict | None = None
    auto_class: np.ndarray | None = None
    excluded: np.ndarray | None = None
    first: np.ndarray | None = None  # row of each cell's first copy (itself unless found by an earlier region)
    warnings: list = field(default_factory=list)

    def __post_init__(self):
        n = len(self.cells)
        if self.auto_class is None:
            self.auto_class = self.cells["class"].to_numpy(dtype=object).copy() if n else np.array([], object)
        if self.excluded is None:
            self.excluded = np.zeros(n, bool)
        if self.first is None:
            self.first = np.arange(n)

    @property
    def duplicate(self) -> np.ndarray:
        """Rows that repeat a cell an earlier, overlapping region found."""
        return self.first != np.arange(len(self.first))

    @property
    def unique_rows(self) -> np.ndarray:
        """Row indices of the first copy of every cell."""
        return np.flatnonzero(~self.duplicate)

    @property
    def shown(self) -> np.ndarray:
        """Cells that count in the union of the regions: not excluded, each cell once."""
        return ~self.excluded & ~self.duplicate

    @property
    def included(self) -> pd.DataFrame:
        return self.cells[self.shown]

    def rescore(self, scheme: ScoringScheme) -> dict:
        """Re-bin every cell with ``scheme`` and summarise (engine functions only; no re-detection).

        Returns
        -------
        dict
            ``{"all regions": summary, <region name>: summary, ...}``; the
            first entry is :func:`ihcscore.scoring.summarize` of the included
            cells.
        """
        if len(self.cells):
            self.cells["bin"] = assign_bins(self.cells[scheme.measurement].to_numpy(dtype=np.float64),
                                            scheme.thresholds)
        out = {"all regions": summarize(self.included, scheme)}
        if self.kind == "regions" and len(self.regions) > 1:
            inc = self.cells[~self.excluded]
            for i, rc in enumerate(self.regions):
                out[rc.region.name] = summarize(inc[inc["region"].to_numpy() == i], scheme)
        return out


def bbox_from_points(xy: np.ndarray, dimensions) -> tuple[int, int, int, int]:
    """Level-0 pixels the extent of ``xy`` reaches into, clipped to the slide: a region holding every cell
    whose centroid the shape may hold (its polygon then decides, as ``--tissue ANNOTATIONS.geojson`` does).

    Parameters
    ----------
    xy : (K, 2) array
        Vertices in level-0 pixel coordinates (x, y); pixel ``i`` spans
        ``[i, i + 1)`` (the engine's convention, QuPath's).
    dimensions : (W, H)

    Returns
    -------
    (x, y, w, h) ints; ``w`` or ``h`` is 0 for an empty intersection.
    """
    xy = np.asarray(xy, dtype=np.float64)
    # a vertex rounding's width past a pixel edge does not reach into the next pixel (the widget puts shape
    # vertices a few float32 steps off an edge back on it: _shape_level0)
    lo = np.floor(xy.min(axis=0) + 1e-6).astype(int)
    hi = np.ceil(xy.max(axis=0) - 1e-6).astype(int)
    W, H = dimensions
    x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
    x1, y1 = min(int(hi[0]), int(W)), min(int(hi[1]), int(H))
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def ellipse_polygon(corners: np.ndarray, n_vertices: int = 128) -> np.ndarray:
    """The ellipse inscribed in a (possibly rotated) box, as a polygon.

    napari stores an ellipse as the 4 corners of its bounding box, in order around it.

    Parameters
    ----------
    corners : (4, 2) array
    n_vertices : int

    Returns
    -------
    (n_vertices, 2) array, in the corners' coordinates.
    """
    c = np.asarray(corners, dtype=np.float64)
    centre = c.mean(axis=0)
    u = (c[1] + c[2]) / 2 - centre  # half-axis towards the side between corners 1 and 2
    v = (c[2] + c[3]) / 2 - centre
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)[:, None]
    return centre + np.cos(t) * u + np.sin(t) * v


def first_copies(xy: np.ndarray, group: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """For every row, the row of the same point (x, y within ``tol``) in the earliest group: itself, or an
    earlier group's copy.

    Overlapping regions find the cells they share at the same centroids (the engine reads each region
    on the slide's grid with its context), so a cell in two regions is one cell.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    group = np.asarray(group)
    first = np.arange(len(xy))
    if not len(xy):
        return first
    from scipy.spatial import cKDTree

    for g in np.unique(group)[1:]:
        earlier = np.flatnonzero((group < g) & (first == np.arange(len(xy))))
        this = np.flatnonzero(group == g)
        if len(earlier) and len(this):
            d, j = cKDTree(xy[earlier]).query(xy[this], distance_upper_bound=tol)
            hit = np.isfinite(d)
            first[this[hit]] = earlier[j[hit]]
    return first


def visible_corners(center_world, zoom: float, canvas_hw, world_to_level0) -> np.ndarray:
    """Level-0 (x, y) of the screen's four corners, in order around it.

    Parameters
    ----------
    center_world : (y, x)
        Camera centre in world units (µm).
    zoom : float
        Screen pixels per world unit.
    canvas_hw : (h, w)
        Canvas size in screen pixels.
    world_to_level0 : callable((y, x)) -> (y, x)
        World to level-0 pixel coordinates.
    """
    cy, cx = float(center_world[-2]), float(center_world[-1])
    hh, hw = canvas_hw[0] / (2.0 * zoom), canvas_hw[1] / (2.0 * zoom)
    corners = [world_to_level0((cy + dy, cx + dx)) for dy, dx in ((-hh, -hw), (-hh, hw), (hh, hw), (hh, -hw))]
    return np.array(corners, dtype=np.float64)[:, ::-1]


def shape_area(kind: str, xy: np.ndarray):
    """The polygon (K, 2) a napari shape of type ``kind`` covers, or None for a line or path (no area).

    napari keeps an ellipse as the corners of its box: it becomes the inscribed ellipse.
    """
    if kind in ("line", "path"):
        return None
    return ellipse_polygon(xy) if kind == "ellipse" else np.asarray(xy, dtype=np.float64)


def points_in_polygons(x, y, polygons) -> np.ndarray:
    """Boolean mask of points inside any polygon ((K, 2) arrays of (x, y), same units as x, y)."""
    from matplotlib.path import Path as MplPath

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = np.zeros(x.shape, bool)
    if not len(x):
        return inside
    pts = np.column_stack([x, y])
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        if poly.shape[0] >= 3:
            inside |= MplPath(poly).contains_points(pts)
    return inside


def placement(origin_px, downsample: float, image_scale, image_translate=(0.0, 0.0)):
    """``(translate, scale)`` (y, x) in world units of a detection-resolution label image.

    Detection pixel ``i`` covers level-0 pixels ``[i*ds, (i+1)*ds)`` from
    ``origin_px`` (the engine's grid), so its centre is napari data coordinate
    ``origin + (i + 0.5) * ds - 0.5`` (napari centres level-0 pixel ``k`` on ``k``).
    """
    sy, sx = float(image_scale[-2]), float(image_scale[-1])
    ty, tx = float(image_translate[-2]), float(image_translate[-1])
    off = 0.5 * downsample - 0.5
    translate = (ty + (origin_px[1] + off) * sy, tx + (origin_px[0] + off) * sx)
    scale = (downsample * sy, downsample * sx)
    return translate, scale


#: Columns of the results table: (header, summary key).
SCORE_COLUMNS = (("n", "n"), ("H-score", "h_score"), ("% positive", "percent_positive"),
                 ("Allred", "allred"), ("IRS", "irs"), ("neg", "n_0"), ("1+", "n_1"), ("2+", "n_2"),
                 ("3+", "n_3"))


def summary_rows(summaries: dict, scheme: ScoringScheme) -> list[tuple[str, str, str, dict]]:
    """Rows ``(scope, cells, compartment, counts)`` of the results table.

    For the union of all regions: tumour and all cells, every compartment
    (the scored one first). For each region (when there are several): tumour
    and all cells, scored compartment.
    """
    rows = []
    order = [scheme.compartment] + [c for c in COMPARTMENTS if c != scheme.compartment]
    for scope, summary in summaries.items():
        for group in ("tumour", "all"):
            g = summary[group]
            comps = order if scope == "all regions" else [scheme.compartment]
            for comp in comps:
                counts = g["by_compartment"].get(comp)
                if counts is None:
                    continue
                name = comp + (" *" if comp == scheme.compartment else "")
                rows.append((scope, group, name, counts))
    return rows


def format_value(v) -> str:
    """Text for a table cell: integers as is, floats with 1 decimal, None/NaN as an en dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.1f}"


def nearest_cells(cells_yx: np.ndarray, points_yx: np.ndarray, max_distance: float) -> np.ndarray:
    """Index of the nearest cell for each point (-1 when none within ``max_distance``)."""
    points_yx = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)
    if not len(points_yx) or not len(cells_yx):
        return np.full(len(points_yx), -1, int)
    from scipy.spatial import cKDTree

    d, i = cKDTree(np.asarray(cells_yx, dtype=np.float64)).query(points_yx, distance_upper_bound=max_distance)
    i = np.where(np.isfinite(d), i, -1)
    return i.astype(int)
