"""Per-cell measurement table: geometry in µm, stain OD statistics per compartment.

Column names follow QuPath (``Nucleus: Area µm^2``, ``Cell: DAB OD mean``, ...),
so tables and GeoJSON exports read the same in both tools. All statistics are
computed for every cell at once (label sort + ``reduceat``): no per-cell Python
loop on the hot path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .cells import Segmentation

try:  # one-pass compiled label statistics (same numbers as the sort + reduceat path below)
    from . import kernels as _k
except ImportError:  # pragma: no cover - numba missing
    _k = None

__all__ = ["COMPARTMENT_PREFIX", "STAINS", "measure_cells", "label_statistics", "label_statistics_many",
           "label_polygons", "label_outlines"]

COMPARTMENT_PREFIX = {"nucleus": "Nucleus", "cytoplasm": "Cytoplasm", "membrane": "Membrane", "cell": "Cell"}
#: Deconvolved channel index -> QuPath stain name.
STAINS = {0: "Hematoxylin", 1: "DAB"}


def label_statistics(labels: np.ndarray, images: dict[str, np.ndarray], n_labels: int) -> dict[str, np.ndarray]:
    """Count, mean, standard deviation, max and min of each image inside labels ``1..n_labels``.

    The standard deviation is the sample one (divided by ``n - 1``), as QuPath's measurements
    are; 0 for a single pixel.

    Returns a dict with ``count`` and ``"{name} {stat}"`` arrays of length
    ``n_labels`` (NaN for empty labels).
    """
    return label_statistics_many([labels], images, n_labels)[0]


def label_statistics_many(label_images, images: dict[str, np.ndarray], n_labels: int) -> list[dict]:
    """:func:`label_statistics` of several label images over the same images (one compiled pass)."""
    if _k is not None and all(lab.ndim == 2 for lab in label_images):
        out = []
        for counts, s, s2, mn, mx in _k.label_stats_many(label_images, list(images.values()), n_labels):
            st = {"count": counts}
            for i, name in enumerate(images):
                mean, std = _mean_and_std(s[i], s2[i], counts)
                st[f"{name} mean"] = mean
                st[f"{name} std dev"] = std
                st[f"{name} max"] = mx[i]
                st[f"{name} min"] = mn[i]
            out.append(st)
        return out
    return [_label_statistics_np(lab, images, n_labels) for lab in label_images]


def _mean_and_std(s, s2, counts):
    """Mean and sample standard deviation (``n - 1``; 0 for one value, NaN for none) from sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / counts
        var = np.maximum(s2 / counts - mean * mean, 0.0) * (counts / np.maximum(counts - 1, 1))
    return mean, np.sqrt(var)


def _label_statistics_np(labels, images, n_labels):
    """:func:`label_statistics` without numba: label sort + ``reduceat``."""
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n_labels + 1)[1:n_labels + 1]
    out = {"count": counts}
    inside = flat > 0
    order = np.argsort(flat[inside], kind="stable")
    sorted_labels = flat[inside][order]
    present = np.flatnonzero(counts)
    starts = np.searchsorted(sorted_labels, present + 1)
    for name, img in images.items():
        vals = img.ravel()[inside][order].astype(np.float64)
        s = np.bincount(sorted_labels, weights=vals, minlength=n_labels + 1)[1:]
        s2 = np.bincount(sorted_labels, weights=vals * vals, minlength=n_labels + 1)[1:]
        mean, std = _mean_and_std(s, s2, counts)
        mx = np.full(n_labels, np.nan)
        mn = np.full(n_labels, np.nan)
        if len(present):
            mx[present] = np.maximum.reduceat(vals, starts)
            mn[present] = np.minimum.reduceat(vals, starts)
        out[f"{name} mean"] = mean
        out[f"{name} std dev"] = std
        out[f"{name} max"] = mx
        out[f"{name} min"] = mn
    return out


def _shape_features(nuclei: np.ndarray, n: int, px_um: float, row_offset: int = 0) -> dict[str, np.ndarray]:
    """Centroid (px), area, perimeter, circularity and moment-ellipse axes of each nucleus.

    ``nuclei`` may be rows ``row_offset...`` of a larger image: the row sums are moved to
    that image's rows exactly (integer-valued sums, far below 2**53) before any division,
    so a nucleus gets the same values, bit for bit, as from the whole image.
    """
    if _k is not None and nuclei.ndim == 2:  # one compiled pass, same sums as the bincounts below
        count, raw, edges_k = _k.shape_sums(nuclei, n)
        cnt = count.astype(np.float64)
        if row_offset:
            d = float(row_offset)
            raw = raw.copy()
            raw[2] += 2 * d * raw[0] + cnt * d * d  # sum (r + d)^2, from the local sum of r
            raw[4] += d * raw[1]  # sum (r + d) c
            raw[0] += cnt * d
        cnt_safe = np.maximum(cnt, 1)
        m_r, m_c, m_rr, m_cc, m_rc = (raw[i] / cnt_safe for i in range(5))
    else:
        rows, cols = np.indices(nuclei.shape, dtype=np.float64)
        rows += row_offset
        flat = nuclei.ravel()
        cnt = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
        cnt_safe = np.maximum(cnt, 1)

        def moment(w):
            return np.bincount(flat, weights=w.ravel(), minlength=n + 1)[1:] / cnt_safe

        m_r, m_c, m_rr, m_cc, m_rc = (moment(w) for w in (rows, cols, rows * rows, cols * cols, rows * cols))
        edges_k = None

    cy, cx = m_r, m_c
    # Central second moments (+1/12: a pixel is a unit square, not a point).
    myy = m_rr - cy * cy + 1 / 12
    mxx = m_cc - cx * cx + 1 / 12
    mxy = m_rc - cx * cy
    common = np.sqrt(((mxx - myy) / 2) ** 2 + mxy ** 2)
    l1 = (mxx + myy) / 2 + common
    l2 = np.maximum((mxx + myy) / 2 - common, 0)
    major = 4 * np.sqrt(l1)
    minor = 4 * np.sqrt(l2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.sqrt(np.maximum(0.0, 1 - l2 / l1))
    # Perimeter: boundary edges between the nucleus and anything else, times pi/4
    # (Cauchy-Crofton correction for the staircase of a digitised curve).
    if edges_k is not None:
        edges = np.concatenate([[0.0], edges_k])
    else:
        edges = np.zeros(n + 1)
        padded = np.pad(nuclei, 1)
        for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
            diff = shifted != nuclei
            edges += np.bincount(nuclei[diff], minlength=n + 1)
    perimeter = edges[1:] * np.pi / 4 * px_um
    area = cnt * px_um * px_um
    with np.errstate(invalid="ignore", divide="ignore"):
        circ = np.clip(4 * np.pi * area / perimeter ** 2, 0, 1)
    return {
        "cy": cy, "cx": cx,
        "Nucleus: Perimeter µm": perimeter,
        "Nucleus: Circularity": circ,
        "Nucleus: Major axis µm": major * px_um,
        "Nucleus: Minor axis µm": minor * px_um,
        "Nucleus: Eccentricity": ecc,
    }


def measure_cells(
    segmentation: Segmentation,
    stain_od: np.ndarray,
    *,
    origin_px=(0.0, 0.0),
    downsample: float = 1.0,
    mpp0: float | None = None,
    threads: int = 1,
    grid_origin=None,
) -> pd.DataFrame:
    """Measure every cell of a segmentation.

    Parameters
    ----------
    segmentation : Segmentation
        Label images at the detection resolution.
    stain_od : (M, N, 3) float32
        Deconvolved hematoxylin, DAB, residual OD at the same resolution.
    origin_px : (x, y)
        Level-0 pixel position of the region's top-left corner.
    downsample : float
        Level-0 pixels per detection pixel.
    mpp0 : float, optional
        Level-0 µm per pixel; defaults to ``pixel_size_um / downsample``.
    threads : int
        Measure up to this many bands of rows at once. Each cell is measured
        whole, in the band where its first row lies, visiting its pixels in the
        same order as one band would: the table is identical for any value.
    grid_origin : (row, col), optional
        Place of the label images' first pixel on a slide's detection grid. Centroids are then
        mapped to level-0 pixels from their grid coordinates (:func:`grid_to_level0`; ``origin_px``
        unused), so a cell seen by two overlapping tiles gets the same coordinates in both, on the
        same side of any grid line, whatever the downsample.

    Returns
    -------
    pandas.DataFrame
        One row per cell (label order): ``label``, ``x_px``, ``y_px`` (nucleus
        centroid, level-0 px), ``x_um``, ``y_um``, shape features and
        ``"{Compartment}: {Hematoxylin|DAB} OD {mean|std dev|max|min}"``
        plus ``"{Compartment}: Area µm^2"``.
    """
    px = segmentation.pixel_size_um
    n = segmentation.n_cells
    if mpp0 is None:
        mpp0 = px / downsample
    images = [segmentation.compartment(c) for c in COMPARTMENT_PREFIX]
    n_bands = min(int(threads), segmentation.cells.shape[0] // MIN_BAND_ROWS) if _k is not None else 1
    if n_bands > 1 and n > 0:
        cols = _measure_in_bands(segmentation.nuclei, segmentation.cells, images, stain_od, n, px, n_bands)
    else:
        cols = _measure_rows(segmentation.nuclei, images, stain_od, n, px, 0)
    if grid_origin is not None:
        x_px = grid_to_level0(grid_origin[1] + cols.pop("cx"), downsample)
        y_px = grid_to_level0(grid_origin[0] + cols.pop("cy"), downsample)
    else:
        x_px = origin_px[0] + (cols.pop("cx") + 0.5) * downsample
        y_px = origin_px[1] + (cols.pop("cy") + 0.5) * downsample
    table = {"label": np.arange(1, n + 1, dtype=np.int64),
             "x_px": x_px, "y_px": y_px, "x_um": x_px * mpp0, "y_um": y_px * mpp0}
    table.update(cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["Nucleus/Cell area ratio"] = table["Nucleus: Area µm^2"] / table["Cell: Area µm^2"]
    return pd.DataFrame(table)


def grid_to_level0(g, downsample: float):
    """Level-0 coordinate of detection-grid coordinate ``g``.

    Grid coordinates put pixel centres at integers (scikit-image's convention); level-0 coordinates
    are QuPath's: pixel ``k`` spans ``[k, k + 1)``, so the slide's top-left corner is ``(0, 0)`` and
    grid pixel ``g`` (level-0 pixels ``[g * ds, (g + 1) * ds)``) has its centre at ``(g + 0.5) * ds``.

    Monotonic and computed one way everywhere: tile ownership compares centroids with grid lines
    mapped through it, so a cell exactly on a line belongs to one tile, never to none or two.
    """
    return (g + 0.5) * downsample


#: Bands of :func:`measure_cells` are at least this many rows tall.
MIN_BAND_ROWS = 256


def _measure_rows(nuclei, images, stain_od, n, px, row_offset) -> dict[str, np.ndarray]:
    """Centroid and measurement columns of labels ``1..n`` from (rows of) the label images."""
    shape = _shape_features(nuclei, n, px, row_offset)
    cols = {"cx": shape.pop("cx"), "cy": shape.pop("cy")}
    channels = {STAINS[c]: stain_od[..., c] for c in STAINS}
    all_stats = label_statistics_many(images, channels, n)
    for (comp, prefix), stats in zip(COMPARTMENT_PREFIX.items(), all_stats):
        cols[f"{prefix}: Area µm^2"] = stats.pop("count") * px * px
        if comp == "nucleus":
            cols.update(shape)
        for stain in STAINS.values():
            for stat in ("mean", "std dev", "max", "min"):
                cols[f"{prefix}: {stain} OD {stat}"] = stats[f"{stain} {stat}"]
    return cols


def _measure_in_bands(nuclei, cells, images, stain_od, n, px, n_bands) -> dict[str, np.ndarray]:
    """:func:`_measure_rows` in bands of rows, in threads; each label taken from the band holding its first row."""
    from concurrent.futures import ThreadPoolExecutor

    box = _k.label_boxes(cells, n)  # a cell holds its nucleus and compartments
    start, stop = box[:, 0], box[:, 1]
    edges = np.linspace(0, cells.shape[0], n_bands + 1).round().astype(int)
    band_of = np.searchsorted(edges, start, side="right") - 1
    band_of[start < 0] = 0  # absent labels: empty statistics, as from one band

    def band(i):
        owned = band_of == i
        r0 = int(edges[i])
        r1 = max(int(edges[i + 1]), int(stop[owned].max(initial=0)))
        rows = slice(r0, r1)
        return owned, _measure_rows(nuclei[rows], [im[rows] for im in images], stain_od[rows], n, px, r0)

    with ThreadPoolExecutor(max_workers=n_bands, thread_name_prefix="ihcscore-measure") as pool:
        parts = list(pool.map(band, range(n_bands)))
    cols = {name: np.empty(n, dtype=values.dtype) for name, values in parts[0][1].items()}
    for owned, part in parts:
        for name, values in part.items():
            cols[name][owned] = values[owned]
    return cols


def label_outlines(labels: np.ndarray, ids=None, *, origin_px=(0.0, 0.0), downsample: float = 1.0,
                   grid_origin=(0, 0), smooth: bool = False):
    """:func:`label_polygons`' rings, all in one array.

    Returns
    -------
    found : (K,) int64
        The labels outlined, in the order of ``ids``.
    offsets : (K + 1,) int64
        The ring of ``found[k]`` is ``coords[offsets[k]:offsets[k + 1]]``.
    coords : (M, 2) float64
        Level-0 ``(x, y)`` vertices.
    """
    from . import kernels

    found, offsets, c, origin = kernels.label_contours(labels, ids)
    xy = kernels.contour_points(c, offsets, origin, grid_origin, downsample, origin_px)
    if not smooth:
        kept, offsets, coords = kernels.simplify_rings(xy, offsets, 0.5 * downsample)
        return found[kept], offsets, coords
    # smoothed, then simplified with QuPath's tolerance for smoothed outlines (half the root of the downsample)
    smooth_offsets, smoothed = kernels.smooth_rings(xy, offsets, downsample)
    kept, s_offsets, s_coords = kernels.simplify_rings(smoothed, smooth_offsets, 0.5 * np.sqrt(downsample))
    if len(kept) == len(found):  # the usual case: no smoothed ring collapsed
        return found[kept], s_offsets, s_coords
    t_kept, t_offsets, t_coords = kernels.simplify_rings(xy, offsets, 0.5 * downsample)
    lost = np.setdiff1d(t_kept, kept)
    if not len(lost):
        return found[kept], s_offsets, s_coords
    # an object of a few pixels whose smoothed ring collapses keeps its traced ring
    rings = {int(k): s_coords[a:b] for k, a, b in zip(kept, s_offsets[:-1], s_offsets[1:])}
    for j in np.flatnonzero(np.isin(t_kept, lost)):
        rings[int(t_kept[j])] = t_coords[t_offsets[j]:t_offsets[j + 1]]
    order = sorted(rings)
    sizes = np.array([len(rings[k]) for k in order], np.int64)
    return found[order], np.concatenate([[0], np.cumsum(sizes)]), np.concatenate([rings[k] for k in order])


def label_polygons(labels: np.ndarray, ids=None, *, origin_px=(0.0, 0.0), downsample: float = 1.0,
                   grid_origin=(0, 0), smooth: bool = False) -> dict:
    """Outline of each labelled object as an (K, 2) array of level-0 ``(x, y)`` vertices.

    Contours are traced on the pixel-edge grid (marching squares at 0.5 on the
    object's mask: the longest ``skimage.measure.find_contours`` contour, computed for
    all objects in one compiled call, :func:`ihcscore.kernels.label_contours`) and
    simplified by 0.5 px (GEOS's Douglas-Peucker on a ring, as ``shapely.simplify(ring,
    0.5 * downsample, preserve_topology=False)``: :func:`ihcscore.kernels.simplify_rings`);
    rings are closed, objects whose ring collapses below 4 vertices are left out. A vertex
    at grid position ``g`` (``labels[0, 0]`` being ``grid_origin``, (row, col) ints) is at
    ``(g + 0.5) * downsample + origin_px``: with a tile's place on the slide's grid
    given as ``grid_origin`` (and ``origin_px`` zero), an outline does not depend on the
    tile that traced it, to the last bit. The rings are views of one array
    (:func:`label_outlines`).

    ``smooth``: smooth the traced rings, then simplify them by half the root of the downsample, as
    QuPath's "smooth boundaries" does (:func:`ihcscore.kernels.smooth_rings`): the outlines written
    for cells; an object whose smoothed ring collapses (a few pixels) keeps its traced ring.
    Measurements never use the outlines.
    """
    return _rings_by_label(*label_outlines(labels, ids, origin_px=origin_px, downsample=downsample,
                                          grid_origin=grid_origin, smooth=smooth))


def _rings_by_label(found, offsets, coords) -> dict:
    """``{label: ring}`` from :func:`label_outlines`' arrays (the rings are views of ``coords``)."""
    bounds = offsets.tolist()
    return dict(zip(found.tolist(), [coords[a:b] for a, b in zip(bounds[:-1], bounds[1:])]))
