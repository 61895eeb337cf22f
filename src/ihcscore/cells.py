"""Nucleus detection and cell expansion on one region.

A re-implementation, with scipy and scikit-image, of the steps QuPath's
watershed cell detection takes (see ``docs/methods.md``):

1. detection image (hematoxylin OD or OD sum), optional median filter and
   DAB exclusion;
2. background subtraction by morphological reconstruction of an erosion;
3. Gaussian + discrete Laplacian (LoG), seeded watershed over-segmentation;
4. keep regions brighter than the threshold, merge, split touching nuclei
   with a distance-map watershed, refine the boundary;
5. 4-connected nuclei filtered by area and mean intensity;
6. cells by expanding nuclei without overlap; cytoplasm and membrane
   compartments.

All lengths in :class:`DetectionParams` are µm; they are converted to pixels
with the region's pixel size. Everything here works on arrays at the detection
resolution; no slide or file handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology, segmentation

try:  # compiled kernels with the same results as the scipy/skimage calls they replace
    from . import kernels as _k
except ImportError:  # pragma: no cover - numba missing: pure scipy/skimage fallback
    _k = None

__all__ = [
    "DetectionParams",
    "Segmentation",
    "detection_image",
    "subtract_background",
    "detect_nuclei",
    "expand_cells",
    "compartments",
    "segment_cells",
    "segment_in_bands",
]

DETECTION_IMAGES = ("hematoxylin", "od_sum")
#: Geodesic reach of the background reconstruction, in background radii.
BACKGROUND_RECONSTRUCTION_RADII = 3.0
#: An extra hematoxylin nucleus is added when at most this share of it overlaps OD-sum nuclei.
MAX_EXTRA_OVERLAP = 0.2
#: A band of rows segmented on its own is at least this many context widths tall (see segment_in_bands).
MIN_BAND_CONTEXTS = 4
#: Tolerance (OD/px²) of the LoG regional maxima that seed the over-segmentation (QuPath step 7).
SEED_TOLERANCE = 0.001
#: Gaussian sigma (px) on the distance map before finding ultimate eroded points (see _split_touching).
EDM_SMOOTH_PX = 0.75
LAPLACIAN = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=np.float32)


@dataclass(frozen=True)
class DetectionParams:
    """Nucleus and cell detection parameters (the preset's ``[detection]`` table).

    Lengths are in µm, areas in µm², intensities in OD units.
    """

    image: str = "hematoxylin"  # "hematoxylin" | "od_sum"
    exclude_dab: bool = False
    pixel_size_um: float = 0.5
    background_radius_um: float = 8.0
    median_radius_um: float = 0.0
    sigma_um: float = 1.5
    threshold: float = 0.1
    min_area_um2: float = 10.0
    max_area_um2: float = 400.0
    max_background: float = 2.0
    split_by_shape: bool = True
    cell_expansion_um: float = 5.0
    membrane_width_um: float = 1.0
    # ihcscore extension, not a QuPath setting (0 = off, QuPath's behaviour): with the "od_sum" image, also
    # detect nuclei on the hematoxylin channel with this threshold and add those that the OD-sum detection
    # missed (faint negative nuclei beside dark DAB, where one OD-sum threshold cannot serve both).
    hematoxylin_threshold: float = 0.0

    def __post_init__(self):
        if self.image not in DETECTION_IMAGES:
            raise ValueError(f"detection.image must be one of {DETECTION_IMAGES}, got {self.image!r}")
        for name in ("pixel_size_um", "sigma_um"):
            if not getattr(self, name) > 0:
                raise ValueError(f"detection.{name} must be > 0, got {getattr(self, name)}")
        for name in ("background_radius_um", "median_radius_um", "cell_expansion_um", "membrane_width_um",
                     "min_area_um2"):
            if getattr(self, name) < 0:
                raise ValueError(f"detection.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_area_um2 <= self.min_area_um2:
            raise ValueError("detection.max_area_um2 must be larger than detection.min_area_um2")

    def context_um(self) -> float:
        """How far (µm) the result at a pixel can depend on pixels around it.

        Tiles must overlap by at least this on each side for seam-free results.
        """
        return (self.cell_context_um() + (1 + BACKGROUND_RECONSTRUCTION_RADII) * self.background_radius_um
                + self._filter_reach_um())

    def _filter_reach_um(self) -> float:
        """Reach of the filters before background subtraction: the median, and exclude-DAB's median then
        maximum (ImageJ's footprints reach at most 1 px beyond the radius; 2.5 px becomes 3)."""
        reach = self.median_radius_um + self.pixel_size_um if self.median_radius_um > 0 else 0.0
        if self.exclude_dab:
            reach += 2 * 3 * self.pixel_size_um
        return reach

    def context_px(self) -> int:
        """:meth:`context_um` in whole pixels of ``pixel_size_um`` (rounded up): the overlap of tiles and bands."""
        return int(np.ceil(self.context_um() / self.pixel_size_um))

    def cell_context_um(self) -> float:
        """How far (µm) a cell depends on the background-subtracted image around its nucleus centroid.

        The nucleus (10 µm), the smoothing (3 sigma) and the expansion to the cell, twice: a cell
        reaches one expansion beyond its nucleus and shares that ring with any nucleus within a
        further expansion, which must be in the window too. The part of :meth:`context_um` the
        steps after background subtraction need.
        """
        return 10.0 + 2 * self.cell_expansion_um + 3 * self.sigma_um

    def cell_context_px(self) -> int:
        """:meth:`cell_context_um` in whole pixels (rounded up)."""
        return int(np.ceil(self.cell_context_um() / self.pixel_size_um))


@dataclass
class Segmentation:
    """Label images of one region at the detection resolution.

    The same label identifies one cell in every image; 0 is background.
    """

    nuclei: np.ndarray
    cells: np.ndarray
    cytoplasm: np.ndarray
    membrane: np.ndarray
    pixel_size_um: float
    extra: dict = field(default_factory=dict)
    #: (row, col) of the images' top-left pixel in the image they were segmented from.
    offset: tuple = (0, 0)

    @property
    def n_cells(self) -> int:
        return int(self.nuclei.max(initial=0))

    def compartment(self, name: str) -> np.ndarray:
        return {"nucleus": self.nuclei, "cell": self.cells, "cytoplasm": self.cytoplasm,
                "membrane": self.membrane}[name]


def _disk(radius_px: float) -> np.ndarray:
    r = int(np.floor(radius_px))
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= radius_px * radius_px + 1e-6


def _rank_filter_disk(radius_px: float) -> np.ndarray:
    """The footprint of ImageJ's rank filters (median, max), which QuPath's median and exclude-DAB steps use.

    ImageJ rounds a radius in [1.5, 1.75) up to 1.75 and one in [2.5, 2.85) up to 2.85, then takes the
    offsets with ``dx² + dy² <= int(r²) + 1``: 21 px at radius 2 (a plain disk has 13) and 29 px at 2.5.
    """
    r = float(radius_px)
    if 1.5 <= r < 1.75:
        r = 1.75
    elif 2.5 <= r < 2.85:
        r = 2.85
    r2 = int(r * r) + 1
    k = int(np.floor(np.sqrt(r2)))
    y, x = np.ogrid[-k:k + 1, -k:k + 1]
    return (x * x + y * y) <= r2


def detection_image(od: np.ndarray, stain_od: np.ndarray, params: DetectionParams) -> np.ndarray:
    """The image nuclei are found on.

    Parameters
    ----------
    od : (M, N, 3) float32
        Per-channel optical density.
    stain_od : (M, N, 3) float32
        Deconvolved hematoxylin, DAB, residual OD.
    params : DetectionParams

    Returns
    -------
    (M, N) float32
    """
    px = params.pixel_size_um
    if params.image == "od_sum":
        img = od.sum(axis=-1, dtype=np.float32)
    else:
        img = np.ascontiguousarray(stain_od[..., 0], dtype=np.float32)
    if params.median_radius_um > 0:
        img = ndi.median_filter(img, footprint=_rank_filter_disk(params.median_radius_um / px))
    if params.exclude_dab:
        # Pixels dominated by DAB (membrane staining) must not be detected as nuclei.
        keep = (stain_od[..., 0] >= stain_od[..., 1]).astype(np.uint8)
        keep = ndi.median_filter(keep, footprint=_rank_filter_disk(2.5))
        keep = ndi.maximum_filter(keep, footprint=_rank_filter_disk(2.5))
        img = img * keep
    return img.astype(np.float32, copy=False)


def subtract_background(image: np.ndarray, radius_px: float, max_background: float):
    """Opening-by-reconstruction background subtraction (reconstruction bounded to 3 radii).

    Returns
    -------
    measure : (M, N) float32
        ``image`` minus the estimated background.
    invalid : (M, N) bool
        Pixels near an area whose background exceeds ``max_background``
        (dense dark debris, folds): regions touching them are rejected.
    """
    invalid = np.zeros(image.shape, dtype=bool)
    if radius_px <= 0:
        return image, invalid
    fp = morphology.disk(max(1, int(round(radius_px))), decomposition="sequence")
    eroded = _k.grey_erosion_sequence(image, fp) if _k else morphology.erosion(image, fp)
    high = eroded > max_background if max_background > 0 else None  # QuPath: no limit unless > 0
    if high is not None and high.any():
        invalid = _k.binary_dilation_disk(high, 2 * radius_px) if _k else \
            ndi.binary_dilation(high, structure=_disk(2 * radius_px))
        eroded = eroded.copy()
        eroded[invalid] = image.min()
    # Reconstruction limited to 3 radii of geodesic propagation: QuPath's is unbounded, so its
    # background (and its nuclei) depend on where a tile ends. Bounded, a pixel's result depends only
    # on pixels within 4 radii, which the tile overlap covers (DetectionParams.context_um).
    steps = int(np.ceil(BACKGROUND_RECONSTRUCTION_RADII * radius_px))
    if _k:  # its first step is min(seed, mask)
        background = _k.bounded_reconstruction_dilation(eroded, image, steps)
    else:
        background = np.minimum(eroded, image)
        for _ in range(steps):
            grown = np.minimum(ndi.grey_dilation(background, size=(3, 3)), image)
            if np.array_equal(grown, background):
                break
            background = grown
    return (image - background).astype(np.float32, copy=False), invalid


def _split_touching(mask: np.ndarray) -> np.ndarray:
    """Split touching blobs along distance-map watershed lines (ImageJ-style binary watershed).

    Seeds are the ultimate eroded points: maxima of the Euclidean distance map
    standing at least 0.5 px above their saddle (ImageJ's tolerance). ImageJ
    finds them on a sub-pixel-corrected EDM and tolerates a sorting error of
    about 0.8 px along ridges; the raw discrete distance map has spurious ridge
    maxima instead, which split elongated nuclei in two (+8 % cells against
    QuPath on OS-2). A light Gaussian (:data:`EDM_SMOOTH_PX`) of the distance
    map stands in for ImageJ's correction (docs/validation.md).
    """
    dist = _k.distance_transform_edt(mask, np.float64) if _k else ndi.distance_transform_edt(mask)
    if EDM_SMOOTH_PX > 0:
        dist = (_k or ndi).gaussian_filter(dist, EDM_SMOOTH_PX)
    peaks = _k.h_maxima(dist, 0.5, mask) if _k else morphology.h_maxima(dist, 0.5) & mask
    markers, _ = _k.label(peaks, 2) if _k else ndi.label(peaks, structure=np.ones((3, 3)))
    ws = _k.watershed_components(dist, markers, mask, watershed_line=True, negate=True) if _k else \
        segmentation.watershed(-dist, markers, mask=mask, watershed_line=True)
    return ws > 0


def _erode_3x3_repeating_edge(mask: np.ndarray) -> np.ndarray:
    """3×3 erosion with the edge pixels repeated beyond the image, as ImageJ's minimum filter (QuPath's
    refinement step) does: a nucleus cut by the image edge keeps its edge row. Inside a tile the edge
    is context, so tiled results do not change."""
    padded = np.pad(mask, 1, mode="edge")
    eroded = _k.binary_erosion_3x3(padded) if _k else ndi.binary_erosion(padded, structure=np.ones((3, 3)))
    return eroded[1:-1, 1:-1]


def _fill_nuclear_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill the holes no larger than the largest nucleus (QuPath fills every hole).

    A larger hole is a lumen ringed by nuclei, not a hole in one: filled, it merges the ring into one
    blob above the largest nucleus area and every nucleus of it is lost. And whether such a ring closes
    depends on how much of it a tile holds, so tiles would disagree; a hole up to a nucleus's size is
    decided within the tile context.
    """
    filled = _k.fill_holes(mask) if _k else ndi.binary_fill_holes(mask)
    holes = filled & ~mask
    if not holes.any():
        return filled
    labels, n = _k.label(holes, 1) if _k else ndi.label(holes)  # 4-connected, as the fill floods
    small = np.bincount(labels.ravel(), minlength=n + 1) <= max_area_px
    small[0] = False
    return mask | small[labels]


def _laplacian(image: np.ndarray) -> np.ndarray:
    """``ndi.convolve(image, LAPLACIAN, mode="nearest")`` (the kernel is bit-identical)."""
    if _k:
        return _k.correlate3x3(image, LAPLACIAN[::-1, ::-1], mode="nearest")
    return ndi.convolve(image, LAPLACIAN, mode="nearest")


def _gaussian(image: np.ndarray, sigma_px: float, gpu: bool) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, sigma_px, mode="nearest")``, on the GPU with ``gpu``."""
    if gpu:
        from . import gpu as _gpu

        return _gpu.gaussian(image, sigma_px)
    return (_k or ndi).gaussian_filter(image, sigma_px, mode="nearest")  # kernel: bit-identical


def detect_nuclei(
    image: np.ndarray, params: DetectionParams, *, background=None, return_measure_image: bool = False,
    gpu: bool = False,
):
    """Find nuclei on a detection image.

    Parameters
    ----------
    image : (M, N) float32
        Detection image in OD units (see :func:`detection_image`).
    params : DetectionParams
    background : (measure, invalid), optional
        :func:`subtract_background` of ``image``, when already computed (with
        more context than ``image`` has: see :func:`segment_cells`).
    gpu : bool
        Smooth on the GPU (:mod:`ihcscore.gpu`; within 1e-4 OD of the CPU's smoothing).

    Returns
    -------
    nuclei : (M, N) int32 label image
    measure : (M, N) float32, only with ``return_measure_image``
        The background-subtracted image the threshold is applied to.
    """
    px = params.pixel_size_um
    measure, invalid = _subtract_background(image, params) if background is None else background

    smoothed = _gaussian(measure, params.sigma_um / px, gpu)
    log = _laplacian(smoothed)
    foreground = log > 0

    # Over-segment the LoG at its regional maxima, then keep bright regions.
    # QuPath's regional maxima with a 0.001 tolerance: maxima rising less than that above their saddle
    # merge with their neighbour (plain local maxima split noise plateaus; OS-2: 1336 -> 1332 cells).
    seeds = (_k.h_maxima(log, SEED_TOLERANCE, foreground) if _k else
             morphology.h_maxima(log, SEED_TOLERANCE).astype(bool) & foreground)
    markers, n_seeds = _k.label(seeds, 2) if _k else ndi.label(seeds, structure=np.ones((3, 3)))
    regions = _k.watershed_components(log, markers, foreground, negate=True) if _k else \
        segmentation.watershed(-log, markers, mask=foreground)
    index = np.arange(1, n_seeds + 1)
    if _k:
        counts, sums = _k.bincount_sum(regions, measure, n_seeds)
    else:
        counts = np.bincount(regions.ravel(), minlength=n_seeds + 1)
        sums = np.bincount(regions.ravel(), weights=measure.ravel(), minlength=n_seeds + 1)
    bright = sums[index] > params.threshold * np.maximum(counts[index], 1)
    if invalid.any():
        touched = np.bincount(regions.ravel(), weights=invalid.ravel(), minlength=n_seeds + 1) > 0
        bright &= ~touched[index]
    keep = np.zeros(n_seeds + 1, dtype=bool)
    keep[index] = bright
    mask = _k.apply_lut(keep, regions) if _k else keep[regions]

    # Merge neighbouring regions of one nucleus, then split touching nuclei by shape.
    mask = (_k.binary_dilation_3x3(mask) if _k else ndi.binary_dilation(mask, structure=np.ones((3, 3)))) \
        & foreground
    mask = _fill_nuclear_holes(mask, params.max_area_um2 / (px * px))
    if params.split_by_shape:
        mask = _split_touching(mask)

    if params.sigma_um / px > 1.5:
        # Large smoothing rounds boundaries off: refine with a finer LoG.
        fine = _laplacian(_gaussian(image, 1.0, gpu)) > 0
        mask = (fine & mask) | _erode_3x3_repeating_edge(mask)

    labels, n = _k.label(mask, 1) if _k else ndi.label(mask)  # 4-connectivity
    if _k:
        counts, sums = _k.bincount_sum(labels, measure, n)
        counts = counts.astype(np.float64)
    else:
        counts = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
        sums = np.bincount(labels.ravel(), weights=measure.ravel(), minlength=n + 1)
    area_um2 = counts * px * px
    ok = (sums >= params.threshold * counts) & (area_um2 >= params.min_area_um2) & (area_um2 <= params.max_area_um2)
    ok[0] = False
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[ok] = np.arange(1, int(ok.sum()) + 1, dtype=np.int32)
    nuclei = _k.apply_lut(relabel, labels) if _k else relabel[labels]
    if return_measure_image:
        return nuclei, measure
    return nuclei


def _subtract_background(image, params: DetectionParams):
    return subtract_background(image, params.background_radius_um / params.pixel_size_um, params.max_background)


def _hematoxylin_params(params: DetectionParams) -> DetectionParams:
    return replace(params, image="hematoxylin", threshold=params.hematoxylin_threshold)


def _add_hematoxylin_nuclei(nuclei, extra, params: DetectionParams) -> np.ndarray:
    """Add nuclei found on the hematoxylin channel that the OD-sum detection missed.

    One OD-sum threshold cannot separate both dark DAB-positive nuclei from
    DAB-stained cytoplasm around them *and* pale hematoxylin-only nuclei from
    the background: a threshold high enough for the first loses the second.
    Hematoxylin detection (threshold ``params.hematoxylin_threshold``) finds
    the pale negative nuclei; each is added (minus any pixels already taken)
    when at most :data:`MAX_EXTRA_OVERLAP` of it overlaps an OD-sum nucleus
    and what remains is still at least ``min_area_um2``. ``extra``: the hematoxylin
    detection's nuclei (:func:`detect_nuclei` with :func:`_hematoxylin_params`).
    """
    n_extra = int(extra.max(initial=0))
    if n_extra == 0:
        return nuclei
    taken = nuclei > 0
    total = np.bincount(extra.ravel(), minlength=n_extra + 1)
    inside = np.bincount(extra[taken], minlength=n_extra + 1)
    remain = (total - inside) * params.pixel_size_um ** 2
    add = (inside <= MAX_EXTRA_OVERLAP * total) & (remain >= params.min_area_um2)
    add[0] = False
    n0 = int(nuclei.max(initial=0))
    relabel = np.zeros(n_extra + 1, dtype=np.int32)
    relabel[add] = np.arange(n0 + 1, n0 + 1 + int(add.sum()), dtype=np.int32)
    return np.where(taken, nuclei, relabel[extra]).astype(np.int32)


def expand_cells(nuclei: np.ndarray, distance_px: float) -> np.ndarray:
    """Grow each nucleus by ``distance_px`` without overlap (nearest nucleus wins)."""
    if distance_px <= 0:
        return nuclei.copy()
    if _k:
        return _k.expand_labels(nuclei, distance_px)
    return segmentation.expand_labels(nuclei, distance=distance_px)


def compartments(nuclei: np.ndarray, cells: np.ndarray, membrane_width_px: float):
    """Cytoplasm (cell minus nucleus) and membrane (ring within ``membrane_width_px`` of the cell boundary)."""
    cytoplasm = np.where(nuclei == 0, cells, cells.dtype.type(0))
    if _k:  # same ring, by a small stencil instead of a distance transform
        return cytoplasm, _k.membrane_ring(cells, membrane_width_px).astype(cells.dtype, copy=False)
    boundary = segmentation.find_boundaries(cells, mode="inner")
    # Distance of every pixel to the nearest boundary pixel (boundary pixels: 0).
    dist = ndi.distance_transform_edt(~boundary)
    membrane = np.where((cells > 0) & (dist < membrane_width_px), cells, 0).astype(cells.dtype)
    return cytoplasm, membrane


def segment_cells(od: np.ndarray, stain_od: np.ndarray, params: DetectionParams, *,
                  threads: int = 1, core=None, gpu: bool = False, valid=None) -> Segmentation:
    """Detect nuclei, expand them to cells and derive the compartments.

    Parameters
    ----------
    od : (M, N, 3) float32
        Optical density at ``params.pixel_size_um``.
    stain_od : (M, N, 3) float32
        Deconvolved hematoxylin, DAB and residual OD.
    params : DetectionParams
    threads : int
        Segment up to this many bands of rows at once, each with
        ``params.context_um()`` of context (see :func:`segment_in_bands`). The
        result is identical for any value.
    core : (y0, x0, y1, x1), optional
        The part whose cells the caller keeps (a slide tile's core, the rest
        being context). Background subtraction runs on the whole image, the
        steps after it only on ``core`` grown by ``params.cell_context_um()``,
        the context they need (a fifth fewer pixels for a 1024 px core). With
        ``core``, ``threads`` is ignored.
    gpu : bool
        Run nucleus detection's Gaussian smoothing on the GPU (:mod:`ihcscore.gpu`).
    valid : (y0, x0, y1, x1), optional
        The part of the input that is image (a tile at a slide's edge is read with white beyond it):
        cells do not grow past it, as they end at the image's edge in QuPath (with ``core``).

    Returns
    -------
    Segmentation
        Labels ``1..n`` numbered in raster order of each nucleus's first pixel.
        With ``core``, the images cover only the window around it, whose
        top-left pixel is ``od[offset]`` (``Segmentation.offset``).
    """
    pad = params.context_px()
    n_bands = 1 if core is not None or valid is not None else \
        min(int(threads), od.shape[0] // (MIN_BAND_CONTEXTS * pad))
    if n_bands > 1:
        return segment_in_bands(od, stain_od, params, n_bands, gpu=gpu)
    seg = _segment_whole(od, stain_od, params, core, gpu, valid)
    # Connected-component labels already run in raster order; nuclei of the hematoxylin pass come last, and a
    # nucleus clipped at the slide's edge may have lost its first pixels.
    return _in_raster_order(seg) if _adds_hematoxylin_nuclei(params) or valid is not None else seg


def _relabel_present(labels: np.ndarray) -> np.ndarray:
    """Labels ``1..n`` again, in the same order, after some vanished (a nucleus wholly off the slide)."""
    present = np.unique(labels)
    present = present[present > 0]
    if len(present) == 0 or present[-1] == len(present):
        return labels
    lut = np.zeros(int(labels.max()) + 1, dtype=labels.dtype)
    lut[present] = np.arange(1, len(present) + 1, dtype=labels.dtype)
    return lut[labels]


def _adds_hematoxylin_nuclei(params: DetectionParams) -> bool:
    return params.hematoxylin_threshold > 0 and params.image == "od_sum"


def _segment_whole(od, stain_od, params: DetectionParams, core=None, gpu: bool = False, valid=None) -> Segmentation:
    px = params.pixel_size_um
    passes = [params] + ([_hematoxylin_params(params)] if _adds_hematoxylin_nuclei(params) else [])
    images = [detection_image(od, stain_od, p) for p in passes]
    backgrounds = [_subtract_background(im, p) for im, p in zip(images, passes)]
    offset = (0, 0)
    if core is not None:
        m = params.cell_context_px()
        y0, x0 = max(0, core[0] - m), max(0, core[1] - m)
        window = np.s_[y0:min(od.shape[0], core[2] + m), x0:min(od.shape[1], core[3] + m)]
        images = [im[window] for im in images]
        backgrounds = [tuple(b[window] for b in bg) for bg in backgrounds]
        offset = (y0, x0)
    nuclei, measure = detect_nuclei(images[0], params, background=backgrounds[0], return_measure_image=True,
                                    gpu=gpu)
    if len(passes) > 1:
        extra = detect_nuclei(images[1], passes[1], background=backgrounds[1], gpu=gpu)
        nuclei = _add_hematoxylin_nuclei(nuclei, extra, params)
    inside = None
    if valid is not None:  # no nucleus or cell pixels in the white read beyond the slide: their DAB would be 0
        inside = np.zeros(nuclei.shape, bool)
        vy0, vx0 = max(0, valid[0] - offset[0]), max(0, valid[1] - offset[1])
        inside[vy0:max(vy0, valid[2] - offset[0]), vx0:max(vx0, valid[3] - offset[1])] = True
        if inside.all():
            inside = None
        else:
            nuclei = _relabel_present(np.where(inside, nuclei, nuclei.dtype.type(0)))
    cells = expand_cells(nuclei, params.cell_expansion_um / px)
    if inside is not None:
        cells = np.where(inside, cells, cells.dtype.type(0))
    cytoplasm, membrane = compartments(nuclei, cells, params.membrane_width_um / px)
    return Segmentation(nuclei=nuclei, cells=cells, cytoplasm=cytoplasm, membrane=membrane,
                        pixel_size_um=px, extra={"measure_image": measure}, offset=offset)


_LABEL_IMAGES = ("nuclei", "cells", "cytoplasm", "membrane")


def _first_pixel_index(labels: np.ndarray, n: int) -> np.ndarray:
    """Raster index of the first pixel of each label ``1..n`` (-1 where absent)."""
    if _k:
        return _k.first_pixel_index(labels, n)
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    present, at = np.unique(flat[nz], return_index=True)
    first = np.full(n, -1, dtype=np.int64)
    first[present - 1] = nz[at]
    return first


def _in_raster_order(seg: Segmentation) -> Segmentation:
    """Renumber labels by the raster position of each nucleus's first pixel.

    OD-sum nuclei already are (``ndi.label`` numbers that way); nuclei added by the
    hematoxylin pass come after them, and bands are stitched in any order.
    """
    n = seg.n_cells
    order = np.argsort(_first_pixel_index(seg.nuclei, n), kind="stable")
    if np.array_equal(order, np.arange(n)):
        return seg
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    take = _k.apply_lut if _k else (lambda table, labels: table[labels])
    return replace(seg, **{name: take(lut, getattr(seg, name)) for name in _LABEL_IMAGES})


def _owned(nuclei: np.ndarray, n: int, row0: int, row1: int) -> np.ndarray:
    """Labels ``1..n`` whose nucleus centroid row lies in ``[row0 - 0.5, row1 - 0.5)`` (exact integers)."""
    if _k:
        count, raw, _ = _k.shape_sums(nuclei, n)
        row_sum = raw[0]
    else:
        rows = np.broadcast_to(np.arange(nuclei.shape[0])[:, None], nuclei.shape)
        count = np.bincount(nuclei.ravel(), minlength=n + 1)[1:]
        row_sum = np.bincount(nuclei.ravel(), weights=rows.ravel(), minlength=n + 1)[1:]
    twice_sum = 2 * np.asarray(row_sum).astype(np.int64)  # sums of row indices: exact in float64
    count = np.asarray(count).astype(np.int64)
    return (twice_sum >= (2 * row0 - 1) * count) & (twice_sum < (2 * row1 - 1) * count)


def segment_in_bands(od: np.ndarray, stain_od: np.ndarray, params: DetectionParams, n_bands: int, *,
                     gpu: bool = False) -> Segmentation:
    """:func:`segment_cells` in ``n_bands`` bands of rows, segmented in parallel threads.

    Each band is segmented with ``params.context_um()`` of rows above and below
    (the reach of every step, as for slide tiles) and keeps the cells whose
    nucleus centroid lies in its own rows; those cells are written, whole, into
    the region's label images. Detection is translation invariant, so the
    result is the one-band result, label for label. The compiled kernels and
    most of numpy and scipy.ndimage release the GIL, so bands run side by side.
    """
    from concurrent.futures import ThreadPoolExecutor

    H, W = od.shape[:2]
    pad = params.context_px()
    edges = np.linspace(0, H, n_bands + 1).round().astype(int)

    def band(i):
        y0, y1 = int(edges[i]), int(edges[i + 1])
        p0, p1 = max(0, y0 - pad), min(H, y1 + pad)
        seg = _segment_whole(od[p0:p1], stain_od[p0:p1], params, gpu=gpu)
        owned = _owned(seg.nuclei, seg.n_cells, y0 - p0, y1 - p0)
        return p0, y0, y1, seg, owned, (p0 * W + _first_pixel_index(seg.nuclei, seg.n_cells))[owned]

    with ThreadPoolExecutor(max_workers=n_bands, thread_name_prefix="ihcscore-band") as pool:
        parts = list(pool.map(band, range(n_bands)))
        # Number the kept cells of all bands in raster order of their first pixel (as one band would)
        # and write them into the region's images, band by band in parallel (their pixels are disjoint).
        first = [part[-1] for part in parts]
        rank = np.empty(sum(len(f) for f in first), dtype=np.int32)
        rank[np.argsort(np.concatenate(first), kind="stable")] = np.arange(1, len(rank) + 1, dtype=np.int32)
        out = {name: np.zeros((H, W), dtype=np.int32) for name in _LABEL_IMAGES}
        measure = np.empty((H, W), dtype=np.float32)
        starts = np.cumsum([0] + [len(f) for f in first])

        def write(i):
            p0, y0, y1, seg, owned, _ = parts[i]
            lut = np.zeros(seg.n_cells + 1, dtype=np.int32)
            lut[1:][owned] = rank[starts[i]:starts[i + 1]]
            for name in _LABEL_IMAGES:
                src = getattr(seg, name)
                dst = out[name][p0:p0 + src.shape[0]]
                if _k:
                    _k.paste_labels(src, lut, dst)
                else:
                    lab = lut[src]
                    np.copyto(dst, lab, where=lab > 0)
            measure[y0:y1] = seg.extra["measure_image"][y0 - p0:y1 - p0]

        list(pool.map(write, range(n_bands)))
    return Segmentation(**out, pixel_size_um=params.pixel_size_um, extra={"measure_image": measure})
