"""From pixels to scored cells: one region, or a whole slide in tiles.

``analyze_region`` runs deconvolution, detection, measurement, classification
and binning on an in-memory RGB array. ``analyze_slide`` does the same over a
whole slide: it finds tissue on a low-resolution level, cuts the detection-
resolution image into tiles whose *cores* tile the plane, processes each tile
with a margin of context around it, and keeps a cell only in the tile whose
core holds its nucleus centroid, so every cell is counted exactly once and
results do not depend on the tile size or the number of workers.

Every tile is resampled from the same global grid (detection pixel ``i``
covers level-0 pixels ``[i*ds, (i+1)*ds)``), so a pixel gets the same value
whichever tile reads it.
"""

from __future__ import annotations

import math
import os
import queue
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from . import __version__

try:  # compiled kernels (identical results)
    from . import kernels as _k
except ImportError:  # pragma: no cover - numba missing
    _k = None
from .cells import DetectionParams, Segmentation, segment_cells
from .classify import classify_cells
from .measure import _rings_by_label, grid_to_level0, label_outlines, measure_cells
from .regions import region_summaries, score_grid, top_hotspots
from .runtime import default_threads, release_freed_memory, worker_pool
from .slide import _to_rgb_uint8
from .scoring import ScoringScheme, assign_bins, summarize
from .stains import (H_DAB_DEFAULT, StainVectors, estimate_background, estimate_stain_vectors,
                     rgb_to_od, stain_fit_report, unmix)
from .tile_tables import TILE_TABLES_PREFIX, TileTables, pack_tile, remove_stale_tile_tables

__all__ = ["RegionResult", "SlideResult", "analyze_region", "analyze_slide", "analyze_slide_region", "slide_stains",
           "resample_to_grid", "detection_pixel_size", "stain_warnings", "plan_tiles"]

#: Residual share of stained OD above which a slide does not look like H-DAB.
MAX_RESIDUAL_FRACTION = 0.25
#: Cosine between the estimated second stain and default DAB below which a slide does not look like DAB.
MIN_DAB_COSINE = 0.95
#: Green/blue OD ratio of the estimated second stain above which it looks like eosin (CMU-1 H&E: 1.7;
#: default DAB: 0.73; DAB estimates mixed with hematoxylin on sparse nuclear stains: ~1.1).
EOSIN_GREEN_OVER_BLUE = 1.4


@dataclass
class RegionResult:
    """Cells of one region, their segmentation and scores."""

    cells: pd.DataFrame
    summary: dict
    stains: StainVectors
    segmentation: Segmentation | None
    pixel_size_um: float
    downsample: float
    origin_px: tuple = (0.0, 0.0)


@dataclass
class SlideResult:
    """Everything ``ihcscore score`` writes for one slide."""

    cells: pd.DataFrame
    summary: dict
    stains: StainVectors
    tissue_mask: np.ndarray | None = None
    tissue_downsample: float = 1.0
    warnings: list = field(default_factory=list)
    hotspot_grid: pd.DataFrame | None = None


def detection_pixel_size(mpp: float, requested_um: float) -> float:
    """QuPath's rule: detect at the requested pixel size, never finer than the image."""
    return max(float(requested_um), float(mpp))


def resample_to_grid(src: np.ndarray, src_origin, scale: float, out_origin, out_shape) -> np.ndarray:
    """Resample an image onto a coarser grid with an exact, global mapping.

    Output pixel ``(r, c)`` (in global output coordinates ``out_origin + (r, c)``)
    covers source pixels ``[(r)*scale, (r+1)*scale)``; it is sampled bilinearly at
    its centre after a Gaussian anti-alias filter of sigma ``(scale - 1) / 2``.

    Parameters
    ----------
    src : (M, N, C) array
        Source pixels; ``src[0, 0]`` is global source pixel ``src_origin`` (y, x).
    src_origin : (y, x) int
    scale : float
        Source pixels per output pixel (>= 1).
    out_origin : (y, x) int
    out_shape : (h, w)

    Returns
    -------
    (h, w, C) float32
    """
    src = np.asarray(src)
    if _k is not None and src.dtype == np.uint8 and src.ndim == 3 and scale > 1.0 + 1e-9:
        return _k.resample_rgb(src, src_origin, scale, out_origin, out_shape)  # the same values, faster
    src = np.asarray(src, dtype=np.float32)
    if abs(scale - 1.0) < 1e-9:
        oy = out_origin[0] - src_origin[0]
        ox = out_origin[1] - src_origin[1]
        return src[oy:oy + out_shape[0], ox:ox + out_shape[1]].copy()
    sigma = max(0.0, (scale - 1.0) / 2.0)
    if sigma > 0:
        src = ndi.gaussian_filter(src, (sigma, sigma, 0), mode="nearest")
    out = np.empty((out_shape[0], out_shape[1], src.shape[2]), dtype=np.float32)
    offset = [(out_origin[0] + 0.5) * scale - 0.5 - src_origin[0],
              (out_origin[1] + 0.5) * scale - 0.5 - src_origin[1]]
    for c in range(src.shape[2]):
        ndi.affine_transform(src[..., c], [scale, scale], offset=offset, output_shape=out_shape,
                             output=out[..., c], order=1, mode="nearest")
    return out


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _stains_for(preset, stains: StainVectors | None, rgb: np.ndarray | None) -> StainVectors:
    if stains is not None:
        return stains
    if preset.stains.estimate and rgb is not None:
        return estimate_stain_vectors(rgb)
    return preset.stains.to_stain_vectors()


def _require_gpu() -> str:
    """The GPU's name; ``RuntimeError`` with a one-line reason without one (``ihcscore.gpu``)."""
    from . import gpu as _gpu

    _gpu.require()
    return _gpu.device_name()


def _modality_warnings(slide) -> list[str]:
    """Refuse a fluorescence slide (``SlideError``); warn that a grayscale one has no colour."""
    modality = getattr(slide, "modality", "brightfield")
    name = getattr(slide, "name", "region")
    if modality == "fluorescence":
        from .slide import SlideError

        raise SlideError(f"{getattr(slide, 'path', None) or name}: looks like a fluorescence image (dark "
                         "background), not brightfield: IHC scoring needs brightfield H-DAB")
    if modality == "grayscale":
        return [f"{name}: grayscale image (no colour): DAB cannot be told from hematoxylin"]
    return []


def _score_table(cells: pd.DataFrame, scheme: ScoringScheme, classifier=None) -> pd.DataFrame:
    """Add ``class`` (the morphology rule, or a trained :class:`~ihcscore.classify.CellClassifier`) and ``bin``."""
    cells["class"] = classifier.predict(cells) if classifier is not None else classify_cells(cells)
    cells["bin"] = assign_bins(cells[scheme.measurement].to_numpy(dtype=np.float64), scheme.thresholds)
    return cells


def _cells_from_rgb(rgb, stains, params: DetectionParams, origin_px, downsample, mpp0, polygons, threads=1,
                    keep=None, grid_origin=None, outline_dtype=np.float64, core=None, gpu=False, valid=None):
    """Deconvolve, segment and measure one detection-resolution tile.

    ``core``: the tile's core (rows, cols of ``rgb``) when the rest is context (see
    :func:`~ihcscore.cells.segment_cells`); the segmentation then covers a window around it.
    ``keep(cells) -> bool array`` selects the rows to return (and to outline) before the outlines.
    ``grid_origin``: the tile's (row, col) on the slide's detection grid, for tile-independent outlines.
    ``outline_dtype``: of the outlines' vertices (cast from :func:`~ihcscore.measure.label_polygons`' float64).
    ``gpu``: deconvolve and smooth on the GPU (:mod:`ihcscore.gpu`).
    ``valid``: the rows and columns of ``rgb`` that are image (see :func:`~ihcscore.cells.segment_cells`).
    """
    if gpu:
        from . import gpu as _gpu

        od, stain_od = _gpu.deconvolve(rgb, stains)
    else:
        od = rgb_to_od(rgb, stains.background)  # uint8: the compiled one-pass lookup
        stain_od = unmix(od, stains)
    seg = segment_cells(od, stain_od, params, threads=threads, core=core, gpu=gpu, valid=valid)
    oy, ox = seg.offset
    if oy or ox:
        h, w = seg.nuclei.shape
        stain_od = stain_od[oy:oy + h, ox:ox + w]
        origin_px = (origin_px[0] + ox * downsample, origin_px[1] + oy * downsample)
        if grid_origin is not None:
            grid_origin = (grid_origin[0] + oy, grid_origin[1] + ox)
    cells = measure_cells(seg, stain_od, origin_px=origin_px, downsample=downsample, mpp0=mpp0, threads=threads,
                          grid_origin=grid_origin)
    if keep is not None:
        cells = cells[keep(cells)].reset_index(drop=True)
    if polygons and len(cells):
        ids = cells["label"].to_numpy()
        where = dict(origin_px=origin_px, downsample=downsample) if grid_origin is None else \
            dict(downsample=downsample, grid_origin=grid_origin)
        labs = ids.tolist()

        def outlines(labels):
            found, offsets, coords = label_outlines(labels, ids, **where, smooth=True)  # QuPath's smoothed outlines
            rings = _rings_by_label(found, offsets, coords.astype(outline_dtype, copy=False))
            return [rings.get(i) for i in labs]

        nuc = outlines(seg.nuclei)
        cells["nucleus_polygon"] = nuc
        cells["cell_polygon"] = outlines(seg.cells) if params.cell_expansion_um > 0 else nuc
    return cells, seg


def analyze_region(
    rgb: np.ndarray,
    mpp: float,
    preset,
    *,
    stains: StainVectors | None = None,
    origin_px=(0.0, 0.0),
    polygons: bool = False,
    classifier=None,
    threads: int | None = None,
    gpu: bool = False,
) -> RegionResult:
    """Detect, measure, classify and score the cells of one RGB region.

    Parameters
    ----------
    rgb : (M, N, 3) or (M, N, 4) array
        The region at its native pixel size: uint8, or uint16 / float (0-1 or 0-255) / RGBA
        converted as :func:`ihcscore.slide.open_slide` converts such files.
    mpp : float
        Native pixel size of ``rgb`` in µm.
    preset : ihcscore.preset.Preset
        Detection, stain and scoring parameters.
    stains : StainVectors, optional
        Overrides the preset (and estimation).
    origin_px : (x, y)
        Position of ``rgb[0, 0]`` in level-0 pixels; cell coordinates are reported there.
    polygons : bool
        Also return nucleus and cell outlines (``nucleus_polygon``, ``cell_polygon``).
    classifier : ihcscore.classify.CellClassifier, optional
        Tumour / other classifier; default the morphology rule.
    threads : int, optional
        Bands of rows segmented in parallel (``ihcscore.cells.segment_in_bands``);
        default: the CPUs this process may use. Results are identical for any value.
    gpu : bool
        Colour deconvolution and the smoothing of nucleus detection on the GPU (``ihcscore.gpu``;
        ``RuntimeError`` without one). Stain OD within 1e-4 of the CPU's; a pixel at a threshold may
        then fall the other way, so a few cells can differ.

    Returns
    -------
    RegionResult
        ``cells`` has one row per cell with ``class`` and ``bin``; ``summary``
        the tumour/all scores per compartment.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB image (M, N, 3), got shape {rgb.shape}")
    if not (isinstance(mpp, (int, float, np.number)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive pixel size in µm/px, got {mpp!r}")
    mpp = float(mpp)
    # uint16 / float / RGBA pixels as the slide reader converts them (cast as is, they wrapped or truncated)
    rgb = rgb[..., :3] if rgb.dtype == np.uint8 else _to_rgb_uint8(rgb)
    if gpu:
        _require_gpu()
    stains = _stains_for(preset, stains, rgb)
    px = detection_pixel_size(mpp, preset.detection.pixel_size_um)
    params = replace(preset.detection, pixel_size_um=px)
    ds = px / mpp
    if ds > 1 + 1e-9:
        shape = (int(rgb.shape[0] / ds), int(rgb.shape[1] / ds))
        rgb = _to_uint8(resample_to_grid(rgb, (0, 0), ds, (0, 0), shape))
    threads = default_threads() if threads is None else max(1, int(threads))
    cells, seg = _cells_from_rgb(rgb, stains, params, origin_px, ds, mpp, polygons, threads, gpu=gpu)
    cells = _score_table(cells, preset.scoring, classifier)
    summary = summarize(cells, preset.scoring)
    return RegionResult(cells=cells, summary=summary, stains=stains, segmentation=seg,
                        pixel_size_um=px, downsample=ds, origin_px=tuple(origin_px))


def analyze_slide_region(
    slide,
    region,
    preset,
    *,
    polygon=None,
    stains: StainVectors | None = None,
    polygons: bool = False,
    classifier=None,
    threads: int | None = None,
    gpu: bool = False,
) -> RegionResult:
    """Detect, measure, classify and score the cells of one part of a slide, as :func:`analyze_slide` does.

    The part is read on the slide's detection grid with the tile context around it, so every cell in
    it, also at its edge, is the cell ``analyze_slide(slide, preset, tissue=ANNOTATIONS)`` finds for the
    same polygon: what a viewer's region of interest must agree with. (:func:`analyze_region` scores
    an array as it is, without the pixels around it: nuclei at its edge are cut.)

    Parameters
    ----------
    slide : ihcscore.slide.Slide or a Slide-like object
        ``mpp``, ``dimensions``, ``level_downsamples`` and ``read_region`` are used.
    region : (x, y, w, h)
        Level-0 pixels.
    preset : ihcscore.preset.Preset
    polygon : shapely geometry or (K, 2) array of level-0 (x, y), optional
        Cells count when their nucleus centroid lies inside it (``shapely.contains_xy``, as
        ``--tissue ANNOTATIONS.geojson`` counts them) and inside the rectangle (centroid in
        ``[x, x + w)`` and likewise in y, the pixels' extent; give the polygon's
        bounding box to score all of it), and on the slide's detection grid as its tiles are.
    stains, polygons, classifier, threads, gpu
        As for :func:`analyze_region`; with ``preset.stains.estimate`` and no ``stains`` the
        vectors are estimated from the region.

    Returns
    -------
    RegionResult
        ``segmentation`` covers the region plus the cell context, ``origin_px`` is the level-0
        position of its first pixel; ``summary["warnings"]`` says when the region does not look
        like brightfield H-DAB (as ``summary.json`` does for a slide).
    """
    import shapely

    x, y, w, h = (int(v) for v in region)
    if w < 1 or h < 1:
        raise ValueError(f"empty region {w}x{h} px")
    warnings = _modality_warnings(slide)
    name = getattr(slide, "name", "region")
    if gpu:
        _require_gpu()
    mpp0 = float(slide.mpp)
    px = detection_pixel_size(mpp0, preset.detection.pixel_size_um)
    ds = px / mpp0
    params = replace(preset.detection, pixel_size_um=px)
    w0, h0 = slide.dimensions
    rows, cols = int(h0 / ds), int(w0 / ds)
    # the grid pixels whose centroids (grid coordinate g, level-0 grid_to_level0(g)) can lie in the region
    cy0, cx0 = max(0, math.floor(y / ds) - 1), max(0, math.floor(x / ds) - 1)
    cy1, cx1 = min(rows, math.ceil((y + h) / ds) + 1), min(cols, math.ceil((x + w) / ds) + 1)
    if cy1 <= cy0 or cx1 <= cx0 or x + w <= 0 or y + h <= 0 or x >= w0 or y >= h0:
        raise ValueError(f"region {x},{y} {w}x{h} px lies outside the slide ({w0}x{h0} px)")
    pad = params.context_px()
    py0, px0 = cy0 - pad, cx0 - pad
    padded = (py0, px0, cy1 + pad, cx1 + pad)
    rgb = read_detection_tile(slide, padded, ds)
    core = (pad, pad, pad + cy1 - cy0, pad + cx1 - cx0)
    rgb_core = rgb[core[0]:core[2], core[1]:core[3]]
    stains = _stains_for(preset, stains, rgb_core)
    if polygon is not None and not isinstance(polygon, shapely.Geometry):
        polygon = shapely.Polygon(np.asarray(polygon, dtype=np.float64))
    if polygon is not None:
        shapely.prepare(polygon)

    # centroids the slide's tiles can own (grid coordinates [-0.5, cols - 0.5)) inside the region's pixels
    x_lo, y_lo = max(x, grid_to_level0(-0.5, ds)), max(y, grid_to_level0(-0.5, ds))
    x_hi, y_hi = min(x + w, grid_to_level0(cols - 0.5, ds)), min(y + h, grid_to_level0(rows - 0.5, ds))

    def keep(cells):
        xs, ys = cells["x_px"].to_numpy(), cells["y_px"].to_numpy()
        inside = (xs >= x_lo) & (xs < x_hi) & (ys >= y_lo) & (ys < y_hi)
        if polygon is not None:  # and in the polygon: a region smaller than the polygon reads only part of it
            inside &= shapely.contains_xy(polygon, xs, ys)
        return inside

    threads = default_threads() if threads is None else max(1, int(threads))
    cells, seg = _cells_from_rgb(rgb, stains, params, (px0 * ds, py0 * ds), ds, mpp0, polygons, threads,
                                 keep=keep, grid_origin=(py0, px0), core=core, gpu=gpu,
                                 valid=_on_slide(slide, ds, padded))
    cells = _score_table(cells, preset.scoring, classifier)
    summary = summarize(cells, preset.scoring)
    summary["warnings"] = warnings + stain_warnings(rgb_core, stains, name)
    oy, ox = seg.offset
    return RegionResult(cells=cells, summary=summary, stains=stains, segmentation=seg, pixel_size_um=px,
                        downsample=ds, origin_px=((px0 + ox) * ds, (py0 + oy) * ds))


# ---------------------------------------------------------------- whole slides

@dataclass(frozen=True)
class TileTask:
    """One tile of the detection-resolution grid (core and padded bounds, detection px)."""

    index: int
    core: tuple  # (y0, x0, y1, x1)
    padded: tuple  # (y0, x0, y1, x1)


def plan_tiles(shape_det, tile_size: int, pad: int, keep=None) -> list[TileTask]:
    """Cut a detection-resolution image of ``shape_det`` into core tiles plus ``pad`` px of context.

    ``keep(y0, x0, y1, x1) -> bool`` drops tiles (e.g. without tissue).
    """
    h, w = shape_det
    tasks = []
    for y0 in range(0, h, tile_size):
        for x0 in range(0, w, tile_size):
            y1, x1 = min(h, y0 + tile_size), min(w, x0 + tile_size)
            if keep is not None and not keep(y0, x0, y1, x1):
                continue
            tasks.append(TileTask(len(tasks), (y0, x0, y1, x1), (y0 - pad, x0 - pad, y1 + pad, x1 + pad)))
    return tasks


def _on_slide(slide, ds: float, padded):
    """The rows and columns of a tile read at ``padded`` (detection grid) that lie on the slide's grid."""
    w0, h0 = slide.dimensions
    y0, x0, y1, x1 = padded
    return (max(0, -y0), max(0, -x0), min(y1, int(h0 / ds)) - y0, min(x1, int(w0 / ds)) - x0)


def read_detection_tile(slide, padded, ds: float) -> np.ndarray:
    """Read detection-grid pixels ``padded = (y0, x0, y1, x1)`` from a slide as uint8 RGB."""
    y0, x0, y1, x1 = padded
    downs = list(slide.level_downsamples)
    exact = getattr(slide, "level_reads_exactly", lambda i: True)
    level = max((i for i, d in enumerate(downs) if d <= ds * (1 + 1e-6) and (i == 0 or exact(i))),
                key=lambda i: downs[i], default=0)
    d_l = downs[level]
    f = ds / d_l  # level pixels per detection pixel
    margin = int(math.ceil(3 * max(0.0, (f - 1) / 2) + 2))
    ly0, lx0 = int(math.floor(y0 * f)) - margin, int(math.floor(x0 * f)) - margin
    ly1, lx1 = int(math.ceil(y1 * f)) + margin, int(math.ceil(x1 * f)) + margin
    if hasattr(slide, "read_level_region"):  # level pixels as they are, one grid for every tile
        src = slide.read_level_region(level, (lx0, ly0), (lx1 - lx0, ly1 - ly0))
    else:
        src = slide.read_region((int(round(lx0 * d_l)), int(round(ly0 * d_l))), level, (lx1 - lx0, ly1 - ly0))
    if abs(f - 1) < 1e-9:
        return np.ascontiguousarray(src[margin:margin + (y1 - y0), margin:margin + (x1 - x0), :3])
    return _to_uint8(resample_to_grid(src[..., :3], (ly0, lx0), f, (y0, x0), (y1 - y0, x1 - x0)))


_WORKER_SLIDES: dict = {}
#: Slides a worker keeps open (persistent Dask workers see every slide of a batch).
_WORKER_SLIDES_MAX = 2


def _worker_slide(path, mpp):
    """The worker's open handle on a slide; reopened when the file changed, at most a few kept open."""
    import os

    from .slide import open_slide

    st = os.stat(path)
    key = (str(path), mpp, st.st_mtime_ns, st.st_size)
    slide = _WORKER_SLIDES.pop(key, None)
    if slide is None:
        slide = open_slide(path, mpp=mpp)
    _WORKER_SLIDES[key] = slide  # most recently used last
    while len(_WORKER_SLIDES) > _WORKER_SLIDES_MAX:
        old = _WORKER_SLIDES.pop(next(iter(_WORKER_SLIDES)))
        try:
            old.close()
        except Exception:  # noqa: BLE001 - closing a stale handle must not fail a tile
            pass
    return slide


def _close_worker_slides():
    """Close the slides this process keeps open for inline tiles (before a process pool forks)."""
    while _WORKER_SLIDES:
        try:
            _WORKER_SLIDES.pop(next(iter(_WORKER_SLIDES))).close()
        except Exception:  # noqa: BLE001 - a stale handle must not stop the slide
            pass


def analyze_tile(slide_path, mpp_override, task: TileTask, ds: float, mpp0: float, stains: StainVectors,
                 params: DetectionParams, polygons: bool, gpu: bool = False) -> pd.DataFrame:
    """Cells whose nucleus centroid lies in the tile's core (a picklable unit of work)."""
    slide = _worker_slide(slide_path, mpp_override)
    rgb = read_detection_tile(slide, task.padded, ds)
    py0, px0 = task.padded[0], task.padded[1]
    cy0, cx0, cy1, cx1 = task.core

    # A centroid is in the core when its grid coordinate lies in [c0 - 0.5, c1 - 0.5). Compared in level-0
    # pixels through the one mapping measure used (grid_to_level0, monotonic): inverting it would round
    # differently in each tile at a fractional downsample, and a cell on the line was then kept by neither.
    xs0, xs1, ys0, ys1 = (grid_to_level0(v - 0.5, ds) for v in (cx0, cx1, cy0, cy1))

    def in_core(cells):
        x, y = cells["x_px"].to_numpy(), cells["y_px"].to_numpy()
        return (x >= xs0) & (x < xs1) & (y >= ys0) & (y < ys1)

    # A whole slide holds ~10^6 outlines: float32 vertices (QuPath's ROI precision) halve them, within
    # 0.01 px below 10^5 px; every tile computes a cell's outline from the same grid coordinates.
    core = (cy0 - py0, cx0 - px0, cy1 - py0, cx1 - px0)
    cells, _ = _cells_from_rgb(rgb, stains, params, (px0 * ds, py0 * ds), ds, mpp0, polygons, keep=in_core,
                               grid_origin=(py0, px0), outline_dtype=np.float32, core=core, gpu=gpu,
                               valid=_on_slide(slide, ds, task.padded))
    return cells


def _run_tasks(fn, tasks, workers: int, client=None, start_method=None):
    """Yield results of ``fn(task)`` as they complete: inline, in processes, or on Dask."""
    if client is not None:
        from distributed import as_completed as dask_as_completed

        # Hold no list of futures: a result is released on the cluster as soon as it is fetched, so
        # worker memory does not grow with the number of tiles (as_completed drops its reference too).
        # readable task keys (the dashboard, distributed's warnings), unique per run
        token = uuid.uuid4().hex[:8]
        name = Path(getattr(fn, "kw", {}).get("slide_path", "tile")).name
        keys = [f"ihcscore-tile-{name}-{getattr(t, 'index', i)}-{token}" for i, t in enumerate(tasks)]
        # on the client given (there may be no default client; as_current would leave dask's scheduler set
        # to it between tiles, for the whole slide)
        for fut in dask_as_completed(client.map(fn, tasks, key=keys, pure=False), loop=client.loop):
            result = fut.result()
            fut.release()
            yield result
        return
    if workers <= 1:
        for t in tasks:
            yield fn(t)
        return
    # after a failed tile (or an early close) the tiles not started are dropped, not run first
    _close_worker_slides()  # forked workers must not share this process's open files (one file position)
    with worker_pool(workers, start_method) as pool:
        # Finished futures go through a queue and are dropped once their result is taken: a list of all
        # the futures (as_completed keeps one) would hold every tile's table until the slide ends.
        finished = queue.SimpleQueue()
        for t in tasks:
            pool.submit(fn, t).add_done_callback(finished.put)
        for _ in range(len(tasks)):
            yield finished.get().result()


class _TileJob:
    """Picklable closure over the per-slide constants of :func:`analyze_tile`; returns ``(version, tile)``: this
    ihcscore's version and the tile packed (:func:`~ihcscore.tile_tables.pack_tile`)."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, task):
        # the worker's version with the tile: a Dask worker running another ihcscore (its own class, without
        # this line) is found out by the client, whatever its code does (:func:`_tile_of_this_version`)
        return __version__, pack_tile(analyze_tile(task=task, **self.kw))


def _tile_of_this_version(result):
    """The packed tile of a :class:`_TileJob` result, after checking the worker ran this version of ihcscore
    (another one gives other cells under this version's name, and reruns take them as done)."""
    if isinstance(result, tuple) and len(result) == 2 and result[0] == __version__:
        return result[1]
    theirs = result[0] if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str) else None
    raise RuntimeError(f"a tile worker runs {'ihcscore ' + theirs if theirs else 'an older ihcscore'}, this process "
                       f"{__version__}: install ihcscore=={__version__} on the (Dask) workers")


#: Longest side (px) the stain-angle check subsamples the tissue sample to (every second pixel of ~1800 px).
STAIN_CHECK_SIDE_PX = 1000


def stain_warnings(rgb_sample: np.ndarray, stains: StainVectors, name: str) -> list[str]:
    """Warnings when a region does not look like brightfield H-DAB.

    Two checks: the share of stained OD the H-DAB pair leaves in the residual channel, and the angle
    between the second stain estimated from the tissue and QuPath's default DAB vector, together with
    the colour it absorbs most. Real DAB estimates lie within ~11 degrees of default DAB (cosine >= 0.98
    on the OS-2, EndoNuke and scikit-image images) and absorb blue most; eosin in an H&E slide lies
    ~23 degrees away (CMU-1: cosine 0.92) and absorbs green most.
    """
    rep = stain_fit_report(rgb_sample, stains)
    out = []
    try:
        # the angle test has a wide margin (11 vs 23 degrees): a quarter of the sample's pixels decide it
        estimated = estimate_stain_vectors(rgb_sample, max_side_px=STAIN_CHECK_SIDE_PX)
    except ValueError:
        estimated = None
    if estimated is not None:
        cos = float(np.dot(estimated.dab, H_DAB_DEFAULT.dab))
        _, g, b = estimated.dab
        # Eosin absorbs green most, DAB blue: both conditions, so that a DAB estimate pulled towards
        # hematoxylin (sparse nuclear DAB always mixed with it) is not taken for eosin.
        if cos < MIN_DAB_COSINE and g > EOSIN_GREEN_OVER_BLUE * b:
            angle = float(np.degrees(np.arccos(min(1.0, cos))))
            out.append(
                f"{name}: the second stain in this tissue is {angle:.0f} degrees away from DAB "
                f"(estimated OD vector {tuple(round(v, 2) for v in estimated.dab)}): H&E or another chromogen? "
                "DAB scores would be meaningless (if it is DAB on an unusual scanner, check --stains auto)"
            )
    if rep["residual_fraction"] is not None and rep["residual_fraction"] > MAX_RESIDUAL_FRACTION:
        out.append(
            f"{name}: the H-DAB stain vectors explain this slide poorly ({100 * rep['residual_fraction']:.0f} % "
            "of stained optical density is residual); is it H-DAB? (H&E and other stains give meaningless DAB scores)"
        )
    if rep["dab_fraction"] is not None and rep["dab_fraction"] < 0.02 and rep["stained_fraction"] > 0.01:
        out.append(f"{name}: almost no DAB stain found ({100 * rep['dab_fraction']:.1f} % of stain OD)")
    return out


def _tissue(slide, tissue, annotations=None):
    """The tissue mask and its downsample (None for everything); ``annotations``: ``tissue``'s, already read."""
    from . import tissue as tissue_mod

    if tissue in (None, "all"):
        return None, 1.0
    if tissue == "auto":
        return tissue_mod.tissue_mask(slide)
    if annotations is not None:
        return tissue_mod.annotations_mask(annotations, slide, tissue)
    return tissue_mod.mask_from_file(tissue, slide)


def _annotations(tissue):
    """``[(name, geometry)]`` when ``tissue`` is a GeoJSON annotation file, else None."""
    if isinstance(tissue, (str, Path)) and str(tissue).lower().endswith((".geojson", ".json")):
        from .tissue import read_annotations

        return read_annotations(tissue)
    return None


#: Side (detection px) of the windows sampled for stain estimation and checks (12 at most: ~3 MP).
SAMPLE_WINDOW_PX = 512
#: Smallest core tile side (detection px): smaller cores would read and segment mostly overlap.
MIN_TILE_PX = 128


def _tissue_tests(mask, mask_ds, annotations, ds):
    """``keep(y0, x0, y1, x1)`` (does a core of the detection grid hold tissue?) and ``in_tissue(y_px, x_px)``
    (is a centroid in it?), or Nones for everything."""
    if annotations is not None:
        # Annotations are exact geometry: which cells count must not depend on how coarsely the tissue
        # mask (for the report) was rasterised, so tiles and cells are tested against the polygons.
        import shapely

        area = shapely.union_all([g for _, g in annotations])
        shapely.prepare(area)

        def keep(y0, x0, y1, x1):
            # the level-0 box of the centroids this core owns (see analyze_tile); a polygon that only
            # touches it holds none of them (cells count strictly inside, shapely.contains_xy)
            box = shapely.box(x0 * ds, y0 * ds, x1 * ds, y1 * ds)
            return bool(area.intersects(box) and not area.touches(box))

        def in_tissue(y_px, x_px):
            return shapely.contains_xy(area, x_px, y_px)  # as regions.cells_in_geometry counts them

        return keep, in_tissue
    if mask is None:
        return None, None
    scale = ds / mask_ds  # mask pixels per detection pixel

    def keep(y0, x0, y1, x1):
        # A cell owned by this core has u = centroid / ds in [x0, x1) (see analyze_tile) and is
        # kept below iff mask[floor(u_y * scale), floor(u_x * scale)]: those are the mask pixels to look at.
        sub = mask[int(y0 * scale):int(math.ceil(y1 * scale)) + 1, int(x0 * scale):int(math.ceil(x1 * scale)) + 1]
        return bool(sub.any())

    def in_tissue(y_px, x_px):
        # Level-0 pixel k spans [k, k + 1) (QuPath's convention), mask pixel j spans level-0 pixels
        # [j * mask_ds, (j + 1) * mask_ds): look up through the detection grid, with the same arithmetic
        # as the tile ownership and keep(), so no owned cell falls in a dropped tile.
        my = np.clip(np.floor(y_px / ds * scale).astype(int), 0, mask.shape[0] - 1)
        mx = np.clip(np.floor(x_px / ds * scale).astype(int), 0, mask.shape[1] - 1)
        return mask[my, mx]

    return keep, in_tissue


def _preset_stains(slide, preset, sample) -> tuple[StainVectors, list]:
    """The preset's stain vectors, or (``preset.stains.estimate``) estimated from a tissue sample, with the
    glass background from the slide's thumbnail; (vectors, warnings)."""
    if not preset.stains.estimate:
        return preset.stains.to_stain_vectors(), []
    background = estimate_background(slide.thumbnail(1024)) if hasattr(slide, "thumbnail") else None
    try:
        return estimate_stain_vectors(sample, background=background), []
    except ValueError as e:
        name = getattr(slide, "name", "slide")
        return preset.stains.to_stain_vectors(), [f"{name}: stain estimation failed ({e}); using the preset's vectors"]


def slide_stains(slide, preset, *, tissue="auto", annotations=None) -> tuple[StainVectors, list]:
    """The stain vectors :func:`analyze_slide` uses for ``slide`` with ``tissue``: the preset's, or, when the
    preset estimates them, estimated once from tissue windows of a fixed grid (``--stains auto``).

    A viewer scoring several regions of one slide uses this, with its regions as ``annotations``
    (``[(name, shapely geometry in level-0 px)]``, as ``tissue=ANNOTATIONS.geojson`` reads them), so every
    region is deconvolved as ``ihcscore score --tissue ANNOTATIONS.geojson`` deconvolves the slide.

    Returns
    -------
    (StainVectors, list of warning lines)
    """
    if not preset.stains.estimate:
        return preset.stains.to_stain_vectors(), []
    ds = detection_pixel_size(float(slide.mpp), preset.detection.pixel_size_um) / float(slide.mpp)
    w0, h0 = slide.dimensions
    if annotations is not None:
        mask, mask_ds = None, 1.0
    else:
        if not hasattr(slide, "thumbnail"):  # an in-memory image: no pyramid to find tissue on
            tissue = "all"
        annotations = _annotations(tissue)
        mask, mask_ds = _tissue(slide, tissue, annotations)
    keep, _ = _tissue_tests(mask, mask_ds, annotations, ds)
    sample = _sample_tissue_rgb(slide, plan_tiles((int(h0 / ds), int(w0 / ds)), SAMPLE_WINDOW_PX, 0, keep), ds)
    return _preset_stains(slide, preset, sample)


def _sample_tissue_rgb(slide, tasks, ds, max_tiles: int = 12) -> np.ndarray:
    """A few tissue tiles at detection resolution, for stain estimation and checks."""
    if not tasks:
        return np.full((8, 8, 3), 255, np.uint8)
    pick = np.linspace(0, len(tasks) - 1, min(max_tiles, len(tasks))).round().astype(int)
    tiles = [read_detection_tile(slide, tasks[i].core, ds).reshape(-1, 3) for i in sorted(set(pick))]
    flat = np.concatenate(tiles)
    side = int(math.ceil(math.sqrt(len(flat))))
    pad = np.full((side * side - len(flat), 3), 255, np.uint8)
    return np.concatenate([flat, pad]).reshape(side, side, 3)


def analyze_slide(
    slide,
    preset,
    *,
    stains: StainVectors | None = None,
    tissue="auto",
    tile_size: int = 1024,
    workers: int = 1,
    client=None,
    polygons: bool = False,
    progress=None,
    classifier=None,
    hotspot_grid_um: float = 500.0,
    hotspot_min_cells: int = 50,
    gpu: bool = False,
) -> SlideResult:
    """Score a whole slide tile by tile.

    Parameters
    ----------
    slide : ihcscore.slide.Slide
    preset : ihcscore.preset.Preset
    stains : StainVectors, optional
        Overrides the preset; with ``preset.stains.estimate`` vectors and
        background are estimated from tissue tiles.
    tissue : "auto" | "all" | path
        Tissue detection, everything, or a PNG mask / GeoJSON annotations.
    tile_size : int
        Core tile side in detection pixels (at least :data:`MIN_TILE_PX`).
    workers : int
        Processes (at least 1); ``client`` (a ``dask.distributed.Client``) takes precedence.
    polygons : bool
        Keep nucleus/cell outlines (for GeoJSON): ``nucleus_polygon`` and ``cell_polygon``
        columns of closed-ring (K, 2) float32 level-0 (x, y) vertices.
    progress : callable(done, total), optional
    classifier : ihcscore.classify.CellClassifier, optional
        Tumour / other classifier, applied to the whole slide's table (so
        neighbourhood features do not depend on tiles); default the morphology rule.
    hotspot_grid_um, hotspot_min_cells : float, int
        Grid of the H-score heat map (µm) and the fewest cells a square needs to count.
    gpu : bool
        Each tile's colour deconvolution and detection smoothing on the GPU (``ihcscore.gpu``;
        ``RuntimeError`` without one). Worker processes are then spawned, not forked (CUDA does not
        survive a fork), and share the device.

    Returns
    -------
    SlideResult
    """
    if int(tile_size) != tile_size or tile_size < MIN_TILE_PX:
        raise ValueError(f"tile_size must be a whole number of pixels >= {MIN_TILE_PX}, got {tile_size}")
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers}")
    t0 = time.perf_counter()
    device = "cpu"
    if gpu and client is None:  # on a cluster the workers' devices count, not this machine's
        device = f"gpu: {_require_gpu()}"
    elif gpu:
        device = "gpu"
    early_warnings = _modality_warnings(slide)
    mpp0 = float(slide.mpp)
    px = detection_pixel_size(mpp0, preset.detection.pixel_size_um)
    ds = px / mpp0
    params = replace(preset.detection, pixel_size_um=px)
    w0, h0 = slide.dimensions
    shape_det = (int(h0 / ds), int(w0 / ds))
    pad = params.context_px()

    annotations = _annotations(tissue)  # read once: the mask, the tiles, the cells and the regions use them
    mask, mask_ds = _tissue(slide, tissue, annotations)
    keep, in_tissue = _tissue_tests(mask, mask_ds, annotations, ds)
    tasks = plan_tiles(shape_det, int(tile_size), pad, keep)

    # Stain estimation and checks read a few tissue windows of a fixed grid: the sample (so the estimated
    # vectors and everything after them) must not depend on the tile size, and its memory stays bounded.
    sample = _sample_tissue_rgb(slide, plan_tiles(shape_det, SAMPLE_WINDOW_PX, 0, keep), ds)
    warnings = early_warnings
    if stains is None:
        stains, w = _preset_stains(slide, preset, sample)
        warnings += w
    if tasks:
        warnings += stain_warnings(sample, stains, slide.name)
    else:
        warnings = [f"{slide.name}: no tissue found: empty result (scores are null)"]

    # Absolute path: Dask workers may run in another working directory (or on another node, shared FS);
    # links not resolved: the path given is the one mounted alike everywhere, the link's target may not be.
    job = _TileJob(slide_path=os.path.abspath(slide.path), mpp_override=mpp0, ds=ds, mpp0=mpp0, stains=stains,
                   params=params, polygons=polygons, gpu=bool(gpu))

    release_freed_memory()  # the tissue and stain checks' images: the table's arrays need other sizes
    remove_stale_tile_tables()
    with tempfile.TemporaryDirectory(prefix=f"{TILE_TABLES_PREFIX}{os.getpid()}-") as spill:
        tables = TileTables(spill)
        start_method = "spawn" if gpu else None
        if progress is not None:
            progress(0, len(tasks))  # the total from the start (a cluster's first tile may take a while)
        for done, part in enumerate(_run_tasks(job, tasks, workers, client, start_method), start=1):
            tables.add(_tile_of_this_version(part))
            if progress is not None:
                progress(done, len(tasks))
        cells = tables.assemble(in_tissue) if tables.columns else _empty_cells(slide, preset, stains)
    cells["label"] = np.arange(1, len(cells) + 1)
    cells.rename(columns={"label": "object_id"}, inplace=True)
    cells = _score_table(cells, preset.scoring, classifier)
    summary = slide_summary(slide, preset, stains, cells, warnings)
    summary["classifier"] = getattr(classifier, "source", "trained") if classifier is not None else "morphology rule"
    summary["device"] = device
    grid = score_grid(cells, preset.scoring, grid_um=hotspot_grid_um, min_cells=hotspot_min_cells)
    summary["hotspots"] = {"grid_um": float(hotspot_grid_um), "min_cells": int(hotspot_min_cells),
                           "top": top_hotspots(grid, 3)}
    if annotations is not None:
        summary["regions"] = region_summaries(cells, annotations, preset.scoring, mpp0, slide.dimensions)
    summary["n_tiles"] = len(tasks)
    summary["tile_size_px"] = int(tile_size)
    summary["detection_pixel_size_um"] = px
    summary["runtime_s"] = round(time.perf_counter() - t0, 3)
    return SlideResult(cells=cells, summary=summary, stains=stains, tissue_mask=mask,
                       tissue_downsample=mask_ds, warnings=warnings, hotspot_grid=grid)


def _empty_cells(slide, preset, stains) -> pd.DataFrame:
    """A zero-row table with every measurement column (blank glass, no tissue)."""
    params = replace(preset.detection, pixel_size_um=max(preset.detection.pixel_size_um, slide.mpp))
    cells, _ = _cells_from_rgb(np.full((16, 16, 3), 255, np.uint8), stains, params, (0, 0), 1.0, slide.mpp, False)
    return cells.iloc[:0]


def slide_summary(slide, preset, stains: StainVectors, cells: pd.DataFrame, warnings) -> dict:
    """The ``summary.json`` content for a scored slide (output contract)."""
    scores = summarize(cells, preset.scoring)
    return {
        "slide": slide.name,
        "path": str(slide.path),
        "mpp": float(slide.mpp),
        "dimensions_px": [int(v) for v in slide.dimensions],  # level-0 width, height
        "preset": preset.name,
        "preset_parameters": preset.to_dict(),
        "stain_vectors": stains.to_dict(),
        "background_rgb": list(stains.background),
        "thresholds": list(preset.scoring.thresholds),
        "compartment": preset.scoring.compartment,
        "statistic": preset.scoring.statistic,
        "measurement": preset.scoring.measurement,
        "scored_cells": preset.scoring.cells,
        "n_cells": int(len(cells)),
        "tumour": scores["tumour"],
        "all": scores["all"],
        "warnings": list(warnings),
        "software_version": __version__,
    }
