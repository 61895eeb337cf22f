"""Compiled (numba) kernels for the engine's hot path.

Each kernel has the same semantics as the scipy / scikit-image function it
replaces; ``tests/test_kernels.py`` checks them against those functions.

- :func:`bounded_reconstruction_dilation`: reconstruction by dilation (8-connectivity)
  limited to ``n_steps`` synchronous 3x3 geodesic steps, so a result depends only on
  pixels within ``n_steps`` (translation invariant, seam-free tiles); with enough steps
  it equals ``skimage.morphology.reconstruction(seed, mask, method="dilation")``. The
  steps run pipelined through cache-sized row buffers (temporal blocking), each with
  the operations of a whole-image step, so the values are exactly the iterated ones.
- :func:`h_maxima` = ``skimage.morphology.h_maxima`` (same float32/float64
  "resolution" shift, same ``residue >= h`` test), returns ``bool``; with ``mask``,
  ``h_maxima(x, h) & mask``. It never builds the reconstruction: a 3x3 bound rejects
  most pixels, flood fills decide the remaining (nearly) local maxima exactly.
- :func:`watershed_components` = ``skimage.segmentation.watershed(image, markers,
  mask=mask, watershed_line=...)`` with connectivity 1, flooding each connected
  component of the mask alone: scikit-image 0.26's (value, age) pop order, so labels
  are identical except where markers of different labels have exactly equal values
  (taken in raster order here) and their floods meet at equal values. Components come
  from runs (:func:`label`'s union-find); a component with one label is filled without
  a flood; the flood's heap holds order-preserving integer keys (value and age in one
  word for float32 images without a line, whose flood tests neighbours and makes keys
  without branches). Images must not contain NaN.
- :func:`distance_transform_edt` (per foreground run of a row, the minimum over the
  run's columns and the two background pixels that end it; exact squared distances,
  so ``sqrt`` gives scipy's values bit for bit in float64) and
  :func:`expand_labels` (nearest label within a distance; equal ties may pick a
  different label than scipy's feature transform; small distances scan the column
  offsets instead of building parabola envelopes, with the same choice).
- :func:`squared_edt`: the exact int64 squared distances behind them (also used by
  :func:`membrane_ring` and :func:`binary_dilation_disk`).
- :func:`label` = ``scipy.ndimage.label`` (2-D, connectivity 1 or 2), the same numbering.
- :func:`find_inner_boundaries` = ``find_boundaries(labels, mode="inner")``;
  :func:`membrane_ring` = pixels of a label within ``width`` of such a boundary
  pixel (what ``distance_transform_edt(~boundary) < width`` gives), by a stencil.
- :func:`label_stats` = one pass count/sum/sum of squares/min/max per label
  (:func:`label_stats_many`: of several label images over the same images at once);
  :func:`bincount_sum`, :func:`shape_sums`: ``np.bincount`` sums in one pass (bit-identical).
- :func:`gaussian_filter` = ``scipy.ndimage.gaussian_filter`` ("nearest"/"reflect",
  2-D float), bit-identical; both passes in one sweep over the rows.
- :func:`correlate3x3` = ``scipy.ndimage.correlate`` with 3x3 weights ("nearest"/"reflect",
  2-D float), bit-identical (scipy's float64 accumulation order).
- :func:`grey_erosion_sequence` = ``skimage.morphology.erosion(image,
  footprint_sequence)`` for sequences of 3x3 footprints ("reflect" borders); all
  erosions in one sweep over the rows (rolling 3-row buffers per stage).
- :func:`binary_erosion_3x3`, :func:`binary_dilation_3x3` = ``ndi.binary_erosion`` /
  ``ndi.binary_dilation`` with ``structure=np.ones((3, 3))`` (``border_value=0``).
- :func:`binary_dilation_disk`, :func:`fill_holes`: exact replacements for
  ``ndi.binary_dilation(x, structure=disk)`` and ``ndi.binary_fill_holes``.
- :func:`first_pixel_index`: raster index of each label's first pixel (the order
  ``scipy.ndimage.label`` numbers components in); :func:`label_boxes`: each label's
  ``ndi.find_objects`` bounds; :func:`paste_labels`: relabelled
  objects written into a larger label image; :func:`apply_lut` = ``lut[labels]``.
- :func:`label_contours`: the longest ``skimage.measure.find_contours`` contour (level 0.5)
  of each object's 1-pixel-padded mask, identical (same vertices, order, start point and
  choice among several contours): marching squares over the object's box with skimage's
  segment order, assembled as skimage's ``_assemble_contours`` does, with vertex-indexed
  arrays and linked vertex lists instead of dicts and deques. :func:`contour_points`: their
  level-0 ``(x, y)``.
- :func:`simplify_rings` = ``shapely.simplify(shapely.linearrings(ring), tolerance,
  preserve_topology=False)`` for many closed rings, bit-identical (GEOS 3.14's
  Douglas-Peucker: ``Distance::pointToSegment`` operation for operation, the first farthest
  point, a ring's start point dropped when within the tolerance of its neighbours' segment),
  leaving out rings that collapse below 4 vertices (GEOS gives a LineString).
- :func:`resample_rgb` = ``affine_transform(gaussian_filter(src, ((s-1)/2, (s-1)/2, 0),
  mode="nearest"), [s, s], offset, order=1, mode="nearest")`` per channel of a uint8 image,
  bit-identical (scipy 1.17's ``zoom_shift`` weights and its index clamping), smoothing only
  the source rows the bilinear samples read (radius 1 and 2, i.e. scales below 2.25, in one
  pass per element; larger radii tap by tap over L1-sized column blocks); :func:`bin_mean_uint8`:
  integer block means.

All kernels are ``@njit(cache=True, nogil=True)``: the first call in a fresh
environment compiles them (see ``benchmarks/bench_engine.py``; about half a minute),
later processes load them from numba's cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

__all__ = [
    "bounded_reconstruction_dilation",
    "h_maxima",
    "watershed_components",
    "distance_transform_edt",
    "squared_edt",
    "expand_labels",
    "label",
    "find_inner_boundaries",
    "membrane_ring",
    "label_stats",
    "label_stats_many",
    "bincount_sum",
    "shape_sums",
    "gaussian_filter",
    "correlate3x3",
    "grey_erosion_sequence",
    "binary_erosion_3x3",
    "binary_dilation_3x3",
    "binary_dilation_disk",
    "fill_holes",
    "first_pixel_index",
    "label_boxes",
    "paste_labels",
    "apply_lut",
    "label_contours",
    "contour_points",
    "simplify_rings",
    "rgb_to_od",
    "resample_rgb",
    "bin_mean_uint8",
    "warm_up",
]

_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def _grow_arr(a, cap):
    new = np.empty(cap, dtype=a.dtype)
    new[:a.size] = a
    return new


# --------------------------------------------------------------------------- reconstruction

def _float_dtype(dtype):
    return np.float32 if np.dtype(dtype) in (np.float16, np.float32, np.uint8, np.int8, np.uint16,
                                             np.int16, np.bool_) else np.float64


@njit(**_JIT)
def _max3_into(a, s, d, n):
    """``a[d + i] = max(a[s + i], a[s + i + 1], a[s + i + 2])`` for ``i < n`` (disjoint ranges).

    Offsets are ``uint64``: numba then skips its negative-index wraparound, which would
    keep these loops from vectorising (4-10x slower).
    """
    for i in range(uint64(0), n):
        x = a[s + i]
        y = a[s + i + uint64(1)]
        z = a[s + i + uint64(2)]
        x = x if x > y else y
        a[d + i] = x if x > z else z


@njit(**_JIT)
def _bounded_reconstruction_pass(src, mask, T, first, out, buf, Ws):
    """``T`` synchronous (Jacobi) steps ``J <- min(dilate3x3(J), mask)`` from ``src`` into ``out``.

    ``src``, ``mask`` and ``out`` are 2-D; with ``first``, step 0 is ``min(src, mask)``, otherwise
    ``src`` itself. The steps are pipelined (temporal blocking): within a strip of ``Ws`` output
    columns, level ``k`` (the image after ``k`` steps) computes its rows ``R`` at a time, one row
    behind level ``k - 1``, from the row maxima (``max`` of columns c-1, c, c+1) of level
    ``k - 1``'s last ``R + 2`` rows, held in ring buffers in ``buf`` (``T`` levels x ``R + 2``
    slots x ``Ws + 2T`` columns, then a ``-inf`` row and a row for the level's new row). So every
    step reads and writes cache-resident rows instead of the whole image; level ``k`` covers
    ``T - k`` extra columns on each side of the strip, all that level ``T`` depends on. The
    operations and their order are those of a whole-image step, so the values are identical.
    """
    H, W = mask.shape
    R = _REC_BATCH
    NS = R + 2
    Wb = Ws + 2 * T
    srcf = src.reshape(src.size)
    maskf = mask.reshape(mask.size)
    outf = out.reshape(out.size)
    ninf_o = uint64(T * NS * Wb)
    v_o = ninf_o + uint64(Wb)
    buf[ninf_o:v_o] = -np.inf
    for c0 in range(0, W, Ws):
        c1 = min(c0 + Ws, W)
        base = c0 - T               # buffer column 0 is image column base
        for t in range((H + T + R - 1) // R + 1):
            for k in range(T + 1):
                r0 = max(0, t * R - k)
                r1 = min(H, t * R - k + R)
                if r0 >= r1:
                    continue
                lo = max(0, c0 - (T - k))
                hi = min(W, c1 + (T - k))
                n = uint64(hi - lo)
                lb = uint64(lo - base)
                for r in range(r0, r1):
                    mo = uint64(r * W + lo)
                    if k == 0:
                        vo = v_o + lb
                        if first:
                            for i in range(uint64(0), n):
                                s = srcf[mo + i]
                                m = maskf[mo + i]
                                buf[vo + i] = s if s < m else m
                        else:
                            for i in range(uint64(0), n):
                                buf[vo + i] = srcf[mo + i]
                    else:
                        rk = (k - 1) * NS
                        po = uint64((rk + (r - 1) % NS) * Wb) + lb if r > 0 else ninf_o + lb
                        co = uint64((rk + r % NS) * Wb) + lb
                        no = uint64((rk + (r + 1) % NS) * Wb) + lb if r + 1 < H else ninf_o + lb
                        if k == T:
                            dst = outf
                            do = mo
                        else:
                            dst = buf
                            do = v_o + lb
                        for i in range(uint64(0), n):
                            a = buf[po + i]
                            b = buf[co + i]
                            d = buf[no + i]
                            a = a if a > b else b
                            a = a if a > d else d
                            m = maskf[mo + i]
                            dst[do + i] = a if a < m else m
                    if k == T:
                        continue
                    # row maxima of the new row, over the columns level k + 1 covers;
                    # outside the image counts as -inf (the image edges as before: max of two)
                    ho = uint64((k * NS + r % NS) * Wb)
                    if W == 1:
                        buf[ho + uint64(-base)] = buf[v_o + uint64(-base)]
                        continue
                    h0 = lo + 1
                    h1 = hi - 1
                    if lo == 0:
                        x = buf[v_o + uint64(-base)]
                        y = buf[v_o + uint64(1 - base)]
                        buf[ho + uint64(-base)] = x if x > y else y
                        h0 = 1
                    if hi == W:
                        x = buf[v_o + uint64(W - 1 - base)]
                        y = buf[v_o + uint64(W - 2 - base)]
                        buf[ho + uint64(W - 1 - base)] = x if x > y else y
                        h1 = W - 1
                    if h1 > h0:
                        _max3_into(buf, v_o + uint64(h0 - 1 - base), ho + uint64(h0 - base), uint64(h1 - h0))


#: rows a level computes at a time in :func:`_bounded_reconstruction_pass`
_REC_BATCH = 2
#: steps pipelined in one pass over the image, and output columns per strip
_REC_LEVELS = 64
_REC_STRIP = 1024


def bounded_reconstruction_dilation(seed: np.ndarray, mask: np.ndarray, n_steps: int) -> np.ndarray:
    """Reconstruction by dilation limited to ``n_steps`` geodesic steps (8-connectivity, 2-D).

    Each step is one 3x3 dilation of the current image clipped to ``mask``; after ``n_steps`` steps a
    value has travelled at most ``n_steps`` pixels. Equals the full reconstruction wherever it would
    settle within that distance; unlike it, the result at a pixel depends only on pixels within
    ``n_steps`` (plus the seed's own support), which is what makes tiled results seam-free.
    Up to 64 steps run in one cache-blocked pass over the image; more steps take further passes,
    stopping early once a pass changes nothing (the steps only ever raise values, so that is the
    fixpoint).
    """
    if seed.shape != mask.shape or seed.ndim != 2:
        raise ValueError("seed and mask must be 2-D arrays of the same shape")
    dt = _float_dtype(mask.dtype)
    s = np.ascontiguousarray(seed, dtype=dt)
    m = np.ascontiguousarray(mask, dtype=dt)
    if s.size == 0 or n_steps <= 0:
        return np.minimum(s, m)
    n_steps = int(n_steps)
    W = m.shape[1]
    n_strips = -(-W // _REC_STRIP)
    Ws = -(-W // n_strips)
    T = min(n_steps, _REC_LEVELS)
    buf = np.empty((T * (_REC_BATCH + 2) + 2) * (Ws + 2 * T), dt)
    out = np.empty(m.shape, dt)
    _bounded_reconstruction_pass(s, m, T, True, out, buf, Ws)
    done = T
    prev = np.empty_like(out) if done < n_steps else None
    while done < n_steps:
        t = min(T, n_steps - done)
        prev, out = out, prev
        _bounded_reconstruction_pass(prev, m, t, False, out, buf, Ws)
        done += t
        if done < n_steps and np.array_equal(out, prev):
            break
    return out


def h_maxima(image: np.ndarray, h: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Maxima of height >= ``h`` (8-connectivity), like ``skimage.morphology.h_maxima``.

    skimage reconstructs (by dilation) the shifted image ``shift(x) = x - h - 2 *
    finfo(dtype).resolution * |x|`` (2e-6 relative for float32, 2e-15 for float64) under
    the image and keeps the pixels where ``image - reconstruction >= h``. This decides that
    test pixel by pixel, with the same arithmetic in the same dtype, so the result is
    identical, without computing the reconstruction everywhere:

    - one vectorised pass rejects every pixel whose 3x3 window already lifts the
      reconstruction too high (it is at least ``min(max of shift over the window, x)``);
      what is left are (nearly) local maxima;
    - a candidate on a plateau (equal 8-neighbours) whose plateau was already reached earlier
      in raster order takes that plateau's answer;
    - the other candidates are decided by flood fills (see :func:`_hmax_floods`), first in
      raster order with a small budget, then the rest highest first; what a flood learns
      decides later candidates it reached.

    Parameters
    ----------
    image : (M, N) float32 or float64 ndarray
    h : float
        Minimal height, ``> 0``.
    mask : (M, N) bool ndarray, optional
        Only pixels inside the mask are evaluated and can be ``True``
        (``h_maxima(image, h, mask) == h_maxima(image, h) & mask``; heights are still
        measured over the whole image).

    Returns
    -------
    (M, N) bool ndarray (skimage: ``uint8``).

    Notes
    -----
    skimage turns ``+inf`` into a NaN seed (``inf - inf``) and then fails (garbage or a
    crash); here such a pixel's seed is ``+inf`` (what the NaN-tolerant comparisons of the
    reconstruction this replaced made of it): ``+-inf`` pixels and the neighbours of ``+inf``
    pixels are never maxima.
    """
    image = np.asarray(image)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError("mask must have the image's shape")
    if image.size == 0:
        return np.zeros(image.shape, dtype=bool)
    if h == 0:
        raise ValueError("h = 0 is ambiguous, use skimage.morphology.local_maxima() instead?")
    if h < 0:
        raise ValueError("h must be positive")
    if image.dtype not in (np.float32, np.float64):
        raise TypeError("h_maxima: float32 or float64 images only")
    if image.ndim != 2:
        raise ValueError("h_maxima: 2-D images only")
    image = np.ascontiguousarray(image)
    dt = image.dtype.type
    h_in = h
    h = dt(h)
    two_res = dt(2 * np.finfo(image.dtype).resolution)
    # full-size buffers from numpy, not numba's allocator; both are written sparsely
    out = np.zeros(image.shape, dtype=bool)
    state = np.zeros(image.shape, dtype=np.uint8)
    m = np.ones((1, 1), dtype=bool) if mask is None else np.ascontiguousarray(mask)
    has_mask = mask is not None
    cand, derived_rows, ptp = _hmax_candidates(image, h, two_res, m, has_mask, state, out)
    if h_in > dt(ptp):  # skimage: no maxima when h exceeds np.ptp(image) (same comparison)
        return np.zeros(image.shape, dtype=bool)
    cand = cand[(state.reshape(-1)[cand] & _HM_DONE) == 0]
    if cand.size:
        # the rest highest first, which lets floods that reject a candidate mark witnesses
        cand = cand[np.argsort(-image.reshape(-1)[cand])]  # numpy's sort: several times numba's
        _hmax_decide(image, h, two_res, m, has_mask, cand, state, out)
    _hmax_derived(derived_rows, state, out)
    return out


# state bits of h_maxima's pixels
_HM_DONE = 1       # answer known: _HM_MAX
_HM_SEEN = 2       # reached by the current flood
_HM_MAX = 4
_HM_WIT = 8        # reached by a flood that found p not to be a maximum (p at least as high
#                    as every later candidate): a witness for every later candidate
_HM_CAND = 16      # candidate (flooded, or takes its plateau's answer)
_HM_DERIVED = 32   # takes the answer of its equal neighbour W, NW, N or NE (bits 6-7)
_HM_RASTER_BUDGET = 512  # pixels a flood in raster order may fill before it is left for later
_HM_RASTER_LAG = 8       # rows between finding candidates and their raster-order floods
_HM_RASTER_RUN = 32      # nor a run longer than this (most likely a wide plateau-like area)


@njit(**_JIT)
def _hmax_shift(x, h, two_res):
    """skimage's shifted value ``x - h - 2 * resolution * |x|`` (in x's dtype), at most ``x``.

    (The ``min`` only matters for ``x = +inf``: ``inf - inf`` is NaN.)
    """
    s = (x - h) - two_res * abs(x)
    return s if s <= x else x


@njit(**_JIT)
def _hmax3(a, h):
    """Row max over (c-1, c, c+1); outside the row counts as -inf."""
    W = a.size
    if W == 1:
        h[0] = a[0]
        return
    h[0] = a[0] if a[0] > a[1] else a[1]
    for c in range(1, W - 1):
        x = a[c - 1]
        y = a[c]
        z = a[c + 1]
        x = x if x > y else y
        h[c] = x if x > z else z
    h[W - 1] = a[W - 1] if a[W - 1] > a[W - 2] else a[W - 2]


@njit(**_JIT)
def _hmax_shift_row_max(a, h, two_res, s, out):
    """``out`` = row max over (c-1, c, c+1) of the shifted row (outside the row: -inf)."""
    for c in range(a.size):
        s[c] = _hmax_shift(a[c], h, two_res)
    _hmax3(s, out)


@njit(**_JIT)
def _hmax_candidates(image, h, two_res, mask, has_mask, state, out):
    """Candidates (raster order) and ``np.ptp(image)``; marks plateau followers and rejected
    plateaus in ``state``.

    Each row's candidates get a flood (:func:`_hmax_floods`) of at most _HM_RASTER_BUDGET
    pixels a few rows later, while the rows around them are still in cache; what they leave
    undecided is flooded later, highest first.

    A pixel passes when ``x - min(3x3 max of shift, x) >= h`` (a lower bound of the
    reconstruction; NaN for x = +-inf fails). A passing pixel in the mask with an equal earlier
    neighbour (W, NW, N, NE: same plateau, same answer) that failed (or was itself ruled out)
    is ruled out; with one that is a candidate it follows it (_HM_DERIVED, resolved in raster
    order after the floods); otherwise it is returned to be flooded.
    """
    H, W = image.shape
    ninf = image.dtype.type(-np.inf)
    f = image.reshape(-1)
    of = out.reshape(-1)
    sf = state.reshape(-1)
    mf = mask.reshape(-1)
    # room for any flood within the budget
    stack = np.empty(6 * W + 12 * _HM_RASTER_BUDGET + 64, np.int64)
    runs = np.empty(2 * _HM_RASTER_BUDGET + 64, np.int64)
    st = np.zeros(4, np.int64)
    budget = np.int64(_HM_RASTER_BUDGET)  # (a plain constant would compile a literal-typed variant)
    row_end = np.zeros(H, np.int64)  # candidates of rows <= r: cand[:row_end[r]]
    s = np.empty(W, image.dtype)
    up = np.full(W, ninf, image.dtype)
    cur = np.empty(W, image.dtype)
    down = np.empty(W, image.dtype)
    ok = np.zeros(W, np.bool_)
    okp = np.zeros(W, np.bool_)  # the previous row's ok
    nw = (W + 7) // 8
    sel = np.zeros(8 * nw, np.bool_)  # ok and in the mask, read 8 at a time
    selw = sel.view(np.uint64)
    cols = np.empty(W, np.int64)
    derived_rows = np.zeros(H, np.bool_)
    cand = np.empty(max(1024, W), np.int64)
    nc = 0
    _hmax_shift_row_max(image[0], h, two_res, s, cur)
    colmin = image[0].copy()  # per column (a reduction would not vectorise)
    colmax = image[0].copy()
    for r in range(H):
        if r + 1 < H:
            _hmax_shift_row_max(image[r + 1], h, two_res, s, down)
        else:
            down[:] = ninf
        row = image[r]
        for c in range(W):
            a = up[c]
            b = cur[c]
            d = down[c]
            a = a if a > b else b
            a = a if a > d else d
            x = row[c]
            a = a if a < x else x
            ok[c] = (x - a) >= h
            y = colmin[c]
            colmin[c] = y if y < x else x
            y = colmax[c]
            colmax[c] = y if y > x else x
        base = r * W
        if has_mask:
            mrow = mask[r]
            for c in range(W):
                sel[c] = ok[c] & mrow[c]
        else:
            sel[:W] = ok
        k = 0
        for j in range(nw):
            if selw[j]:
                for c in range(8 * j, 8 * j + 8):
                    if sel[c]:
                        cols[k] = c
                        k += 1
        if nc + k > cand.size:
            cand = _grow_arr(cand, 2 * (nc + k))
        nc = _hmax_row_candidates(image, r, cols, k, ok, okp, sf, cand, nc, derived_rows)
        row_end[r] = nc
        if r >= _HM_RASTER_LAG:
            _hmax_floods(f, W, H, h, two_res, sf, mf, has_mask, of, cand, row_end[r - _HM_RASTER_LAG],
                         budget, stack, runs, st)
        up, cur, down = cur, down, up
        ok, okp = okp, ok
    _hmax_floods(f, W, H, h, two_res, sf, mf, has_mask, of, cand, np.int64(nc), budget, stack, runs, st)
    return cand[:nc], derived_rows, colmax.max() - colmin.min()


@njit(**_JIT)
def _hmax_row_candidates(image, r, cols, k, ok, okp, sf, cand, nc, derived_rows):
    H, W = image.shape
    row = image[r]
    base = r * W
    for j in range(k):
        c = cols[j]
        if sf[base + c] & _HM_DONE:  # decided by a flood
            sf[base + c] |= _HM_CAND
            continue
        v = row[c]
        drop = False
        parent = -1
        for d in range(4):  # W, NW, N, NE
            if d == 0:
                if c == 0 or row[c - 1] != v:
                    continue
                good = ok[c - 1]
                q = base + c - 1
            else:
                cq = c + d - 2
                if r == 0 or cq < 0 or cq >= W or image[r - 1, cq] != v:
                    continue
                good = okp[cq]
                q = base - W + cq
            if not good or sf[q] & _HM_DONE:  # (q decided a maximum would have p decided too)
                drop = True
                break
            if parent < 0 and sf[q] & _HM_CAND:
                parent = d
        if drop:
            sf[base + c] |= _HM_DONE
        elif parent >= 0:
            sf[base + c] |= _HM_CAND | _HM_DERIVED | (parent << 6)
            derived_rows[r] = True
        else:
            sf[base + c] |= _HM_CAND
            cand[nc] = base + c
            nc += 1
    return nc


@njit(**_JIT)
def _hmax_decide(image, h, two_res, mask, has_mask, cand, state, out):
    """Flood the candidates, highest first (see :func:`_hmax_floods`)."""
    H, W = image.shape
    f = image.reshape(-1)
    of = out.reshape(-1)
    sf = state.reshape(-1)
    mf = mask.reshape(-1)
    stack = np.empty(12 * W + 64, np.int64)
    runs = np.empty(4096, np.int64)
    st = np.zeros(4, np.int64)
    while _hmax_floods(f, W, H, h, two_res, sf, mf, has_mask, of, cand, cand.size, np.int64(-1), stack, runs,
                       st):
        if st[1] + 6 * W + 24 > stack.size:
            stack = _grow_arr(stack, 2 * stack.size)
        if st[2] + 2 > runs.size:
            runs = _grow_arr(runs, 2 * runs.size)


@njit(**_JIT)
def _hmax_derived(derived_rows, state, out):
    """Plateau followers take their (earlier) neighbour's answer, in raster order."""
    H, W = state.shape
    sf = state.reshape(-1)
    of = out.reshape(-1)
    for r in range(H):
        if not derived_rows[r]:
            continue
        for t in range(r * W, (r + 1) * W):
            x = sf[t]
            if x & _HM_DERIVED:
                d = x >> 6
                q = t - 1 if d == 0 else t - W + d - 2
                if sf[q] & _HM_MAX:
                    sf[t] = x | _HM_DONE | _HM_MAX
                    of[t] = True
                else:
                    sf[t] = x | _HM_DONE


@njit(**_JIT)
def _hmax_floods(f, W, H, h, two_res, sf, mf, has_mask, of, cand, end, budget, stack, runs, st):
    """Decide the candidates ``cand`` (highest first) by scan-line flood fills.

    With R(p) = max over pixels w and 8-paths w -> p of ``min(shift(w), min of f on the
    path)``, p (value v) is not a maximum iff ``v - R(p) < h``; subtraction is monotone, so
    that holds iff a path from p over "inside" pixels z (``v - f(z) < h``) reaches a
    witness: a pixel w with ``v - shift(w) < h``, a pixel u with ``f(u) >= v`` known not to
    be a maximum (its own witness serves p), or a pixel marked _HM_WIT. A flood fills p's
    inside component (marking _HM_SEEN, recording runs ``[runs[2i], runs[2i+1]]``) until it
    meets a witness. Then:

    - p not a maximum: every pixel reached reaches p's witness too, so those not above p
      are not maxima; with the candidates in decreasing order (``budget < 0``), as no later
      candidate is higher than p, every pixel reached is a witness for all of them (_HM_WIT);
    - p a maximum: pixels of value v reached have p's inside component and answer; lower
      ones for which p is a witness (``f - shift(v) < h``) are not maxima.

    With ``budget >= 0`` a flood that fills more pixels is abandoned (the candidate stays
    undecided, also when its buffers are too small. Otherwise resumable: ``st`` = [next
    candidate, stack size, runs length, pixels filled]; returns True when ``stack`` needs
    ``6 W + 24`` free entries (seeds are triples) or ``runs`` 2 (grow them and call
    again), False when all are decided.
    """
    i = st[0]
    n = st[1]
    nr = st[2]
    filled = st[3]
    ordered = budget < 0
    while True:
        if n == 0:
            while i < end and sf[cand[i]] & (_HM_DONE | _HM_WIT):
                i += 1
            if i == end:
                st[0] = i
                st[1] = 0
                return False
            stack[0] = cand[i]
            stack[1] = -1
            stack[2] = -1
            n = 3
            nr = 0
            filled = 0
        v = f[cand[i]]
        res = True
        while n > 0:
            if n + 6 * W + 24 > stack.size or nr + 2 > runs.size:
                if not ordered:  # no growing in the raster pass: leave it for later
                    filled = budget + 1
                    break
                st[0] = i
                st[1] = n
                st[2] = nr
                st[3] = filled
                return True
            # a seed, and the span of the run (in the row above or below) that pushed it
            n -= 3
            q = stack[n]
            pl = stack[n + 1]
            pr = stack[n + 2]
            if sf[q] & _HM_SEEN:
                continue
            r = q // W
            base = r * W
            # (a flood with a budget stops extending a run at lim pixels)
            lim = W if ordered else min(budget - filled, _HM_RASTER_RUN)
            cl = q - base
            while cl > 0:
                t = base + cl - 1
                if sf[t] & _HM_SEEN or not (v - f[t] < h):
                    break
                cl -= 1
                if q - base - cl >= lim:
                    break
            cr = q - base
            while cr < W - 1:
                t = base + cr + 1
                if sf[t] & _HM_SEEN or not (v - f[t] < h):
                    break
                cr += 1
                if cr - cl >= lim:
                    break
            if not ordered and (filled + cr - cl >= budget or cr - cl + 1 >= _HM_RASTER_RUN):
                filled = budget + 1
                break
            for t in range(base + cl, base + cr + 1):
                x = f[t]
                y = sf[t]
                if (v - _hmax_shift(x, h, two_res) < h or y & _HM_WIT
                        or (x >= v and y & (_HM_DONE | _HM_MAX) == _HM_DONE)):
                    res = False
                    cr = t - 1 - base
                    break
                sf[t] = y | _HM_SEEN
            if cr >= cl:
                runs[nr] = base + cl
                runs[nr + 1] = base + cr
                nr += 2
                filled += cr - cl + 1
            if not res:
                break
            a = cl - 1 if cl > 0 else 0
            b = cr + 1 if cr < W - 1 else W - 1
            pr_row = pl // W if pl >= 0 else -1
            for rr in range(r - 1, r + 2, 2):
                if rr < 0 or rr >= H:
                    continue
                lo = rr * W + a
                hi = rr * W + b
                # the pushing run's span there is all seen: scan only what sticks out of it
                for seg in range(2):
                    if rr != pr_row:
                        s0 = lo if seg == 0 else hi + 1
                        s1 = hi
                    elif seg == 0:
                        s0 = lo
                        s1 = min(hi, pl - 1)
                    else:
                        s0 = max(lo, pr + 1)
                        s1 = hi
                    prev = False
                    for t in range(s0, s1 + 1):
                        good = not (sf[t] & _HM_SEEN) and v - f[t] < h
                        if good and not prev:
                            stack[n] = t
                            stack[n + 1] = base + cl
                            stack[n + 2] = base + cr
                            n += 3
                        prev = good
        if not ordered and filled > budget:  # abandoned
            for j in range(0, nr, 2):
                for t in range(runs[j], runs[j + 1] + 1):
                    sf[t] ^= _HM_SEEN
        elif res:
            sp = _hmax_shift(v, h, two_res)
            for j in range(0, nr, 2):
                for t in range(runs[j], runs[j + 1] + 1):
                    x = f[t]
                    y = sf[t] ^ _HM_SEEN
                    if x == v:
                        y |= _HM_DONE | _HM_MAX
                        of[t] = not has_mask or mf[t]
                    elif x < v and x - sp < h:
                        y |= _HM_DONE
                    sf[t] = y
        elif ordered:
            for j in range(0, nr, 2):
                for t in range(runs[j], runs[j + 1] + 1):
                    sf[t] = (sf[t] ^ _HM_SEEN) | _HM_WIT
        else:
            for j in range(0, nr, 2):
                for t in range(runs[j], runs[j + 1] + 1):
                    y = sf[t] ^ _HM_SEEN
                    if f[t] <= v:
                        y |= _HM_DONE
                    sf[t] = y
        n = 0
        i += 1


# --------------------------------------------------------------------------- watershed by components

@njit(**_JIT)
def _ws_key(bits, q, top, full, neg):
    """Order-preserving unsigned key of pixel ``q``'s value, negated when ``neg``.

    ``bits`` is the float image viewed as unsigned integers of its width, ``top`` that
    width's sign bit, ``full`` all its bits. Keys compare as the floats do, -0.0 equal
    to 0.0 (NaN is not supported).
    """
    b = np.uint64(bits[q])
    if neg:
        b ^= top
    if b == top:
        b = np.uint64(0)
    if b & top:
        return b ^ full
    return b | top


@njit(**_JIT)
def _ws_push(hk, ha, n, k, a):
    """Min-heap push of key ``k`` with age ``a`` (ages break ties)."""
    i = n
    while i > 0:
        par = (i - 1) >> 1
        pk = hk[par]
        if k < pk or (k == pk and a < ha[par]):
            hk[i] = pk
            ha[i] = ha[par]
            i = par
        else:
            break
    hk[i] = k
    ha[i] = a


@njit(**_JIT)
def _ws_down(hk, ha, n, k, a):
    """Put (``k``, ``a``) in the vacant root of a heap of ``n`` entries and sift it down."""
    i = 0
    while True:
        l = 2 * i + 1
        if l >= n:
            break
        r = l + 1
        if r < n:
            kr = hk[r]
            kl = hk[l]
            if kr < kl or (kr == kl and ha[r] < ha[l]):
                l = r
        kl = hk[l]
        if kl < k or (kl == k and ha[l] < a):
            hk[i] = kl
            ha[i] = ha[l]
            i = l
        else:
            break
    hk[i] = k
    ha[i] = a


@njit(**_JIT)
def _ws_push1(hk, n, k):
    """Push of a one-word (unique) key on a 4-ary min-heap."""
    i = n
    while i > 0:
        par = (i - 1) >> 2
        pk = hk[par]
        if k < pk:
            hk[i] = pk
            i = par
        else:
            break
    hk[i] = k


@njit(**_JIT)
def _ws_down1(hk, n, k):
    """Put one-word key ``k`` in the vacant root of a 4-ary heap of ``n`` entries, bottom-up:
    the hole goes down the smallest children to a leaf (branch-free choice; ``hk[n:n + 4]``
    are set to the maximum key as sentinels, so the array needs four spare entries), then
    ``k`` sifts up from there."""
    big = np.uint64(0xFFFFFFFFFFFFFFFF)
    hk[n] = big
    hk[n + 1] = big
    hk[n + 2] = big
    hk[n + 3] = big
    i = 0
    l = 1
    while l < n:
        a = l + (hk[l + 1] < hk[l])
        b = l + 2 + (hk[l + 3] < hk[l + 2])
        l = b if hk[b] < hk[a] else a
        hk[i] = hk[l]
        i = l
        l = 4 * i + 1
    _ws_push1(hk, i, k)


@njit(**_JIT)
def _cc_flood(bits, outf, wf, H, W, wsl, nmk, hk, ha, ap, al, st, top, full, neg):
    """Flood one component from the heap (resumable: ``st`` = [heap size, next age]).

    Returns 1 when the arrays must grow before the next pop (then call again), 0 when done.
    skimage's rules: pop in (value, age) order; a neighbour's value is never below its
    parent's; with ``wsl`` pixels are labelled when popped and one touching another
    label becomes a line; markers are the entries with age < ``nmk``.
    The heap holds only keys (``hk``: value key, and age in ``ha``; float32 images without
    a line use :func:`_cc_flood_packed`); an entry's pixel is ``ap[age]``, its label
    ``al[age]`` with ``wsl``, else the pixel's own (labels are set at push). The popped
    root is replaced by the first neighbour pushed (one sift instead of two). ``wf``:
    bit 0 = in the mask (not a line), bit 1 = first column, bit 2 = last column (no
    division for the borders).
    """
    n = st[0]
    age = st[1]
    n_px = H * W
    status = 0
    while n > 0:
        if n + 5 > hk.size or age + 4 > ap.size:
            status = 1
            break
        ev = hk[0]
        ea = ha[0]
        hole = True  # the root is taken; the first push fills it
        p = ap[ea]
        f = wf[p]
        up = p >= W
        down = p + W < n_px
        left = (f & 2) == 0
        right = (f & 4) == 0
        skip = False
        if wsl:
            lab = al[ea]
            if outf[p] != 0 and ea >= nmk:
                skip = True  # already labelled from another neighbour
            elif (f & 1) == 0 or (up and (wf[p - W] & 1) != 0 and outf[p - W] != 0 and outf[p - W] != lab) \
                    or (left and (wf[p - 1] & 1) != 0 and outf[p - 1] != 0 and outf[p - 1] != lab) \
                    or (right and (wf[p + 1] & 1) != 0 and outf[p + 1] != 0 and outf[p + 1] != lab) \
                    or (down and (wf[p + W] & 1) != 0 and outf[p + W] != 0 and outf[p + W] != lab):
                wf[p] = f & 6  # a line pixel
            else:
                outf[p] = lab
        else:
            lab = outf[p]
        if not skip:
            for k in range(4):
                if k == 0:
                    if not up:
                        continue
                    q = p - W
                elif k == 1:
                    if not left:
                        continue
                    q = p - 1
                elif k == 2:
                    if not right:
                        continue
                    q = p + 1
                else:
                    if not down:
                        continue
                    q = p + W
                if (wf[q] & 1) == 0 or outf[q] != 0:
                    continue
                v = _ws_key(bits, q, top, full, neg)
                if v < ev:
                    v = ev
                if wsl:
                    al[age] = lab
                else:
                    outf[q] = lab
                ap[age] = q
                if hole:
                    _ws_down(hk, ha, n, v, age)
                else:
                    _ws_push(hk, ha, n, v, age)
                if hole:
                    hole = False
                else:
                    n += 1
                age += 1
        if hole:
            n -= 1
            if n > 0:
                _ws_down(hk, ha, n, hk[n], ha[n])
    st[0] = n
    st[1] = age
    return status


@njit(**_JIT)
def _cc_flood_packed(bits, outf, wf, W, n_px, neg, hk, ap, n, age):
    """:func:`_cc_flood` for float32 images without a line: one-word keys
    (value key << 32 | age), labels set at push, ``wf`` bit 0 = in the mask and not yet
    labelled (markers cleared). ``hk`` and ``ap`` hold every pixel of the component plus
    eight entries, so they never grow. The four neighbour tests and the key are
    branch-free (those branches are unpredictable); ``p`` is the pixel itself
    (never free) where a neighbour is off the image, and unsigned indices skip numba's
    negative-index checks.
    """
    lo = np.uint64(0xFFFFFFFF)
    s32 = np.uint64(32)
    top = np.uint64(0x80000000)
    flip = np.uint64(0x80000000) if neg else np.uint64(0)
    one = np.uint8(1)
    uW = np.uint64(W)
    un = np.uint64(n_px)
    cand = np.empty(4, dtype=np.uint64)
    while n > 0:
        ek = hk[0]
        ev = ek >> s32
        p = np.uint64(ap[ek & lo])
        f = wf[p]
        lab = outf[p]
        qu = p - uW if p >= uW else p
        ql = p if f & 2 else p - np.uint64(1)
        qr = p if f & 4 else p + np.uint64(1)
        qd = p + uW if p + uW < un else p
        m = np.uint64(0)
        cand[m] = qu
        m += np.uint64(wf[qu] & one)
        cand[m] = ql
        m += np.uint64(wf[ql] & one)
        cand[m] = qr
        m += np.uint64(wf[qr] & one)
        cand[m] = qd
        m += np.uint64(wf[qd] & one)
        if m == 0:
            n -= 1
            if n > 0:
                _ws_down1(hk, n, hk[n])
            continue
        for i in range(m):
            q = cand[i]
            wf[q] &= np.uint8(0xFE)
            outf[q] = lab
            ap[age] = q
            b = np.uint64(bits[q]) ^ flip
            b = np.uint64(0) if b == top else b  # -0.0 as 0.0
            v = b ^ (((np.uint64(0) - (b >> np.uint64(31))) & lo) | top)
            v = ev if v < ev else v
            k = (v << s32) | np.uint64(age)
            if i == 0:
                _ws_down1(hk, n, k)  # the first push fills the popped root
            else:
                _ws_push1(hk, n, k)
                n += 1
            age += 1


@njit(**_JIT)
def _watershed_cc(bits, out, work, wsl, neg, top, full, packed, rstart, rc0, rc1, parent):
    """Seeded watershed (4-connectivity) one connected component of the mask at a time.

    ``bits`` is the image viewed as unsigned integers (see :func:`_ws_key`; ``packed``
    when value keys fit 32 bits and ages 32 bits: :func:`_cc_flood_packed`); ``out`` holds
    the markers (0 outside the mask) and receives the labels; ``work`` is the mask as
    :func:`_cc_prepare` makes it (line pixels, and with ``packed`` labelled pixels, lose
    bit 0). ``rstart``, ``rc0``, ``rc1``, ``parent``: room for the mask's runs
    (:func:`_run_components`). Components of the mask never interact in the flood, so
    each is flooded alone with a heap that stays small (in cache). A component with
    markers of at most one label is that label (or 0) entirely, filled run by run. The
    pop order inside a component is (value, age) with markers aged in raster order: the
    same as one (value, age) flood of the whole image with raster-ordered markers.
    """
    H, W = out.shape
    bf = bits.ravel()
    outf = out.ravel()
    wf = work.ravel()
    nr, nc = _run_components(work, 0, rstart, rc0, rc1, parent)
    size = np.zeros(nc + 1, dtype=np.int64)
    nmk = np.zeros(nc + 1, dtype=np.int64)
    lab1 = np.zeros(nc + 1, dtype=out.dtype)
    multi = np.zeros(nc + 1, dtype=np.bool_)
    for r in range(H):
        base = r * W
        for j in range(rstart[r], rstart[r + 1]):
            k = parent[j]
            size[k] += rc1[j] - rc0[j]
            for c in range(rc0[j], rc1[j]):
                lv = outf[base + c]
                if lv != 0:
                    nmk[k] += 1
                    if lab1[k] == 0:
                        lab1[k] = lv
                    elif lv != lab1[k]:
                        multi[k] = True
    # one label: fill; several: list the markers by component, in raster order
    start = np.zeros(nc + 2, dtype=np.int64)
    for k in range(1, nc + 1):
        start[k + 1] = start[k] + (nmk[k] if multi[k] else 0)
    marks = np.empty(start[nc + 1], dtype=np.int64)
    pos = start.copy()
    for r in range(H):
        base = r * W
        for j in range(rstart[r], rstart[r + 1]):
            k = parent[j]
            if multi[k]:
                for c in range(rc0[j], rc1[j]):
                    if outf[base + c] != 0:
                        marks[pos[k]] = base + c
                        pos[k] += 1
            elif lab1[k] != 0:
                lv = lab1[k]
                orow = out[r]
                for c in range(rc0[j], rc1[j]):
                    orow[c] = lv
    fst = np.zeros(2, dtype=np.int64)
    cap = 1 << 12
    hk = np.empty(cap, dtype=np.uint64)
    ha = np.empty(cap, dtype=np.int64)
    ap = np.empty(cap, dtype=np.int64)
    al = np.empty(cap, dtype=out.dtype)
    for k in range(1, nc + 1):
        if not multi[k]:
            continue
        # markers first (ages 0..nmk-1); without a line every pixel gets one age, so
        # size + 8 entries never grow
        m = size[k]
        if cap < m + 8:
            while cap < m + 8:
                cap *= 2
            hk = np.empty(cap, dtype=np.uint64)
            ha = np.empty(cap, dtype=np.int64)
            ap = np.empty(cap, dtype=np.int64)
            al = np.empty(cap, dtype=out.dtype)
        n = 0
        m0 = start[k]
        for j in range(nmk[k]):
            p = marks[m0 + j]
            ap[j] = p
            al[j] = outf[p]
            v = _ws_key(bf, p, top, full, neg)
            if packed:
                _ws_push1(hk, n, (v << np.uint64(32)) | np.uint64(j))
                wf[p] &= np.uint8(0xFE)
            else:
                _ws_push(hk, ha, n, v, j)
            n += 1
        if packed:
            _cc_flood_packed(bf, outf, wf, W, H * W, neg, hk, ap, n, nmk[k])
            continue
        fst[0] = n
        fst[1] = nmk[k]
        while _cc_flood(bf, outf, wf, H, W, wsl, nmk[k], hk, ha, ap, al, fst, top, full, neg) != 0:
            cap *= 2
            hk = _grow_arr(hk, cap)
            ha = _grow_arr(ha, cap)
            ap = _grow_arr(ap, cap)
            al = _grow_arr(al, cap)


@njit(**_JIT)
def _cc_prepare(markers, mask, out, work):
    """``out`` = markers inside the mask; ``work`` = 1 inside the mask, plus 2 in the first
    and 4 in the last column (inside pixels only; see :func:`_cc_flood`)."""
    H, W = mask.shape
    for r in range(H):
        for c in range(W):
            if mask[r, c]:
                out[r, c] = markers[r, c]
                work[r, c] = 1 | (2 if c == 0 else 0) | (4 if c == W - 1 else 0)
            else:
                out[r, c] = 0
                work[r, c] = 0


def watershed_components(image: np.ndarray, markers: np.ndarray, mask: np.ndarray | None = None,
                         watershed_line: bool = False, negate: bool = False) -> np.ndarray:
    """Seeded watershed, connectivity 1, flooding each connected component of ``mask`` alone.

    ``negate=True`` floods ``-image`` (the same values, exactly: no negated copy is made).

    Identical to one flood of the whole image in (value, age) order with the markers aged
    in raster order (components never interact), so it equals
    ``skimage.segmentation.watershed(image, markers, mask=mask, watershed_line=...)``
    except where markers of different labels have exactly equal values and their
    floods meet at equal values. Components whose markers all carry one label (most
    nuclei) are filled with it without a flood, and the heap of a flooded component
    stays in cache: several times faster than a flood of the whole image.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError("watershed_components: 2-D images only")
    if image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float64)
    image = np.ascontiguousarray(image)
    H, W = image.shape
    markers = np.ascontiguousarray(markers)
    if markers.shape != (H, W):
        raise ValueError("markers must have the image's shape")
    if markers.dtype.kind not in "iu":
        raise TypeError("markers must be an integer label image")
    ldt = np.int32 if markers.dtype.itemsize <= 4 and markers.dtype != np.uint32 else np.int64
    markers = markers.astype(ldt, copy=False)
    mask = np.ones((H, W), dtype=bool) if mask is None else np.ascontiguousarray(mask, dtype=bool)
    if mask.shape != (H, W):
        raise ValueError("mask must have the image's shape")
    out = np.empty((H, W), dtype=ldt)
    work = np.empty((H, W), dtype=np.uint8)
    if out.size:
        _cc_prepare(markers, mask, out, work)
        wide = image.dtype == np.float64
        bits = image.view(np.uint64 if wide else np.uint32)
        top = np.uint64(1 << (63 if wide else 31))
        full = np.uint64((1 << (64 if wide else 32)) - 1)
        # one-word heap keys (value << 32 | age) need 32-bit values and ages; with a line a
        # pixel may be pushed more than once
        packed = not wide and not watershed_line and out.size < (1 << 32)
        cap = H * ((W + 1) // 2)  # most runs the mask can have (untouched pages cost nothing)
        runs = [np.empty(cap, dtype=np.int64) for _ in range(3)]
        _watershed_cc(bits, out, work, bool(watershed_line), bool(negate), top, full, packed,
                      np.empty(H + 1, dtype=np.int64), *runs)
    return out


# --------------------------------------------------------------------------- distance transforms

_BIG = np.int64(1) << 60


@njit(**_JIT)
def _parabola_envelope(f, limit, v, z):
    """Felzenszwalb-Huttenlocher lower envelope of the parabolas ``(x - q)**2 + f[q]`` with
    ``f[q] <= limit`` (int64 squared column distances).

    Fills ``v`` with the columns of the envelope's parabolas and ``z`` with the boundaries
    between them; returns the index of the last one (-1 when no parabola is kept).
    """
    k = -1
    for q in range(f.size):
        gq = f[q]
        if gq > limit:
            continue
        fq = gq + q * q
        while k >= 0:
            vk = v[k]
            s = ((fq - (f[vk] + vk * vk)) / (2.0 * (q - vk)))
            if s <= z[k]:
                k -= 1
            else:
                break
        k += 1
        v[k] = q
        if k == 0:
            z[k] = -np.inf
        else:
            vk = v[k - 1]
            z[k] = ((fq - (f[vk] + vk * vk)) / (2.0 * (q - vk)))
        z[k + 1] = np.inf
    return k


@njit(**_JIT)
def _edt_1d_rows(g, H, W, out, want_idx, fidx):
    """Row pass of Felzenszwalb-Huttenlocher on squared column distances ``g`` (int64, BIG = none).

    ``out`` receives squared distances (int64); with ``want_idx`` ``fidx`` holds, on
    input, the feature row for each (r, q) and, on output, the flat index of the
    nearest feature pixel (-1 if none).
    """
    v = np.empty(W, dtype=np.int64)
    z = np.empty(W + 1, dtype=np.float64)
    frow = np.empty(W, dtype=np.int64)
    for r in range(H):
        k = _parabola_envelope(g[r], _BIG - 1, v, z)
        if k < 0:
            for q in range(W):
                out[r, q] = _BIG
                if want_idx:
                    frow[q] = -1
            if want_idx:
                for q in range(W):
                    fidx[r, q] = -1
            continue
        j = 0
        for q in range(W):
            while z[j + 1] < q:
                j += 1
            vj = v[j]
            d = q - vj
            out[r, q] = g[r, vj] + d * d
            if want_idx:
                frow[q] = fidx[r, vj] * W + vj
        if want_idx:
            for q in range(W):
                fidx[r, q] = frow[q]


@njit(**_JIT)
def _edt_columns(feature, H, W, g, want_idx, fidx):
    """Squared distance along each column to the nearest feature pixel (``feature`` True).

    Row-major sweeps (down, then up) with one running "last feature row" per column.
    """
    last = np.full(W, -1, dtype=np.int64)
    for r in range(H):
        for c in range(W):
            if feature[r, c]:
                last[c] = r
                g[r, c] = 0
                if want_idx:
                    fidx[r, c] = r
            elif last[c] >= 0:
                g[r, c] = r - last[c]
                if want_idx:
                    fidx[r, c] = last[c]
            else:
                g[r, c] = _BIG
    for c in range(W):
        last[c] = -1
    for r in range(H - 1, -1, -1):
        for c in range(W):
            if feature[r, c]:
                last[c] = r
            elif last[c] >= 0:
                d = last[c] - r
                if d < g[r, c]:
                    g[r, c] = d
                    if want_idx:
                        fidx[r, c] = last[c]
            d = g[r, c]
            if d < _BIG:
                g[r, c] = d * d


@njit(**_JIT)
def _sq_edt_into(feature, want_idx, g, out, fidx):
    H, W = feature.shape
    _edt_columns(feature, H, W, g, want_idx, fidx)
    _edt_1d_rows(g, H, W, out, want_idx, fidx)


def _sq_edt(feature, want_idx):
    """Squared distances (int64) and, with ``want_idx``, nearest-feature flat indices; buffers from numpy."""
    feature = np.ascontiguousarray(feature, dtype=bool)
    H, W = feature.shape
    g = np.empty((H, W), dtype=np.int64)
    out = np.empty((H, W), dtype=np.int64)
    fidx = np.empty((H, W) if want_idx else (1, 1), dtype=np.int64)
    _sq_edt_into(feature, bool(want_idx), g, out, fidx)
    return out, fidx


@njit(**_JIT)
def _sqrt_into(d2, out):
    H, W = d2.shape
    for r in range(H):
        for c in range(W):
            out[r, c] = np.sqrt(np.float64(d2[r, c]))


def squared_edt(image: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distance (int64) of every pixel to the nearest zero of ``image``.

    Pixels with no zero in the image get ``2**60``.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError("2-D images only")
    d2, _ = _sq_edt(image == 0, False)
    return d2


#: column distances at or above this mean "no background in this column" in :func:`_edt_fg_into`
_EDT_NONE = 65535
#: runs up to this long take the brute-force minimum (vectorised) instead of the lower envelope
_EDT_BRUTE_RUN = 64


@njit(**_JIT)
def _edt_run_envelope(g, a, b, W, orow, v, f):
    """Distances of the foreground run ``[a, b)`` of a row (``g[q - a]``: squared column distance
    of column ``q``) as ``sqrt`` into ``orow``: lower envelope of parabolas (Felzenszwalb-
    Huttenlocher) of the background pixels ``a - 1`` and ``b`` (where inside the image) and the
    run's columns, in exact integer arithmetic (the intersections compared by cross-multiplying)."""
    k = -1
    if a > 0:
        k = 0
        v[0] = a - 1
        f[0] = (a - 1) * (a - 1)
    for q in range(a, b + 1 if b < W else b):
        gq = g[q - a] if q < b else 0
        if gq >= _EDT_NONE * _EDT_NONE:
            continue
        fq = gq + q * q
        while k >= 1:
            vk = v[k]
            # drop v[k] if the new parabola overtakes it no later than v[k] overtakes v[k-1]
            if (fq - f[k]) * (vk - v[k - 1]) <= (f[k] - f[k - 1]) * (q - vk):
                k -= 1
            else:
                break
        k += 1
        v[k] = q
        f[k] = fq
    j = 0
    for p in range(a, b):
        while j < k and f[j + 1] - f[j] < 2 * p * (v[j + 1] - v[j]):
            j += 1
        d = p - v[j]
        orow[p] = np.sqrt(np.float64(f[j] - v[j] * v[j] + d * d))


@njit(**_JIT)
def _edt_run_brute(g, a, b, W, orow, best):
    """:func:`_edt_run_envelope` for short runs: the minimum over all sites, in float64 (exact:
    the squared distances are integers far below 2**53)."""
    L = b - a
    BIG = np.float64(1e300)
    for i in range(L):
        x = np.float64(i + 1) if a > 0 else BIG
        y = np.float64(L - i) if b < W else BIG
        x = x if x < y else y
        best[i] = x * x
    for q in range(L):
        gq = np.float64(g[q])
        for i in range(L):
            d = np.float64(i - q)
            x = gq + d * d
            best[i] = x if x < best[i] else best[i]
    for i in range(L):
        orow[a + i] = np.sqrt(best[i])


@njit(**_JIT)
def _edt_fg_into(fg, out):
    """Exact EDT of the foreground (``fg`` True) to the nearest background pixel, as ``sqrt`` into ``out``.

    One top-down sweep. Background pixels get 0. For a foreground run ``[a, b)`` of a row, the
    background pixels ``a - 1`` and ``b`` are nearer than any column outside the run, so only the
    run's own columns are candidates: their squared distance along the column (to the last
    background above, kept per column, or the next below, found by scanning down once per
    vertical run) plus the squared column offset. The squared distances are exact integers, so
    ``sqrt`` in float64 gives scipy's value bit for bit. Needs ``H < 65535`` and a background pixel.
    """
    H, W = fg.shape
    NONE = np.int32(_EDT_NONE)
    last = np.empty(W, dtype=np.int32)      # last background row above, per column
    last[:] = -NONE
    end = np.zeros(W, dtype=np.int32)       # first background row below the current vertical run
    g = np.empty(W, dtype=np.int64)
    v = np.empty(W + 2, dtype=np.int64)
    f = np.empty(W + 2, dtype=np.int64)
    best = np.empty(_EDT_BRUTE_RUN, dtype=np.float64)
    for r in range(H):
        fr = fg[r]
        orow = out[r]
        rr = np.int32(r)
        for c in range(W):
            l = last[c]
            last[c] = l if fr[c] else rr
            orow[c] = 0.0
        c = 0
        while c < W:
            if not fr[c]:
                c += 1
                continue
            a = c
            while c < W and fr[c]:
                e = end[c]
                if e <= r:
                    e = r + 1
                    while e < H and fg[e, c]:
                        e += 1
                    if e == H:
                        e = H + NONE
                    end[c] = e
                d = r - last[c]
                e = e - r
                d = d if d < e else e
                g[c - a] = np.int64(d) * np.int64(d)
                c += 1
            if c - a <= _EDT_BRUTE_RUN:
                _edt_run_brute(g, a, c, W, orow, best)
            else:
                _edt_run_envelope(g, a, c, W, orow, v, f)


def distance_transform_edt(image: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(image)`` for 2-D images (unit sampling).

    Squared distances are exact integers, so ``dtype=np.float64`` reproduces scipy
    bit for bit and float32 is scipy's value rounded to float32. An image with no
    zero falls back to scipy (its result is then not a distance).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError("2-D images only")
    fg = image if image.dtype == np.bool_ else image != 0
    if fg.all():
        from scipy import ndimage as ndi
        return ndi.distance_transform_edt(image).astype(dtype)
    out = np.empty(image.shape, dtype=dtype)
    if image.shape[0] < _EDT_NONE and out.dtype in (np.float32, np.float64):
        _edt_fg_into(np.ascontiguousarray(fg), out)
        return out
    d2, _ = _sq_edt(~fg, False)
    _sqrt_into(d2, out)
    return out


@njit(**_JIT)
def _expand(labels, fidx, d2, max_d2, out):
    H, W = labels.shape
    for r in range(H):
        for c in range(W):
            f = fidx[r, c]
            if f >= 0 and d2[r, c] <= max_d2:
                out[r, c] = labels[f // W, f % W]
            else:
                out[r, c] = 0


@njit(**_JIT)
def _expand_columns(labels, R, dy):
    """Column pass of the bounded expansion: ``dy`` (int16) = signed row offset to the nearest
    labelled pixel in the column if within ``R`` (ties: up), else 32767. Branch-free row loops."""
    H, W = labels.shape
    NONE = np.int16(32767)
    last = np.empty(W, dtype=np.int64)
    for c in range(W):
        last[c] = -(R + 2)
    for r in range(H):
        lr = labels[r]
        dr = dy[r]
        for c in range(W):
            l = r if lr[c] != 0 else last[c]
            last[c] = l
            d = r - l
            dr[c] = np.int16(-d) if d <= R else NONE
    for c in range(W):
        last[c] = H + R + 2
    for r in range(H - 1, -1, -1):
        lr = labels[r]
        dr = dy[r]
        for c in range(W):
            l = r if lr[c] != 0 else last[c]
            last[c] = l
            d = l - r
            cur = dr[c]
            dr[c] = np.int16(d) if d <= R and (cur == NONE or d < -cur) else cur


@njit(**_JIT)
def _expand_near(labels, R, max_d2, out, dy):
    """Row pass of the bounded expansion for small ``R``: each pixel takes the nearest of the
    column pass's candidates at column offsets ``-R..R`` (smallest column on ties, as the
    envelope of :func:`_expand_bounded` does), by whole-row loops over the offsets (vectorised,
    int16: squared distances up to ``2 * R**2`` must stay below 16384).
    """
    H, W = labels.shape
    NONE = np.int16(32767)
    BIG = np.int16(16384)
    G = np.empty(W, dtype=np.int16)
    best = np.empty(W, dtype=np.int16)
    bdx = np.empty(W, dtype=np.int16)
    lc = np.empty(W, dtype=labels.dtype)
    lf = labels.ravel()
    for r in range(H):
        dr = dy[r]
        for c in range(W):
            d = dr[c]
            G[c] = d * d if d != NONE else BIG
        best[:] = BIG
        bdx[:] = 0
        for dx in range(-R, R + 1):
            d2 = np.int16(dx * dx)
            ddx = np.int16(dx)
            c0 = max(0, -dx)
            c1 = min(W, W - dx)
            # slices, not shifted indices: only then does the loop vectorise
            gs = G[c0 + dx:c1 + dx]
            bs = best[c0:c1]
            ds = bdx[c0:c1]
            for i in range(c1 - c0):
                g = np.int16(gs[i] + d2)
                lt = g < bs[i]
                bs[i] = g if lt else bs[i]
                ds[i] = ddx if lt else ds[i]
        # the candidate's label in each column, then the chosen one's: branch-free gathers
        # (unsigned indices: no negative-index wraparound code, so they vectorise)
        base = r * W
        for c in range(W):
            d = dr[c]
            lc[c] = lf[np.uint64(base + (d if d != NONE else 0) * W + c)]
        orow = out[r]
        for c in range(W):
            v = lc[np.uint64(c + bdx[c])]
            orow[c] = v if best[c] <= max_d2 else 0


@njit(**_JIT)
def _expand_bounded(labels, R, max_d2, out, dy):
    """Nearest label within ``sqrt(max_d2)`` (``R = floor(sqrt(max_d2))``), no full distance maps.

    The same choice as the feature transform of :func:`_sq_edt_into` followed by :func:`_expand`:
    the Felzenszwalb-Huttenlocher envelope picks, among the nearest feature pixels, the one in the
    smallest column, and the column pass the upper of two equidistant rows. Column pass
    (:func:`_expand_columns`) into ``dy``, then the row pass: the lower envelope of only the
    parabolas with ``dy**2 <= max_d2`` (those can never win within ``max_d2``; dropping them does
    not change which of the tied minimal parabolas the envelope keeps: the one with the smallest column).
    """
    H, W = labels.shape
    NONE = np.int16(32767)
    _expand_columns(labels, R, dy)
    v = np.empty(W, dtype=np.int64)
    z = np.empty(W + 1, dtype=np.float64)
    f = np.empty(W, dtype=np.int64)
    for r in range(H):
        dr = dy[r]
        orow = out[r]
        for q in range(W):
            dq = np.int64(dr[q])
            f[q] = max_d2 + 1 if dq == NONE else dq * dq
        k = _parabola_envelope(f, max_d2, v, z)
        if k < 0:
            for q in range(W):
                orow[q] = 0
            continue
        j = 0
        for q in range(W):
            while z[j + 1] < q:
                j += 1
            vj = v[j]
            dj = np.int64(dr[vj])
            d = q - vj
            if dj * dj + d * d <= max_d2:
                orow[q] = labels[r + dj, vj]
            else:
                orow[q] = 0


#: Up to this reach (px) the expansion's row pass scans the 2R + 1 column offsets (cost ~R) instead
#: of building parabola envelopes.
_EXPAND_NEAR_MAX_R = 24  # (int16 sums in _expand_near: 2 * 24**2 + 24**2 < 16384)


def expand_labels(labels: np.ndarray, distance: float = 1) -> np.ndarray:
    """Grow labels by ``distance`` px without overlap: each background pixel takes the
    label of its nearest labelled pixel if that is at most ``distance`` away.

    Same as ``skimage.segmentation.expand_labels`` except where two labels are at
    exactly the same distance (the tie may be broken differently: here the nearest
    labelled pixel in the smallest column, then the smallest row).
    Only distances up to ``distance`` are searched (a bounded column pass in int16
    and an envelope of the near parabolas): no full-size int64 distance or index maps.
    """
    labels = np.ascontiguousarray(labels)
    if labels.ndim != 2:
        raise ValueError("2-D images only")
    # distance (float64, like scipy) <= distance  <=>  d2 <= the largest integer whose sqrt is <= it
    max_d2 = _max_sq_within(distance, strict=False)
    out = np.empty_like(labels)
    if max_d2 < 0:
        out[...] = 0
        return out
    R = int(np.floor(np.sqrt(max_d2)))
    while (R + 1) * (R + 1) <= max_d2:
        R += 1
    while R * R > max_d2:
        R -= 1
    if R > 30000:
        return _expand_labels_ft(labels, distance)
    if labels.size:
        dy = np.empty(labels.shape, dtype=np.int16)
        if R <= _EXPAND_NEAR_MAX_R:
            _expand_columns(labels, R, dy)
            _expand_near(labels, R, max_d2, out, dy)
        else:
            _expand_bounded(labels, R, max_d2, out, dy)
    return out


def _expand_labels_ft(labels: np.ndarray, distance: float = 1) -> np.ndarray:
    """:func:`expand_labels` through the full feature transform (reference for the tests)."""
    labels = np.ascontiguousarray(labels)
    d2, fidx = _sq_edt(labels != 0, True)
    max_d2 = _max_sq_within(distance, strict=False)
    out = np.empty_like(labels)
    _expand(labels, fidx, d2, max_d2, out)
    return out


def _max_sq_within(distance: float, strict: bool) -> int:
    """Largest integer ``k`` with ``sqrt(k) <= distance`` (``< distance`` when strict), -1 if none."""
    if not distance >= 0:
        return -1
    k = int(np.floor(float(distance) ** 2)) + 2
    while k >= 0:
        s = np.sqrt(np.float64(k))
        if (s < distance) if strict else (s <= distance):
            return k
        k -= 1
    return -1


# --------------------------------------------------------------------------- connected components

@njit(**_JIT)
def _uf_find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(**_JIT)
def _run_components(img, d, rstart, rc0, rc1, parent):
    """Connected components of ``img`` (nonzero pixels) by runs.

    Runs of row ``r`` are ``rstart[r]..rstart[r + 1] - 1``, run ``j`` spans columns
    ``rc0[j]..rc1[j] - 1``; the runs of each row are joined by union-find to the runs of the
    row above that they touch (``d`` = 0: 4-connectivity, 1: 8-connectivity). A component's
    root is its first run, so numbering roots in run order numbers components in raster
    order of their first pixel, as ``scipy.ndimage.label`` does. On return ``parent[j]`` is
    the component (1..n) of run ``j``. Returns (number of runs, n).
    """
    H, W = img.shape
    nr = 0
    for r in range(H):
        row = img[r]
        rstart[r] = nr
        c = 0
        while c < W:
            if not row[c]:
                c += 1
                continue
            c0 = c
            while c < W and row[c]:
                c += 1
            rc0[nr] = c0
            rc1[nr] = c
            parent[nr] = nr
            nr += 1
    rstart[H] = nr
    _join_runs(H, d, rstart, rc0, rc1, parent)
    n = 0
    for j in range(nr):
        p = parent[j]
        if p == j:
            n += 1
            parent[j] = n
        else:
            parent[j] = parent[p]  # p < j is already its root's component
    return nr, n


@njit(**_JIT)
def _join_runs(H, d, rstart, rc0, rc1, parent):
    """Union-find of each row's runs with the runs of the row above that they touch
    (see :func:`_run_components`); a root is always the smallest run of its set."""
    for r in range(1, H):
        k = rstart[r - 1]
        kend = rstart[r]
        for j in range(rstart[r], rstart[r + 1]):
            c0 = rc0[j]
            c1 = rc1[j]
            while k < kend and rc1[k] + d <= c0:
                k += 1
            m = k
            while m < kend and rc0[m] < c1 + d:
                a = _uf_find(parent, m)
                b = _uf_find(parent, j)
                if a < b:
                    parent[b] = a
                elif b < a:
                    parent[a] = b
                m += 1


@njit(**_JIT)
def _label_runs(img, d, rstart, rc0, rc1, parent, out):
    """:func:`_run_components`, written into ``out`` (zeros); returns the count."""
    H, W = img.shape
    nr, n = _run_components(img, d, rstart, rc0, rc1, parent)
    for r in range(H):
        orow = out[r]
        for j in range(rstart[r], rstart[r + 1]):
            lab = parent[j]
            for c in range(rc0[j], rc1[j]):
                orow[c] = lab
    return n


def label(image: np.ndarray, connectivity: int = 1):
    """``scipy.ndimage.label(image, structure)`` of a 2-D image with the cross (``connectivity=1``)
    or the 3x3 square (``connectivity=2``) structure: the same int32 labels, numbered in raster
    order of each component's first pixel, and their count. Releases the GIL.
    """
    image = np.ascontiguousarray(image, dtype=bool)
    if image.ndim != 2:
        raise ValueError("2-D images only")
    if connectivity not in (1, 2):
        raise ValueError("connectivity must be 1 or 2")
    H, W = image.shape
    out = np.zeros((H, W), dtype=np.int32)
    if out.size == 0:
        return out, 0
    cap = H * ((W + 1) // 2)  # most runs an image can have (untouched pages cost nothing)
    rc0 = np.empty(cap, dtype=np.int64)
    rc1 = np.empty(cap, dtype=np.int64)
    parent = np.empty(cap, dtype=np.int64)
    n = _label_runs(image, connectivity - 1, np.empty(H + 1, dtype=np.int64), rc0, rc1, parent, out)
    return out, int(n)


# --------------------------------------------------------------------------- boundaries, membrane

@njit(**_JIT)
def _inner_boundaries(lab, out):
    H, W = lab.shape
    for r in range(H):
        for c in range(W):
            v = lab[r, c]
            b = False
            if v != 0:
                if r > 0 and lab[r - 1, c] != v:
                    b = True
                elif r < H - 1 and lab[r + 1, c] != v:
                    b = True
                elif c > 0 and lab[r, c - 1] != v:
                    b = True
                elif c < W - 1 and lab[r, c + 1] != v:
                    b = True
            out[r, c] = b


def find_inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.find_boundaries(labels, mode="inner")`` (connectivity 1)."""
    labels = np.ascontiguousarray(labels)
    out = np.empty(labels.shape, dtype=bool)
    _inner_boundaries(labels, out)
    return out


@njit(**_JIT)
def _ring(lab, bnd, dys, dxs, out):
    """``out`` = ``lab`` where a ``bnd`` pixel lies at one of the offsets (``dys``, ``dxs``), else 0.

    Row by row: the boundary rows at each offset are OR-ed into a row buffer over whole rows
    (branch-free, vectorised), then the labels are masked with it.
    """
    H, W = lab.shape
    K = dys.size
    hit = np.empty(W, dtype=np.uint8)
    for r in range(H):
        hit[:] = 0
        for k in range(K):
            rr = r + dys[k]
            if rr < 0 or rr >= H:
                continue
            dx = dxs[k]
            c0 = max(0, -dx)
            c1 = min(W, W - dx)
            # slices, not shifted indices: only then does the loop vectorise (10x)
            h = hit[c0:c1]
            b = bnd[rr, c0 + dx:c1 + dx]
            for c in range(c1 - c0):
                h[c] |= b[c]
        lr = lab[r]
        orow = out[r]
        for c in range(W):
            orow[c] = lr[c] if hit[c] else 0


def membrane_ring(labels: np.ndarray, width: float) -> np.ndarray:
    """Label pixels within ``width`` px (strictly less) of an inner-boundary pixel, 0 elsewhere.

    Equal to ``np.where((labels > 0) & (distance_transform_edt(~find_boundaries(labels,
    mode="inner")) < width), labels, 0)``.
    """
    labels = np.ascontiguousarray(labels)
    bnd = find_inner_boundaries(labels)
    kmax = _max_sq_within(width, strict=True)
    out = np.empty_like(labels)
    if kmax < 0:
        out[...] = 0
        return out
    r = int(np.floor(np.sqrt(kmax)))
    if (2 * r + 1) ** 2 > 121:
        # Wide rings: a distance transform is cheaper than a large stencil.
        d2 = squared_edt(~bnd)
        return np.where((labels != 0) & (d2 <= kmax), labels, 0).astype(labels.dtype)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    sel = (dy * dy + dx * dx) <= kmax
    _ring(labels, bnd.view(np.uint8), dy[sel].astype(np.int64), dx[sel].astype(np.int64), out)
    return out


# --------------------------------------------------------------------------- label statistics

@njit(**_JIT)
def _run_stats(row, c, j, acc, l, i, k):
    """Statistics of ``row[c:j]`` added to ``acc[l, i, k]`` in pixel order."""
    s = acc[l, i, k, 0]
    s2 = acc[l, i, k, 1]
    mn = acc[l, i, k, 2]
    mx = acc[l, i, k, 3]
    for x in range(c, j):
        v = np.float64(row[x])
        s += v
        s2 += v * v
        mn = v if v < mn else mn
        mx = v if v > mx else mx
    acc[l, i, k, 0] = s
    acc[l, i, k, 1] = s2
    acc[l, i, k, 2] = mn
    acc[l, i, k, 3] = mx


@njit(**_JIT)
def _run_stats2(ra, rb, c, j, acc, l, i, k):
    """:func:`_run_stats` of two images (``k``, ``k + 1``) at once: twice the independent
    additions in flight (the sums are latency-bound)."""
    s = acc[l, i, k, 0]
    s2 = acc[l, i, k, 1]
    mn = acc[l, i, k, 2]
    mx = acc[l, i, k, 3]
    t = acc[l, i, k + 1, 0]
    t2 = acc[l, i, k + 1, 1]
    tn = acc[l, i, k + 1, 2]
    tx = acc[l, i, k + 1, 3]
    for x in range(c, j):
        v = np.float64(ra[x])
        w = np.float64(rb[x])
        s += v
        s2 += v * v
        mn = v if v < mn else mn
        mx = v if v > mx else mx
        t += w
        t2 += w * w
        tn = w if w < tn else tn
        tx = w if w > tx else tx
    acc[l, i, k, 0] = s
    acc[l, i, k, 1] = s2
    acc[l, i, k, 2] = mn
    acc[l, i, k, 3] = mx
    acc[l, i, k + 1, 0] = t
    acc[l, i, k + 1, 1] = t2
    acc[l, i, k + 1, 2] = tn
    acc[l, i, k + 1, 3] = tx


@njit(**_JIT)
def _label_stats(labels, images, n, count, acc):
    """Row by row, each label image in turn, a run of one label at a time.

    ``acc[l, i, k]`` = (sum, sum of squares, min, max) of image ``k`` in label ``i + 1`` of
    label image ``l``. A run's statistics accumulate in registers in pixel order: the same
    additions in the same order as per pixel, so sums stay bit-identical to ``np.bincount``.
    The images' row stays in cache while every label image reads it. (Unsigned column
    indices: no negative-index code in the scans.)
    """
    L = len(labels)
    K = len(images)
    H, W = labels[0].shape
    Wu = np.uint64(W)
    one = np.uint64(1)
    for r in range(H):
        for l in range(L):
            lr = labels[l][r]
            c = np.uint64(0)
            while c < Wu:
                lab = lr[c]
                if lab <= 0 or lab > n:
                    c += one
                    continue
                j = c + one
                while j < Wu and lr[j] == lab:
                    j += one
                i = lab - 1
                count[l, i] += np.int64(j - c)
                for k in range(0, K - 1, 2):
                    _run_stats2(images[k][r], images[k + 1][r], c, j, acc, l, i, k)
                if K % 2:
                    _run_stats(images[K - 1][r], c, j, acc, l, i, K - 1)
                c = j


def label_stats(labels: np.ndarray, images, n: int):
    """Per-label count, sum, sum of squares, min and max of several images in one pass.

    Parameters
    ----------
    labels : (M, N) int array, labels ``1..n`` (others ignored)
    images : (K, M, N) array or sequence of (M, N) arrays
    n : int

    Returns
    -------
    count : (n,) int64; ``sum``, ``sumsq``, ``min``, ``max`` : (K, n) float64
    (min/max are NaN for empty labels). Sums accumulate in raster order in float64,
    like ``np.bincount(labels, weights=...)``, so they are bit-identical to it.
    """
    return label_stats_many([labels], images, n)[0]


def label_stats_many(label_images, images, n: int):
    """:func:`label_stats` of several label images (e.g. a cell's compartments) over the same
    images, in one pass over the images. Returns one ``(count, sum, sumsq, min, max)`` per label image.
    """
    labs = [np.ascontiguousarray(x) for x in label_images]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = list(images)
    ims = [np.asarray(im) for im in images]
    shape = labs[0].shape if labs else None
    if labs and labs[0].ndim != 2 or any(x.shape != shape for x in labs):
        raise ValueError("label images must be 2-D arrays of one shape")
    if any(im.shape != shape for im in ims):
        raise ValueError("images must have the labels' shape")
    # one dtype for each tuple the kernel receives; views (e.g. stain_od[..., 1]) are not copied
    dt = np.result_type(*[im.dtype for im in ims]) if ims else np.float64
    stack = tuple(im if im.dtype == dt else im.astype(dt) for im in ims)
    ldt = np.result_type(*[x.dtype for x in labs]) if labs else np.int32
    labs = tuple(x if x.dtype == ldt else x.astype(ldt) for x in labs)
    L, K = len(labs), len(stack)
    count = np.zeros((L, n), dtype=np.int64)
    acc = np.zeros((L, n, K, 4))
    acc[..., 2] = np.inf
    acc[..., 3] = -np.inf
    if n > 0 and K > 0 and L > 0 and labs[0].size:
        _label_stats(labs, stack, n, count, acc)
    empty = count == 0
    acc[empty, :, 2:] = np.nan
    return [(count[l], *(np.ascontiguousarray(acc[l, :, :, j].T) for j in range(4))) for l in range(L)]


@njit(**_JIT)
def _bincount_sum(labels, weights, counts, sums):
    """Runs of one label are summed in registers (the same additions in the same order as a
    per-pixel ``sums[lab] += w``, without a store-to-load dependency per pixel)."""
    lf = labels.ravel()
    wf = weights.ravel()
    n = counts.size
    N = lf.size
    i = 0
    while i < N:
        lab = lf[i]
        if lab < 0 or lab >= n:
            return False
        acc = sums[lab]
        j = i
        while j < N and lf[j] == lab:
            acc += np.float64(wf[j])
            j += 1
        sums[lab] = acc
        counts[lab] += j - i
        i = j
    return True


def bincount_sum(labels: np.ndarray, weights: np.ndarray, n: int):
    """``np.bincount(labels.ravel(), minlength=n + 1)`` and the same with ``weights``, in one pass.

    Labels must lie in ``0..n`` (otherwise numpy is used). The sums accumulate in float64 in
    raster order, like ``np.bincount``: bit-identical.
    """
    labels = np.ascontiguousarray(labels)
    weights = np.ascontiguousarray(weights)
    if labels.shape != weights.shape:
        raise ValueError("labels and weights must have the same shape")
    counts = np.zeros(n + 1, dtype=np.intp)
    sums = np.zeros(n + 1, dtype=np.float64)
    if labels.size and not _bincount_sum(labels, weights, counts, sums):
        return (np.bincount(labels.ravel(), minlength=n + 1),
                np.bincount(labels.ravel(), weights=weights.ravel(), minlength=n + 1))
    return counts, sums



@njit(**_JIT)
def _shape_sums(lab, count, raw, edges):
    H, W = lab.shape
    n = count.size
    for r in range(H):
        fr = np.float64(r)
        for c in range(W):
            v = lab[r, c]
            if v <= 0 or v > n:
                continue
            i = v - 1
            fc = np.float64(c)
            count[i] += 1
            raw[0, i] += fr
            raw[1, i] += fc
            raw[2, i] += fr * fr
            raw[3, i] += fc * fc
            raw[4, i] += fr * fc
            e = 0
            if r == 0 or lab[r - 1, c] != v:
                e += 1
            if r == H - 1 or lab[r + 1, c] != v:
                e += 1
            if c == 0 or lab[r, c - 1] != v:
                e += 1
            if c == W - 1 or lab[r, c + 1] != v:
                e += 1
            edges[i] += e


def shape_sums(labels: np.ndarray, n: int):
    """Per label ``1..n``: pixel count, sums of row, col, row², col², row·col, and boundary edges.

    One pass instead of six ``np.bincount`` calls over index images; sums accumulate in
    float64 in raster order like ``np.bincount(labels, weights=rows)`` (bit-identical).
    ``edges`` counts 4-neighbour sides facing another label, background or the image border.

    Returns
    -------
    count : (n,) int64; raw : (5, n) float64 (r, c, rr, cc, rc); edges : (n,) float64
    """
    labels = np.ascontiguousarray(labels)
    if labels.ndim != 2:
        raise ValueError("2-D label images only")
    count = np.zeros(n, dtype=np.int64)
    raw = np.zeros((5, n))
    edges = np.zeros(n)
    if n > 0 and labels.size:
        _shape_sums(labels, count, raw, edges)
    return count, raw, edges



# --------------------------------------------------------------------------- Gaussian filter

@njit(**_JIT)
def _ext_index(i, n, reflect):
    """Index of the extended line: "nearest" clamps, "reflect" mirrors (d c b a | a b c d | d c b a)."""
    if reflect:
        m = 2 * n
        i = i % m
        if i < 0:
            i += m
        return i if i < n else m - 1 - i
    return 0 if i < 0 else (n - 1 if i >= n else i)


@njit(**_JIT)
def _gauss_rows(src, dst, w, reflect, acc, row, buf):
    """scipy's two symmetric ``correlate1d`` passes (axis 0, then axis 1), one output row at a time.

    Both passes go tap by tap over a whole row (``acc``, float64), so they vectorise
    across columns; per pixel they make scipy's C loop's float64 operations in its
    order (``acc = x[i]*w0``, then ``acc += (x[i-k] + x[i+k]) * w_k`` for k = r..1),
    and the axis-0 result is rounded to the image dtype (``row``) before the axis-1
    pass, as scipy's intermediate array is: bit-identical. The axis-1 pass reads the
    row through the extended line ``buf``; its taps are slices so that the index
    arithmetic needs no negative-index wraparound and the loops vectorise.
    ``dst`` must not share memory with ``src``.
    """
    H, W = src.shape
    r1 = w.size - 1
    w0 = w[0]
    mid = buf[r1:r1 + W]
    for r in range(H):
        s0 = src[r]
        for c in range(W):
            acc[c] = np.float64(s0[c]) * w0
        for k in range(r1, 0, -1):
            a = src[_ext_index(r - k, H, reflect)]
            b = src[_ext_index(r + k, H, reflect)]
            wk = w[k]
            for c in range(W):
                acc[c] += (np.float64(a[c]) + np.float64(b[c])) * wk
        for c in range(W):
            row[c] = acc[c]
        for i in range(r1):
            buf[i] = row[_ext_index(i - r1, W, reflect)]
            buf[W + r1 + i] = row[_ext_index(W + i, W, reflect)]
        for c in range(W):
            mid[c] = row[c]
        for c in range(W):
            acc[c] = mid[c] * w0
        for k in range(r1, 0, -1):
            wk = w[k]
            lo = buf[r1 - k:r1 - k + W]
            hi = buf[r1 + k:r1 + k + W]
            for c in range(W):
                acc[c] += (lo[c] + hi[c]) * wk
        d = dst[r]
        for c in range(W):
            d[c] = acc[c]


def gaussian_filter(image: np.ndarray, sigma: float, mode: str = "reflect", truncate: float = 4.0) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, sigma, mode=mode, truncate=truncate)`` for 2-D float32/float64
    images and ``mode`` "nearest" or "reflect": the same weights, the same float64 arithmetic in the
    same order, the intermediate rounded to the image dtype after the axis-0 pass: bit-identical
    (scipy's x86-64 wheels do not fuse multiply-adds; numba does not either without fastmath).
    Other inputs go to scipy.
    """
    from scipy import ndimage as ndi
    image = np.asarray(image)
    sd = float(sigma)
    if image.ndim != 2 or image.dtype not in (np.float32, np.float64) or mode not in ("nearest", "reflect") \
            or not sd > 1e-15 or image.size == 0:
        return ndi.gaussian_filter(image, sigma, mode=mode, truncate=truncate)
    from scipy.ndimage._filters import _gaussian_kernel1d
    lw = int(truncate * sd + 0.5)
    fw = _gaussian_kernel1d(sd, 0, lw)[::-1]  # what gaussian_filter1d hands to correlate1d
    w = np.ascontiguousarray(fw[lw::-1])      # w[k] = fw[lw - k]: scipy's fw[jj] for jj = -k
    image = np.ascontiguousarray(image)
    W = image.shape[1]
    out = np.empty_like(image)
    _gauss_rows(image, out, w, mode == "reflect", np.empty(W), np.empty(W, image.dtype),
                np.empty(W + 2 * (w.size - 1)))
    return out


# --------------------------------------------------------------------------- 3x3 correlation

@njit(**_JIT)
def _correlate3x3(src, dys, dxs, ws, out, acc):
    """scipy's ``NI_Correlate`` for taps ``(dys, dxs, ws)`` within 3x3, "nearest" borders.

    Per pixel ``acc = 0.0``, then ``acc += x * w`` tap by tap in the order given, in
    float64, rounded to the output dtype at the end (scipy's order, so bit-identical);
    tap by tap over a whole row, through slices (no negative-index wraparound: vectorised).
    """
    H, W = src.shape
    for r in range(H):
        for c in range(W):
            acc[c] = 0.0
        for k in range(ws.size):
            s = src[min(max(r + dys[k], 0), H - 1)]
            o = dxs[k]
            wk = ws[k]
            if W > 2:
                ss = s[1 + o:W - 1 + o]
                aa = acc[1:W - 1]
                for c in range(W - 2):
                    aa[c] += np.float64(ss[c]) * wk
            acc[0] += np.float64(s[min(max(o, 0), W - 1)]) * wk
            if W > 1:
                acc[W - 1] += np.float64(s[min(max(W - 1 + o, 0), W - 1)]) * wk
        d = out[r]
        for c in range(W):
            d[c] = acc[c]


def correlate3x3(image: np.ndarray, weights: np.ndarray, mode: str = "nearest") -> np.ndarray:
    """``scipy.ndimage.correlate(image, weights, mode=mode)`` for 2-D float32/float64 images, 3x3
    ``weights`` and ``mode`` "nearest" or "reflect" (the same for a 3x3 window), bit-identical.

    As scipy: weights in float64, those with ``|w| <= DBL_EPSILON`` left out, the others summed
    in raster order. ``ndi.convolve(image, w)`` is ``correlate3x3(image, w[::-1, ::-1])``.
    Other inputs go to scipy.
    """
    from scipy import ndimage as ndi
    image = np.asarray(image)
    w = np.asarray(weights)
    if image.ndim != 2 or image.dtype not in (np.float32, np.float64) or w.shape != (3, 3) \
            or w.dtype.kind == "c" or mode not in ("nearest", "reflect"):
        return ndi.correlate(image, weights, mode=mode)
    w = w.astype(np.float64)
    dys, dxs = np.nonzero(np.abs(w) > np.finfo(np.float64).eps)
    image = np.ascontiguousarray(image)
    out = np.empty_like(image)
    if image.size:
        _correlate3x3(image, dys - 1, dxs - 1, w[dys, dxs], out, np.empty(image.shape[1]))
    return out


# --------------------------------------------------------------------------- grey / binary morphology

@njit(**_JIT)
def _erode_row(up, mid, down, dys, dxs, K, square, tmp, d):
    """One output row of a 3x3 grey erosion from input rows ``up, mid, down`` (edges clamped).

    As ``ndi.grey_erosion`` (what ``skimage.morphology.erosion`` calls): a full ``square`` is
    two ``minimum_filter1d`` passes (axis 0, then axis 1; of equal values the last is kept),
    another footprint the minimum over its ``K`` taps in raster order, starting from the
    first (``<``: of equal values the first is kept; this only tells -0.0 from 0.0).
    Interior columns tap by tap through slices (vectorised).
    """
    W = d.size
    if square:
        for c in range(W):
            m = up[c]
            a = mid[c]
            m = a if a <= m else m
            a = down[c]
            tmp[c] = a if a <= m else m
        if W > 2:
            t0 = tmp[0:W - 2]
            t1 = tmp[1:W - 1]
            t2 = tmp[2:W]
            dd = d[1:W - 1]
            for c in range(W - 2):
                m = t0[c]
                a = t1[c]
                m = a if a <= m else m
                a = t2[c]
                dd[c] = a if a <= m else m
        for c in (0, W - 1):
            m = tmp[max(c - 1, 0)]
            a = tmp[c]
            m = a if a <= m else m
            a = tmp[min(c + 1, W - 1)]
            d[c] = a if a <= m else m
        return
    if W > 2:
        dd = d[1:W - 1]
        for k in range(K):
            dy = dys[k]
            s = up if dy < 0 else (mid if dy == 0 else down)
            ss = s[1 + dxs[k]:W - 1 + dxs[k]]
            if k == 0:
                for c in range(W - 2):
                    dd[c] = ss[c]
            else:
                for c in range(W - 2):
                    a = ss[c]
                    dd[c] = a if a < dd[c] else dd[c]
    for c in (0, W - 1):
        v = mid[c]
        for k in range(K):
            dy = dys[k]
            s = up if dy < 0 else (mid if dy == 0 else down)
            a = s[min(max(c + dxs[k], 0), W - 1)]
            if k == 0 or a < v:
                v = a
        d[c] = v


@njit(**_JIT)
def _erode_stream(image, out, dys, dxs, Ks, square, ring, tmp):
    """All ``S`` erosions of a sequence in one pass over the image.

    Stage ``s`` writes its rows into a ring of 3 rows (``ring[s]``, the last stage into
    ``out``); at step ``t`` it computes its row ``t - s - 1``, whose lower neighbour the
    stage before has just computed. Each stage computes exactly what a full-image pass
    would (3x3 "reflect" borders = clamped indices), while the ring (``(S-1) * 3`` rows)
    stays in cache: the image is read and written once.
    """
    H, W = image.shape
    S = Ks.size
    for t in range(H + S):
        for s in range(S):
            r = t - s - 1
            if r < 0 or r >= H:
                continue
            ru = r - 1 if r > 0 else 0
            rd = r + 1 if r < H - 1 else H - 1
            if s == 0:
                up, mid, down = image[ru], image[r], image[rd]
            else:
                up, mid, down = ring[s - 1, ru % 3], ring[s - 1, r % 3], ring[s - 1, rd % 3]
            d = out[r] if s == S - 1 else ring[s, r % 3]
            _erode_row(up, mid, down, dys[s], dxs[s], Ks[s], square[s], tmp, d)


def grey_erosion_sequence(image: np.ndarray, footprints) -> np.ndarray:
    """``skimage.morphology.erosion(image, footprints)`` for a footprint sequence of
    ``(3x3 footprint, repeats)`` pairs (``disk(r, decomposition="sequence")``), or
    one 3x3 footprint; borders as skimage's default ``mode="reflect"``.

    Bit-identical for images without NaN (-0.0 and 0.0 kept as scipy keeps them).
    """
    image = np.ascontiguousarray(image)
    if isinstance(footprints, np.ndarray):
        footprints = [(footprints, 1)]
    stages = []
    for fp, reps in footprints:
        fp = np.asarray(fp, dtype=bool)
        if fp.shape != (3, 3):
            raise ValueError("grey_erosion_sequence: 3x3 footprints only")
        if not fp.any():
            raise ValueError("All-zero footprint is not supported.")
        stages += [fp] * int(reps)
    S = len(stages)
    if S == 0 or image.size == 0:
        return image.copy()
    dys = np.zeros((S, 9), dtype=np.int64)
    dxs = np.zeros((S, 9), dtype=np.int64)
    Ks = np.zeros(S, dtype=np.int64)
    square = np.zeros(S, dtype=bool)
    for i, fp in enumerate(stages):
        yy, xx = np.nonzero(fp)
        Ks[i] = yy.size
        dys[i, :yy.size] = yy - 1
        dxs[i, :yy.size] = xx - 1
        square[i] = fp.all()
    W = image.shape[1]
    out = np.empty_like(image)
    ring = np.empty((max(S - 1, 1), 3, W), dtype=image.dtype)
    _erode_stream(image, out, dys, dxs, Ks, square, ring, np.empty(W, dtype=image.dtype))
    return out


@njit(**_JIT)
def _binary3x3(x, out, tmp, erode):
    """3x3 square binary erosion (AND) or dilation (OR) of 0/1 ``uint8``; outside the image is 0."""
    H, W = x.shape
    for r in range(H):
        d = out[r]
        if erode and (r == 0 or r == H - 1):
            for c in range(W):
                d[c] = 0
            continue
        a = x[max(r - 1, 0)]
        b = x[r]
        e = x[min(r + 1, H - 1)]
        if erode:
            for c in range(W):
                tmp[c] = a[c] & b[c] & e[c]
        else:
            for c in range(W):
                tmp[c] = a[c] | b[c] | e[c]
        if W > 2:
            t0 = tmp[0:W - 2]
            t1 = tmp[1:W - 1]
            t2 = tmp[2:W]
            dd = d[1:W - 1]
            if erode:
                for c in range(W - 2):
                    dd[c] = t0[c] & t1[c] & t2[c]
            else:
                for c in range(W - 2):
                    dd[c] = t0[c] | t1[c] | t2[c]
        if erode:
            d[0] = 0
            d[W - 1] = 0
        else:
            d[0] = tmp[0] | tmp[min(1, W - 1)]
            d[W - 1] = tmp[W - 1] | tmp[max(W - 2, 0)]


def _binary_3x3(mask: np.ndarray, erode: bool) -> np.ndarray:
    x = np.ascontiguousarray(mask, dtype=bool)
    if x.ndim != 2:
        raise ValueError("2-D masks only")
    out = np.empty(x.shape, dtype=bool)
    if x.size:
        _binary3x3(x.view(np.uint8), out.view(np.uint8), np.empty(x.shape[1], dtype=np.uint8), erode)
    return out


def binary_erosion_3x3(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_erosion(mask, structure=np.ones((3, 3)))`` (``border_value=0``: pixels on
    the image border are ``False``)."""
    return _binary_3x3(mask, True)


def binary_dilation_3x3(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_dilation(mask, structure=np.ones((3, 3)))`` (outside the image is ``False``)."""
    return _binary_3x3(mask, False)


def binary_dilation_disk(x: np.ndarray, radius: float, eps: float = 1e-6) -> np.ndarray:
    """``ndi.binary_dilation(x, structure=disk)`` with the disk ``dy² + dx² <= radius² + eps``
    (``floor(radius)`` half-width), through an exact squared distance transform."""
    x = np.asarray(x, dtype=bool)
    if not x.any():
        return np.zeros(x.shape, dtype=bool)
    r = int(np.floor(radius))
    lim = radius * radius + eps
    # Offsets are bounded by the structure's half-width r in each axis as well.
    ks = [dy * dy + dx * dx for dy in range(-r, r + 1) for dx in range(-r, r + 1)
          if dy * dy + dx * dx <= lim]
    kmax = max(ks)
    # Exact when every offset with dy² + dx² <= kmax is in the structure (true unless the
    # radius sits within eps below an integer); otherwise use scipy.
    R = int(np.ceil(np.sqrt(kmax)))
    if any(dy * dy + dx * dx <= kmax and (abs(dy) > r or abs(dx) > r or dy * dy + dx * dx > lim)
           for dy in range(-R, R + 1) for dx in range(-R, R + 1)):
        from scipy import ndimage as ndi
        yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
        return ndi.binary_dilation(x, structure=(xx * xx + yy * yy) <= lim)
    d2 = squared_edt(~x)
    return d2 <= kmax


@njit(**_JIT)
def _fill_holes(mask, out, rstart, rc0, rc1, parent):
    """Background 4-connected components not touching the border become foreground:
    background runs joined by union-find (:func:`_join_runs`), a set touching the border
    marked at its root, the runs of the other sets filled."""
    H, W = mask.shape
    nr = 0
    for r in range(H):
        row = mask[r]
        orow = out[r]
        rstart[r] = nr
        c = 0
        while c < W:
            if row[c]:
                orow[c] = True
                c += 1
                continue
            c0 = c
            while c < W and not row[c]:
                orow[c] = False
                c += 1
            rc0[nr] = c0
            rc1[nr] = c
            parent[nr] = nr
            nr += 1
    rstart[H] = nr
    _join_runs(H, 0, rstart, rc0, rc1, parent)
    edge = np.zeros(nr, dtype=np.bool_)
    for r in range(H):
        for j in range(rstart[r], rstart[r + 1]):
            p = parent[j]
            p = parent[p]  # p <= j: its parent is already its root
            parent[j] = p
            if r == 0 or r == H - 1 or rc0[j] == 0 or rc1[j] == W:
                edge[p] = True
    for r in range(H):
        orow = out[r]
        for j in range(rstart[r], rstart[r + 1]):
            if not edge[parent[j]]:
                for c in range(rc0[j], rc1[j]):
                    orow[c] = True


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (default cross structure), 2-D."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    out = np.empty(mask.shape, dtype=bool)
    if mask.size:
        H, W = mask.shape
        cap = H * ((W + 1) // 2)  # most runs a row set can have (untouched pages cost nothing)
        _fill_holes(mask, out, np.empty(H + 1, dtype=np.int64),
                    *[np.empty(cap, dtype=np.int64) for _ in range(3)])
    return out


# --------------------------------------------------------------------------- label order

@njit(**_JIT)
def _first_pixel(labels, first):
    flat = labels.ravel()
    n = first.size
    for i in range(flat.size):
        v = flat[i]
        if 0 < v <= n and first[v - 1] < 0:
            first[v - 1] = i


def first_pixel_index(labels: np.ndarray, n: int) -> np.ndarray:
    """Flat (raster) index of the first pixel of each label ``1..n``; -1 for absent labels."""
    labels = np.ascontiguousarray(labels)
    first = np.full(int(n), -1, dtype=np.int64)
    if labels.size and n > 0:
        _first_pixel(labels, first)
    return first


@njit(**_JIT)
def _apply_lut(lut, labels, out):
    a = labels.ravel()
    o = out.ravel()
    for i in range(a.size):
        o[i] = lut[a[i]]


def apply_lut(lut: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``lut[labels]`` for a 1-D table and an integer label image whose values lie in ``[0, len(lut))``."""
    labels = np.ascontiguousarray(labels)
    lut = np.ascontiguousarray(lut)
    out = np.empty(labels.shape, dtype=lut.dtype)
    if labels.size:
        _apply_lut(lut, labels, out)
    return out


@njit(**_JIT)
def _paste(src, lut, dst):
    H, W = src.shape
    for r in range(H):
        s = src[r]
        d = dst[r]
        for c in range(W):
            v = lut[s[c]]
            if v > 0:
                d[c] = v


def paste_labels(src: np.ndarray, lut: np.ndarray, dst: np.ndarray) -> None:
    """Write the objects of ``src`` that ``lut`` maps to a label > 0 into ``dst``, relabelled, in place.

    ``np.copyto(dst, lut[src], where=lut[src] > 0)`` in one pass; ``dst`` may be a view.
    """
    if src.shape != dst.shape or src.ndim != 2:
        raise ValueError("src and dst must be 2-D arrays of the same shape")
    if src.size:
        _paste(np.ascontiguousarray(src), np.ascontiguousarray(lut, dtype=dst.dtype), dst)


# --------------------------------------------------------------------------- contours

@njit(**_JIT)
def _label_boxes(labels, n, r0, r1, c0, c1):
    """``ndi.find_objects`` bounds of labels ``1..n``, one run of equal labels at a time."""
    H, W = labels.shape
    for r in range(H):
        row = labels[r]
        c = 0
        while c < W:
            v = row[c]
            start = c
            c += 1
            if v <= 0 or v > n:
                continue
            while c < W and row[c] == v:
                c += 1
            i = v - 1
            if r0[i] < 0:
                r0[i] = r
                c0[i] = start
                c1[i] = c
            else:
                if start < c0[i]:
                    c0[i] = start
                if c > c1[i]:
                    c1[i] = c
            r1[i] = r + 1


def label_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """``ndi.find_objects`` bounds of labels ``1..n`` of a 2-D image as an ``(n, 4)`` int64 array of
    ``(row start, row stop, col start, col stop)``; -1 where a label is absent."""
    labels = np.ascontiguousarray(labels)
    box = np.full((int(n), 4), -1, dtype=np.int64)
    if labels.size and n > 0:
        _label_boxes(labels, int(n), box[:, 0], box[:, 1], box[:, 2], box[:, 3])
    return box


#: skimage's marching-squares segments (``fully_connected="low"``) of each square case (mask bits:
#: 1 top-left, 2 top-right, 4 bottom-left, 8 bottom-right), as (from, to) edge pairs in skimage's
#: order; edges 0 top, 1 left, 2 bottom, 3 right; -1: no (second) segment.
_MS_SEGMENTS = np.array([
    [-1, -1, -1, -1], [0, 1, -1, -1], [3, 0, -1, -1], [3, 1, -1, -1],
    [1, 2, -1, -1], [0, 2, -1, -1], [3, 0, 1, 2], [3, 2, -1, -1],
    [2, 3, -1, -1], [0, 1, 2, 3], [2, 0, -1, -1], [2, 1, -1, -1],
    [1, 3, -1, -1], [0, 3, -1, -1], [1, 0, -1, -1], [-1, -1, -1, -1],
], dtype=np.int64)


@njit(**_JIT)
def _ms_vertex(i, W, edge):
    """Vertex key of ``edge`` (0 top, 1 left, 2 bottom, 3 right) of the square at flat index ``i``."""
    if edge == 0:
        return 2 * i
    if edge == 1:
        return 2 * i + 1
    if edge == 2:
        return 2 * (i + W)
    return 2 * (i + 1) + 1


@njit(**_JIT)
def _object_contours(labels, ids, box, mask, start_of, end_of, node_key, node_next,
                     c_first, c_last, c_len, c_alive):
    """Longest ``find_contours`` contour of each object in ``ids`` (see :func:`label_contours`).

    Vertices are edge midpoints of the object's padded box (width ``W``), keyed
    ``2 * (r * W + c) + t``: ``t = 0`` is ``(r, c + 0.5)``, ``t = 1`` is ``(r + 0.5, c)``.
    """
    n = box.shape[0]
    found = np.empty(ids.size, np.int64)
    offsets = np.zeros(ids.size + 1, np.int64)
    coords = np.empty((1024, 2), np.float64)
    nv = 0
    k = 0
    for lab in ids:
        if lab < 1 or lab > n or box[lab - 1, 0] < 0:
            continue
        r0, r1, c0, c1 = box[lab - 1, 0], box[lab - 1, 1], box[lab - 1, 2], box[lab - 1, 3]
        H = r1 - r0 + 2
        W = c1 - c0 + 2
        for i in range(H * W):
            mask[i] = 0
        for r in range(r0, r1):
            row = labels[r]
            base = (r - r0 + 1) * W + 1 - c0
            for c in range(c0, c1):
                if row[c] == lab:
                    mask[base + c] = 1
        nn = 0  # nodes (one vertex of a contour each) and contours, in creation order
        nc = 0
        for r in range(H - 1):
            for c in range(W - 1):
                i = r * W + c
                case = mask[i] + 2 * mask[i + 1] + 4 * mask[i + W] + 8 * mask[i + W + 1]
                if case == 0 or case == 15:
                    continue
                seg = _MS_SEGMENTS[case]
                for s in range(0, 4, 2):
                    if seg[s] < 0:
                        break
                    f = _ms_vertex(i, W, seg[s])
                    t = _ms_vertex(i, W, seg[s + 1])
                    # _assemble_contours: a contour starting at ``t`` (tail) and one ending at ``f`` (head)
                    tail = start_of[t]
                    head = end_of[f]
                    start_of[t] = -1
                    end_of[f] = -1
                    if tail >= 0 and head >= 0:
                        if tail == head:  # closes the contour
                            node_key[nn] = t
                            node_next[c_last[head]] = nn
                            c_last[head] = nn
                            c_len[head] += 1
                            nn += 1
                        else:  # head + tail, kept under the older number
                            node_next[c_last[head]] = c_first[tail]
                            keep = min(head, tail)
                            drop = max(head, tail)
                            c_first[keep] = c_first[head]
                            c_last[keep] = c_last[tail]
                            c_len[keep] = c_len[head] + c_len[tail]
                            c_alive[drop] = False
                            start_of[node_key[c_first[keep]]] = keep
                            end_of[node_key[c_last[keep]]] = keep
                    elif tail < 0 and head < 0:
                        node_key[nn] = f
                        node_key[nn + 1] = t
                        node_next[nn] = nn + 1
                        c_first[nc] = nn
                        c_last[nc] = nn + 1
                        c_len[nc] = 2
                        c_alive[nc] = True
                        start_of[f] = nc
                        end_of[t] = nc
                        nn += 2
                        nc += 1
                    elif head < 0:
                        node_key[nn] = f
                        node_next[nn] = c_first[tail]
                        c_first[tail] = nn
                        c_len[tail] += 1
                        start_of[f] = tail
                        nn += 1
                    else:
                        node_key[nn] = t
                        node_next[c_last[head]] = nn
                        c_last[head] = nn
                        c_len[head] += 1
                        end_of[t] = head
                        nn += 1
        best = -1
        best_len = 0
        for j in range(nc):
            if c_alive[j]:
                if c_len[j] > best_len:  # max(contours, key=len): the first longest
                    best = j
                    best_len = c_len[j]
                # a contour left open (none are for a padded mask) must not leak into the next object
                start_of[node_key[c_first[j]]] = -1
                end_of[node_key[c_last[j]]] = -1
        if best < 0 or best_len < 4:
            continue
        if nv + best_len > coords.shape[0]:
            bigger = np.empty((max(2 * coords.shape[0], nv + best_len), 2), np.float64)
            bigger[:nv] = coords[:nv]
            coords = bigger
        node = c_first[best]
        for _ in range(best_len):
            key = node_key[node]
            q = key >> 1
            r = q // W
            c = q - r * W
            if key & 1:
                coords[nv, 0] = r + 0.5
                coords[nv, 1] = c
            else:
                coords[nv, 0] = r
                coords[nv, 1] = c + 0.5
            nv += 1
            node = node_next[node]
        found[k] = lab
        k += 1
        offsets[k] = nv
    return found[:k], offsets[:k + 1], coords[:nv]


def label_contours(labels: np.ndarray, ids=None):
    """Outline of each object of a 2-D label image: ``find_contours`` on its padded mask, the longest.

    For each label ``lab`` in ``ids`` (default ``1..labels.max()``) present in ``labels``, the
    contour ``max(skimage.measure.find_contours(np.pad(labels[sl] == lab, 1).astype(float), 0.5),
    key=len)`` with ``sl = ndi.find_objects(labels)[lab - 1]``, identical (same vertices, order
    and start point; closed, so the first vertex is repeated at the end). Objects whose
    contour has fewer than 4 vertices are left out.

    Returns
    -------
    found : (K,) int64
        The labels outlined, in the order of ``ids``.
    offsets : (K + 1,) int64
        Contour ``k`` is ``coords[offsets[k]:offsets[k + 1]]``.
    coords : (V, 2) float64
        ``(row, col)`` vertices in the padded box's coordinates (as ``find_contours`` gives them).
    origin : (K, 2) int64
        ``(sl[0].start, sl[1].start)`` of each object.
    """
    labels = np.ascontiguousarray(labels)
    if labels.ndim != 2:
        raise ValueError("labels must be 2-D")
    n = int(labels.max(initial=0)) if labels.size else 0
    ids = np.arange(1, n + 1, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64).ravel()
    box = label_boxes(labels, n)
    sel = ids[(ids >= 1) & (ids <= n)]
    sel = sel[box[sel - 1, 0] >= 0] if sel.size else sel
    if sel.size == 0:
        e = np.empty(0, np.int64)
        return e, np.zeros(1, np.int64), np.empty((0, 2), np.float64), np.empty((0, 2), np.int64)
    # scratch for the largest padded box: mask, vertex -> contour maps (left all -1 by each
    # object, as every contour of a padded mask is closed), nodes and contours
    size = int(((box[sel - 1, 1] - box[sel - 1, 0] + 2) * (box[sel - 1, 3] - box[sel - 1, 2] + 2)).max())
    mask = np.empty(size, np.uint8)
    start_of = np.full(2 * size, -1, np.int64)
    end_of = np.full(2 * size, -1, np.int64)
    node_key = np.empty(4 * size, np.int64)
    node_next = np.empty(4 * size, np.int64)
    c_first = np.empty(size, np.int64)
    c_last = np.empty(size, np.int64)
    c_len = np.empty(size, np.int64)
    c_alive = np.empty(size, np.bool_)
    found, offsets, coords = _object_contours(labels, ids, box, mask, start_of, end_of, node_key, node_next,
                                              c_first, c_last, c_len, c_alive)
    origin = box[found - 1][:, [0, 2]]
    return found, offsets, coords, origin


# --------------------------------------------------------------------------- outlines

@njit(**_JIT)
def _contour_points(coords, offsets, origin, g0, g1, downsample, x0, y0, out):
    for k in range(offsets.size - 1):
        s0 = float(origin[k, 0])
        s1 = float(origin[k, 1])
        for v in range(offsets[k], offsets[k + 1]):
            out[v, 0] = ((((coords[v, 1] - 1.0) + s1) + g1) + 0.5) * downsample + x0
            out[v, 1] = ((((coords[v, 0] - 1.0) + s0) + g0) + 0.5) * downsample + y0


def contour_points(coords, offsets, origin, grid_origin=(0, 0), downsample=1.0, origin_px=(0.0, 0.0)):
    """Level-0 ``(x, y)`` of :func:`label_contours` vertices.

    Vertex ``(row, col)`` of contour ``k`` is at grid position ``g = (row, col) - 1 +
    origin[k] + grid_origin`` and level-0 ``(g + 0.5) * downsample + origin_px``
    (``origin_px`` is ``(x, y)``), evaluated left to right in float64 (at a non-integer
    ``downsample`` another order can move a vertex by an ulp).

    Returns
    -------
    xy : (V, 2) float64
    """
    out = np.empty((coords.shape[0], 2), np.float64)
    _contour_points(np.ascontiguousarray(coords, np.float64), np.asarray(offsets, np.int64),
                    np.asarray(origin, np.int64), float(grid_origin[0]), float(grid_origin[1]),
                    float(downsample), float(origin_px[0]), float(origin_px[1]), out)
    return out


@njit(**_JIT)
def _point_segment_distance(px, py, ax, ay, bx, by):
    """GEOS ``algorithm::Distance::pointToSegment``, operation for operation."""
    if ax == bx and ay == by:
        dx = px - ax
        dy = py - ay
        return np.sqrt(dx * dx + dy * dy)
    len2 = (bx - ax) * (bx - ax) + (by - ay) * (by - ay)
    r = ((px - ax) * (bx - ax) + (py - ay) * (by - ay)) / len2
    if r <= 0.0:
        dx = px - ax
        dy = py - ay
        return np.sqrt(dx * dx + dy * dy)
    if r >= 1.0:
        dx = px - bx
        dy = py - by
        return np.sqrt(dx * dx + dy * dy)
    s = ((ay - py) * (bx - ax) - (ax - px) * (by - ay)) / len2
    return np.abs(s) * np.sqrt(len2)


@njit(**_JIT)
def _simplify_rings(xy, offsets, tolerance, use, stack, out, out_offsets, kept):
    k_out = 0
    m = 0
    for k in range(offsets.size - 1):
        a = offsets[k]
        n = offsets[k + 1] - a
        # DouglasPeuckerLineSimplifier::simplifySection over the whole ring (first == last point);
        # the sections of one ring are disjoint, so a stack visits them with the same outcome
        for i in range(n):
            use[i] = True
        stack[0, 0] = 0
        stack[0, 1] = n - 1
        top = 1
        while top > 0:
            top -= 1
            i = stack[top, 0]
            j = stack[top, 1]
            ax = xy[a + i, 0]
            ay = xy[a + i, 1]
            bx = xy[a + j, 0]
            by = xy[a + j, 1]
            max_d = -1.0
            max_i = i
            for q in range(i + 1, j):
                d = _point_segment_distance(xy[a + q, 0], xy[a + q, 1], ax, ay, bx, by)
                if d > max_d:  # the first farthest point
                    max_d = d
                    max_i = q
            if max_d <= tolerance:
                for q in range(i + 1, j):
                    use[q] = False
            else:
                if max_i - i > 1:
                    stack[top, 0] = i
                    stack[top, 1] = max_i
                    top += 1
                if j - max_i > 1:
                    stack[top, 0] = max_i
                    stack[top, 1] = j
                    top += 1
        start = m
        for i in range(n):
            if use[i]:
                out[m, 0] = xy[a + i, 0]
                out[m, 1] = xy[a + i, 1]
                m += 1
        size = m - start
        # a closed ring's start point is dropped too if it lies within the tolerance of the
        # segment joining its neighbours (DouglasPeuckerLineSimplifier::simplify since GEOS 3.12)
        if n >= 4 and xy[a, 0] == xy[a + n - 1, 0] and xy[a, 1] == xy[a + n - 1, 1] and size > 3:
            d = _point_segment_distance(out[start, 0], out[start, 1], out[m - 2, 0], out[m - 2, 1],
                                        out[start + 1, 0], out[start + 1, 1])
            if d <= tolerance:
                for i in range(size - 2):
                    out[start + i, 0] = out[start + 1 + i, 0]
                    out[start + i, 1] = out[start + 1 + i, 1]
                m = start + size - 2
                if out[m - 1, 0] != out[start, 0] or out[m - 1, 1] != out[start, 1]:
                    out[m, 0] = out[start, 0]
                    out[m, 1] = out[start, 1]
                    m += 1
        if m - start < 4:  # GEOS returns a LineString: no ring
            m = start
            continue
        kept[k_out] = k
        k_out += 1
        out_offsets[k_out] = m
    return k_out, m


def simplify_rings(xy, offsets, tolerance):
    """GEOS's Douglas-Peucker simplification of closed rings, dropping those that collapse.

    The same vertices as ``shapely.simplify(shapely.linearrings(...), tolerance,
    preserve_topology=False)`` (GEOS 3.12 to 3.14 ``DouglasPeuckerSimplifier`` on a
    ``LinearRing``: Douglas-Peucker between the first and last point, then the start
    point dropped if within ``tolerance`` of its neighbours' segment), with rings of
    fewer than 4 vertices (GEOS's LineStrings) left out.

    Parameters
    ----------
    xy : (V, 2) float64
        ``(x, y)`` vertices of all rings; ring ``k`` is ``xy[offsets[k]:offsets[k + 1]]``,
        closed (first point repeated at the end).
    offsets : (K + 1,) int64
    tolerance : float

    Returns
    -------
    kept : (J,) int64
        Indices of the rings that remain, ascending.
    out_offsets : (J + 1,) int64
        Simplified ring ``j`` is ``out[out_offsets[j]:out_offsets[j + 1]]``.
    out : (M, 2) float64
    """
    if not tolerance >= 0:
        raise ValueError("tolerance must be non-negative")
    xy = np.ascontiguousarray(xy, np.float64)
    offsets = np.asarray(offsets, np.int64)
    n_rings = offsets.size - 1
    longest = int(np.diff(offsets).max()) if n_rings > 0 else 0
    use = np.empty(longest, np.bool_)
    stack = np.empty((max(longest, 1), 2), np.int64)
    out = np.empty((xy.shape[0], 2), np.float64)
    out_offsets = np.zeros(n_rings + 1, np.int64)
    kept = np.empty(n_rings, np.int64)
    j, m = _simplify_rings(xy, offsets, float(tolerance), use, stack, out, out_offsets, kept)
    return kept[:j], out_offsets[:j + 1], out[:m].copy()


@njit(**_JIT)
def _resample_closed(xs, ys, n, step, ox, oy):
    """Points every ``step`` (evenly, as close to it as a whole number allows) along the closed ring of
    ``n`` distinct vertices ``xs, ys``, from its first vertex; returns how many (at most ``ox.size``)."""
    length = 0.0
    for i in range(n):
        j = (i + 1) % n
        length += np.sqrt((xs[j] - xs[i]) ** 2 + (ys[j] - ys[i]) ** 2)
    m = max(3, int(np.floor(length / step + 0.5)))
    m = min(m, ox.size)
    spacing = length / m
    seg, seg_start = 0, 0.0
    seg_len = np.sqrt((xs[1 % n] - xs[0]) ** 2 + (ys[1 % n] - ys[0]) ** 2)
    for k in range(m):
        target = k * spacing
        while seg < n - 1 and seg_start + seg_len < target:
            seg_start += seg_len
            seg += 1
            j = (seg + 1) % n
            seg_len = np.sqrt((xs[j] - xs[seg]) ** 2 + (ys[j] - ys[seg]) ** 2)
        t = (target - seg_start) / seg_len if seg_len > 0 else 0.0
        t = min(max(t, 0.0), 1.0)
        j = (seg + 1) % n
        ox[k] = xs[seg] + t * (xs[j] - xs[seg])
        oy[k] = ys[seg] + t * (ys[j] - ys[seg])
    return m


@njit(**_JIT)
def _smooth_rings(xy, offsets, step, out, out_offsets, ax, ay, bx, by):
    m_out = 0
    for k in range(offsets.size - 1):
        a, b = offsets[k], offsets[k + 1]
        n = b - a - 1  # closed: the last vertex repeats the first
        out_offsets[k] = m_out
        if n < 3:
            for i in range(a, b):
                out[m_out, 0] = xy[i, 0]
                out[m_out, 1] = xy[i, 1]
                m_out += 1
            continue
        m = _resample_closed(xy[a:b - 1, 0], xy[a:b - 1, 1], n, step, ax, ay)
        # every second point, as the mean of itself and its neighbours
        h = 0
        for i in range(0, m, 2):
            bx[h] = (ax[(i + m - 1) % m] + ax[i] + ax[(i + 1) % m]) / 3.0
            by[h] = (ay[(i + m - 1) % m] + ay[i] + ay[(i + 1) % m]) / 3.0
            h += 1
        m2 = _resample_closed(bx, by, h, min(2.0, 0.1 * h) * step, ax, ay)
        for i in range(m2):
            out[m_out, 0] = ax[i]
            out[m_out, 1] = ay[i]
            m_out += 1
        out[m_out, 0] = ax[0]
        out[m_out, 1] = ay[0]
        m_out += 1
    out_offsets[offsets.size - 1] = m_out
    return m_out


def smooth_rings(xy, offsets, step):
    """Smooth closed rings as QuPath smooths cell outlines ("smooth boundaries").

    Each ring is resampled every ``step`` along its length, every second point is replaced by the mean
    of itself and its two neighbours, and the result is resampled every ``min(2, 0.1 x points) x step``.
    Only outlines change: measurements come from the label images.

    Parameters
    ----------
    xy : (V, 2) float64
        Closed rings (first vertex repeated at the end); ring ``k`` is ``xy[offsets[k]:offsets[k + 1]]``.
    offsets : (K + 1,) int64
    step : float
        One pixel of the image the outlines were traced on, in ``xy``'s units.

    Returns
    -------
    out_offsets : (K + 1,) int64
    out : (M, 2) float64
        Closed smoothed rings, one per input ring.
    """
    xy = np.ascontiguousarray(xy, np.float64)
    offsets = np.asarray(offsets, np.int64)
    n_rings = offsets.size - 1
    if n_rings <= 0:
        return np.zeros(max(n_rings, 0) + 1, np.int64), np.empty((0, 2), np.float64)
    lengths = np.hypot(*np.diff(xy, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    perimeters = cum[offsets[1:] - 1] - cum[offsets[:-1]]  # the closing segment is in each ring
    # points per ring: at most one per step of its length (+ rounding), and about 20 for a short ring, whose
    # second spacing is 0.1 x its points
    per_ring = np.maximum(np.diff(offsets), np.ceil(perimeters / step) + 4).astype(np.int64)
    per_ring = np.maximum(per_ring, 32)
    longest = int(per_ring.max())
    bound = int(per_ring.sum()) + n_rings
    out = np.empty((bound, 2), np.float64)
    out_offsets = np.zeros(n_rings + 1, np.int64)
    ax, ay = np.empty(longest), np.empty(longest)
    bx, by = np.empty(longest), np.empty(longest)
    m = _smooth_rings(xy, offsets, float(step), out, out_offsets, ax, ay, bx, by)
    return out_offsets, out[:m].copy()


# --------------------------------------------------------------------------- optical density

@njit(**_JIT)
def _od_lut(rgb, lut, out):
    H, W = out.shape[0], out.shape[1]
    l0 = lut[0]
    l1 = lut[1]
    l2 = lut[2]
    for r in range(H):
        for c in range(W):
            out[r, c, 0] = l0[rgb[r, c, 0]]
            out[r, c, 1] = l1[rgb[r, c, 1]]
            out[r, c, 2] = l2[rgb[r, c, 2]]


def rgb_to_od(rgb: np.ndarray, background=(255, 255, 255)) -> np.ndarray:
    """``ihcscore.stains.rgb_to_od`` for 2-D uint8 RGB(A) images in one pass over the pixels
    (the same lookup table, so identical); other inputs go to it."""
    from .stains import od_lookup_table
    from .stains import rgb_to_od as _rgb_to_od
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.dtype != np.uint8 or rgb.shape[-1] not in (3, 4):
        return _rgb_to_od(rgb, background)
    out = np.empty(rgb.shape[:2] + (3,), dtype=np.float32)
    _od_lut(rgb, od_lookup_table(background), out)
    return out


# --------------------------------------------------------------------------- anti-aliased resampling

#: Columns per block of the tap-by-tap passes (radius > 2): the float64 accumulator stays in L1.
_SMOOTH_BLOCK = 1024


@njit(**_JIT)
def _smooth_axis0(src, y, w, acc, m):
    """Row ``y`` of scipy's axis-0 ``correlate1d`` ("nearest") of the uint8 rows ``src``, rounded
    into ``m`` (float32): per element ``x[y]*w0``, then ``+= (x[y-k] + x[y+k]) * w_k`` for k = r..1
    in float64. The pair sums are taken in integers (exact, so the same float64 values).
    Radius 1 and 2 in one pass per element; larger radii tap by tap over blocks of ``acc``.
    """
    M, L = src.shape
    r1 = w.size - 1
    w0 = w[0]
    s0 = src[y]
    if r1 == 1:
        w1 = w[1]
        a1 = src[max(y - 1, 0)]
        b1 = src[min(y + 1, M - 1)]
        for c in range(L):
            v = np.float64(s0[c]) * w0
            v += np.float64(np.int32(a1[c]) + np.int32(b1[c])) * w1
            m[c] = v
    elif r1 == 2:
        w1 = w[1]
        w2 = w[2]
        a1 = src[max(y - 1, 0)]
        b1 = src[min(y + 1, M - 1)]
        a2 = src[max(y - 2, 0)]
        b2 = src[min(y + 2, M - 1)]
        for c in range(L):
            v = np.float64(s0[c]) * w0
            v += np.float64(np.int32(a2[c]) + np.int32(b2[c])) * w2
            v += np.float64(np.int32(a1[c]) + np.int32(b1[c])) * w1
            m[c] = v
    else:
        B = acc.size
        for c0 in range(0, L, B):
            n = min(B, L - c0)
            x = s0[c0:c0 + n]
            for c in range(n):
                acc[c] = np.float64(x[c]) * w0
            for k in range(r1, 0, -1):
                a = src[max(y - k, 0), c0:c0 + n]
                b = src[min(y + k, M - 1), c0:c0 + n]
                wk = w[k]
                for c in range(n):
                    acc[c] += np.float64(np.int32(a[c]) + np.int32(b[c])) * wk
            d = m[c0:c0 + n]
            for c in range(n):
                d[c] = acc[c]


@njit(**_JIT)
def _smooth_axis1(buf, C, w, acc, g):
    """scipy's axis-1 ``correlate1d`` (taps ``C`` apart) of the extended float32 line ``buf``
    (``r * C`` values either side of the row), rounded to float32 into ``g`` (float64, so that the
    bilinear samples need no conversions): the float64 operations and order of
    :func:`_smooth_axis0`, the radius specialised the same way."""
    L = g.size
    r1 = w.size - 1
    e = r1 * C
    w0 = w[0]
    x = buf[e:e + L]
    if r1 == 1:
        w1 = w[1]
        l1 = buf[e - C:e - C + L]
        h1 = buf[e + C:e + C + L]
        for c in range(L):
            v = np.float64(x[c]) * w0
            v += (np.float64(l1[c]) + np.float64(h1[c])) * w1
            g[c] = np.float32(v)
    elif r1 == 2:
        w1 = w[1]
        w2 = w[2]
        l1 = buf[e - C:e - C + L]
        h1 = buf[e + C:e + C + L]
        l2 = buf[e - 2 * C:e - 2 * C + L]
        h2 = buf[e + 2 * C:e + 2 * C + L]
        for c in range(L):
            v = np.float64(x[c]) * w0
            v += (np.float64(l2[c]) + np.float64(h2[c])) * w2
            v += (np.float64(l1[c]) + np.float64(h1[c])) * w1
            g[c] = np.float32(v)
    else:
        B = acc.size
        for c0 in range(0, L, B):
            n = min(B, L - c0)
            mid = x[c0:c0 + n]
            for c in range(n):
                acc[c] = np.float64(mid[c]) * w0
            for k in range(r1, 0, -1):
                wk = w[k]
                lo = buf[e + c0 - k * C:e + c0 - k * C + n]
                hi = buf[e + c0 + k * C:e + c0 + k * C + n]
                for c in range(n):
                    acc[c] += (np.float64(lo[c]) + np.float64(hi[c])) * wk
            d = g[c0:c0 + n]
            for c in range(n):
                d[c] = np.float32(acc[c])


@njit(**_JIT)
def _smooth_row(src, y, C, w, acc, buf, grow):
    """Row ``y`` of scipy's ``gaussian_filter(src, (s, s, 0), mode="nearest")`` of (M, N, C) uint8
    values held as (M, N * C) rows: the axis-0 pass rounded to float32 into the middle of the
    extended line ``buf``, its ends repeated ("nearest"), then the axis-1 pass into ``grow``
    (float32 values held as float64).
    """
    L = grow.size
    e = (w.size - 1) * C
    _smooth_axis0(src, y, w, acc, buf[e:e + L])
    for i in range(e):
        buf[i] = buf[e + i % C]
        buf[e + L + i] = buf[e + L - C + i % C]
    _smooth_axis1(buf, C, w, acc, grow)


@njit(**_JIT)
def _smoothed_slot(src, y, other, have, C, w, acc, buf, rows):
    """Slot of ``rows`` holding smoothed row ``y``; computed into the slot not holding ``other``."""
    if have[0] == y:
        return 0
    if have[1] == y:
        return 1
    slot = 1 if have[0] == other else 0
    _smooth_row(src, y, C, w, acc, buf, rows[slot])
    have[slot] = y
    return slot


@njit(**_JIT)
def _resample(src, C, w, ys, wy, ix, wx, out, acc, buf, rows):
    """Bilinear samples (scipy's ``zoom_shift``, order 1) of the smoothed rows, two source rows
    cached. ``out`` is (h, w * C); ``ix``, ``wx``: per output element its two positions in a
    source row (column times ``C`` plus channel) and their weights."""
    h, n = out.shape
    have = np.array([-1, -1])
    for r in range(h):
        g0 = rows[_smoothed_slot(src, ys[r, 0], ys[r, 1], have, C, w, acc, buf, rows)]
        g1 = rows[_smoothed_slot(src, ys[r, 1], ys[r, 0], have, C, w, acc, buf, rows)]
        wy0 = wy[r, 0]
        wy1 = wy[r, 1]
        o = out[r]
        for j in range(n):
            p = ix[j, 0]
            q = ix[j, 1]
            wx0 = wx[j, 0]
            wx1 = wx[j, 1]
            t = 0.0
            t += g0[p] * wy0 * wx0
            t += g0[q] * wy0 * wx1
            t += g1[p] * wy1 * wx0
            t += g1[q] * wy1 * wx1
            o[j] = t


def _linear_taps(n_out, origin_out, origin_src, scale, n_src):
    """Per output index: the two source indices and weights of scipy's order-1 ``zoom_shift``.

    ``affine_transform(x, [scale], offset)`` runs ``zoom_shift`` with ``shift = offset / scale``:
    the coordinate is ``(k + shift) * scale``, the weights ``1 - f`` and ``1 - (1 - f)`` of its
    fraction ``f``, and "nearest" clamps the two indices, not the coordinate.
    """
    offset = np.float64((origin_out + 0.5) * scale - 0.5 - origin_src)
    shift = offset / np.float64(scale)
    cc = (np.arange(n_out, dtype=np.float64) + shift) * np.float64(scale)
    start = np.floor(cc)
    w0 = 1.0 - (cc - start)
    idx = np.stack([start, start + 1], axis=1)
    return np.clip(idx, 0, n_src - 1).astype(np.int64), np.stack([w0, 1.0 - w0], axis=1)


def resample_rgb(src: np.ndarray, src_origin, scale: float, out_origin, out_shape) -> np.ndarray:
    """Anti-aliased bilinear resampling onto a coarser grid, as scipy computes it, bit for bit.

    Equal to ``affine_transform(gaussian_filter(src.astype(float32), (s, s, 0), mode="nearest")[..., c],
    [scale, scale], offset, output_shape=out_shape, order=1, mode="nearest")`` per channel, with
    ``s = (scale - 1) / 2`` and ``offset = (out_origin + 0.5) * scale - 0.5 - src_origin`` (what
    :func:`ihcscore.pipeline.resample_to_grid` computes), but smoothing only the source rows the
    bilinear samples read, one row at a time, straight from ``uint8`` (the two most recent rows
    cached, so a row shared by consecutive output rows is smoothed once).

    Parameters
    ----------
    src : (M, N, C) uint8 array
    src_origin, out_origin : (y, x) int
        Global grid positions of ``src[0, 0]`` and of the first output pixel.
    scale : float
        Source pixels per output pixel (> 1).
    out_shape : (h, w)

    Returns
    -------
    (h, w, C) float32
    """
    from scipy.ndimage._filters import _gaussian_kernel1d
    src = np.ascontiguousarray(src)
    M, N, C = src.shape
    out = np.empty((out_shape[0], out_shape[1], C), np.float32)
    if out.size == 0:
        return out
    sd = (float(scale) - 1.0) / 2.0
    lw = int(4.0 * sd + 0.5)
    fw = _gaussian_kernel1d(sd, 0, lw)[::-1]
    w = np.ascontiguousarray(fw[lw::-1])
    ys, wy = _linear_taps(out_shape[0], out_origin[0], src_origin[0], scale, M)
    xs, wx = _linear_taps(out_shape[1], out_origin[1], src_origin[1], scale, N)
    ix = (xs[:, None, :] * C + np.arange(C)[None, :, None]).reshape(-1, 2)
    wx = np.repeat(wx, C, axis=0)
    _resample(src.reshape(M, N * C), C, w, ys, wy, ix, wx, out.reshape(out_shape[0], -1),
              np.empty(min(_SMOOTH_BLOCK, N * C)), np.empty((N + 2 * lw) * C, np.float32),
              np.empty((2, N * C)))
    return out


@njit(**_JIT)
def _bin_mean(a, k, out):
    kk = k * k
    half = kk // 2
    h, w, C = out.shape
    acc = np.empty(w * C, np.uint32)
    for r in range(h):
        acc[:] = 0
        for dy in range(k):
            row = a[r * k + dy]
            for c in range(w):
                for dx in range(k):
                    for ch in range(C):
                        acc[c * C + ch] += row[c * k + dx, ch]
        for c in range(w):
            for ch in range(C):
                out[r, c, ch] = (acc[c * C + ch] + half) // kk


def bin_mean_uint8(image: np.ndarray, k: int) -> np.ndarray:
    """``k x k`` block means of an (H, W, C) uint8 image, rounded half up: ``(sum + k*k // 2) // (k*k)``.

    Equal to ``image.reshape(H // k, k, W // k, k, C).astype(np.uint32).sum(axis=(1, 3))``
    rounded the same way; ``H`` and ``W`` must be multiples of ``k`` (k <= 4096).
    """
    image = np.ascontiguousarray(image)
    H, W, C = image.shape
    if k < 1 or H % k or W % k or k > 4096:
        raise ValueError(f"image of {H} x {W} px cannot be binned by {k}")
    out = np.empty((H // k, W // k, C), np.uint8)
    if out.size:
        _bin_mean(image, int(k), out)
    return out



# --------------------------------------------------------------------------- warm-up

def warm_up() -> float:
    """Compile (or load from cache) every kernel on tiny inputs; returns seconds taken."""
    import time
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    img = rng.random((16, 16)).astype(np.float32)
    bounded_reconstruction_dilation(img - 0.5, img, 3)
    flat = np.zeros((8, 48), np.float32)  # a plateau too wide for the raster-order floods
    flat[4, 40] = 1
    for im in (img, flat, img.astype(np.float64), flat.astype(np.float64)):
        h_maxima(im, 0.5)
        h_maxima(im, 0.5, im > 0.1)
    mk = np.zeros((16, 16), np.int32)
    mk[2, 2] = 1
    mk[12, 12] = 2
    for im in (-img, -img.astype(np.float64)):
        watershed_components(im, mk, img > 0.1)
        watershed_components(im, mk, img > 0.1, watershed_line=True)
    distance_transform_edt(img > 0.3)
    distance_transform_edt(img > 0.3, dtype=np.float64)
    expand_labels(mk, 3)
    expand_labels(mk, _EXPAND_NEAR_MAX_R + 1)
    label(img > 0.5, 1)
    label(img > 0.5, 2)
    membrane_ring(mk, 2.0)
    label_stats(mk, np.stack([img, img]), 2)
    od3 = np.stack([img, img, img], axis=-1)
    label_stats(mk, [od3[..., 0], od3[..., 1]], 2)
    bincount_sum(mk, img, 2)
    for im in (img, img.astype(np.float64)):
        gaussian_filter(im, 1.0, mode="nearest")
    shape_sums(mk, 2)
    grey_erosion_sequence(img, [(np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool), 1),
                                (np.ones((3, 3), dtype=bool), 1)])
    lap = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=np.float32)
    for im in (img, img.astype(np.float64)):
        correlate3x3(im, lap)
    binary_erosion_3x3(img > 0.3)
    binary_dilation_3x3(img > 0.3)
    binary_dilation_disk(img > 0.9, 2.5)
    fill_holes(img > 0.5)
    bin_mean_uint8(np.zeros((4, 4, 3), np.uint8), 2)
    resample_rgb((img[..., None] * 255).astype(np.uint8).repeat(3, -1), (0, 0), 2.2, (0, 0), (6, 6))
    first_pixel_index(mk, 2)
    label_boxes(mk, 2)
    paste_labels(mk, np.array([0, 2, 1], np.int32), mk.copy())
    apply_lut(np.array([0, 2, 1], np.int32), mk)
    apply_lut(np.array([False, True, True]), mk)
    found, offsets, coords, origin = label_contours(mk)
    simplify_rings(contour_points(coords, offsets, origin), offsets, 0.5)
    rgb_to_od((img[..., None] * np.array([200, 150, 100])).astype(np.uint8))
    return time.perf_counter() - t0
