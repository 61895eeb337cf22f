"""Compiled kernels against the scipy / scikit-image functions they replace."""

import heapq

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import morphology, segmentation

from ihcscore import kernels as K
from ihcscore.measure import label_statistics


def _images(n=12, seed=0):
    """Random smooth float32 images of odd shapes, some quantised (plateaus, exact ties)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(3, 70, 2)
        img = ndi.gaussian_filter(rng.random((h, w)).astype(np.float32), rng.random() * 3)
        if i % 2:
            img = np.round(img * 8).astype(np.float32) / 8
        yield img


@pytest.fixture(scope="module")
def region():
    """A realistic detection image: OD sum of a synthetic H-DAB region and its nuclei."""
    from ihcscore.synthetic import make_synthetic_region
    from ihcscore.stains import rgb_to_od
    rgb, _, _ = make_synthetic_region((384, 384), 0.5, seed=3)
    img = rgb_to_od(rgb).sum(-1).astype(np.float32)
    smooth = ndi.gaussian_filter(img, 2)
    nuclei, _ = ndi.label(smooth > np.quantile(smooth, 0.8))
    return img, nuclei.astype(np.int32)


def _local_maxima(img):
    return morphology.local_maxima(img, connectivity=2, allow_borders=True).astype(bool)


def _raster_watershed(image, markers, mask, line):
    """Reference flood of the whole image: skimage's algorithm (connectivity 1, (value, age) pop
    order, a neighbour's value never below its parent's, with a line: labelled when popped, a pixel
    touching another label becomes 0), the markers aged 0..M-1 in raster order."""
    image = np.asarray(image, np.float64)
    H, W = image.shape
    m = np.ones((H, W), bool) if mask is None else mask.copy()
    out = np.where(m, markers, 0).astype(np.int64)
    heap = []
    for age, p in enumerate(np.flatnonzero(out)):
        heap.append((image.flat[p], age, int(p), int(out.flat[p])))
    heapq.heapify(heap)
    nmk = age = len(heap)

    def nbrs(p):
        r, c = divmod(p, W)
        return [q for q, ok in ((p - W, r > 0), (p - 1, c > 0), (p + 1, c < W - 1), (p + W, r < H - 1)) if ok]

    while heap:
        ev, ea, p, lab = heapq.heappop(heap)
        if line:
            if out.flat[p] != 0 and ea >= nmk:
                continue
            if m.flat[p] and any(m.flat[q] and out.flat[q] not in (0, lab) for q in nbrs(p)):
                m.flat[p] = False
            elif m.flat[p]:
                out.flat[p] = lab
        for q in nbrs(p):
            if not m.flat[q] or out.flat[q] != 0:
                continue
            if not line:
                out.flat[q] = lab
            heapq.heappush(heap, (max(image.flat[q], ev), age, q, lab))
            age += 1
    return out


def test_bounded_reconstruction_with_enough_steps_equals_skimage(region):
    """With a step count above any geodesic distance it is the full reconstruction."""
    for img in list(_images()) + [region[0]]:
        seed = img - np.float32(0.2) * np.random.default_rng(1).random(img.shape).astype(np.float32)
        ero = morphology.erosion(img, morphology.disk(3))
        for s in (seed, np.minimum(ero, img)):
            a = K.bounded_reconstruction_dilation(s, img, img.size)
            b = morphology.reconstruction(s, img, method="dilation")
            assert a.dtype == b.dtype and np.array_equal(a, b)


def _hmax_images(seed=0):
    """Smooth and quantised images (plateaus, ties), noise, large plateaus, tiny shapes."""
    rng = np.random.default_rng(seed)
    yield from _images(seed=seed)
    yield rng.random((40, 50)).astype(np.float32)
    yield np.round(rng.random((30, 70)) * 3).astype(np.float32)  # many ties between neighbours
    yield np.round(ndi.gaussian_filter(rng.random((80, 90)), 6) * 400).astype(np.float32)  # large plateaus
    yield np.round(ndi.gaussian_filter(rng.random((60, 60)), 2) * 40).astype(np.float32) / 7
    for shape in ((1, 1), (1, 9), (9, 1), (2, 2)):
        yield rng.random(shape).astype(np.float32)
    yield np.full((5, 6), 2.0, np.float32)  # constant: h > ptp


def _check_h_maxima(x, h, masks=(None,)):
    ref = morphology.h_maxima(x, h).astype(bool)
    for m in masks:
        out = K.h_maxima(x, h, m)
        assert out.dtype == bool and np.array_equal(out, ref if m is None else ref & m)
    return ref


def test_h_maxima_equals_skimage():
    rng = np.random.default_rng(3)
    for x in _hmax_images():
        for dt in (np.float32, np.float64):
            x = x.astype(dt)
            ptp = float(np.ptp(x))
            masks = (None, rng.random(x.shape) < 0.5, np.ones(x.shape, bool), np.zeros(x.shape, bool))
            for h in (1e-4, 0.05, 0.5, ptp / 3, ptp):
                if h > 0:
                    _check_h_maxima(x, h, masks)
            _check_h_maxima(x * dt(1e4) - dt(3e4), 0.3 * 1e4)  # the resolution shift at large values


def test_h_maxima_mask_cuts_plateaus():
    """A mask that cuts plateaus (and maximal plateaus) in two: each part keeps the plateau's answer."""
    x = np.zeros((20, 30), np.float32)
    x[2:8, 3:25] = 5  # a maximal plateau
    x[10:18, 5:12] = 3  # and one that is not
    x[14, 8] = 9
    cut = np.ones(x.shape, bool)
    cut[:, 7:9] = False
    sparse = (np.arange(30) % 3 == 0) & np.ones((20, 1), bool)
    ref = _check_h_maxima(x, 1.0, (None, cut, sparse, ~cut))
    assert ref[2:8, 3:25].all() and ref[14, 8] and ref[10:18, 5:12].sum() == 1


def test_h_maxima_near_ties():
    """Values closer than the resolution shift (2e-6 relative): 1 ulp apart, both peaks are
    maxima; a peak 1 ulp above a rejected one can still be one."""
    f32 = np.float32
    h = f32(0.5)
    x = np.zeros((5, 8), f32)
    x[2, 2], x[2, 3], x[2, 4] = 1, 0.8, np.nextafter(f32(1), f32(0))
    ref = _check_h_maxima(x, 0.5, (None, x > 0))
    assert ref[2, 2] and ref[2, 4]
    # p = 1 is rejected by w (p - shift(w) < h), its neighbour t = 1 + ulp is not
    p, t = f32(1), np.nextafter(f32(1), f32(2))
    shift = lambda a: (a - h) - f32(2 * np.finfo(f32).resolution) * abs(a)
    w = t
    while not p - shift(w) < h <= t - shift(w):  # found a few ulps above 1 + 2e-6
        assert w < 1.001
        w = np.nextafter(w, f32(2))
    x = np.zeros((5, 8), f32)
    x[2, 2:6] = p, t, 0.9, w
    ref = _check_h_maxima(x, 0.5, (None, x > 0))
    assert not ref[2, 2] and ref[2, 3] and ref[2, 5]


def test_h_maxima_on_log_and_edm(region):
    """The two uses in cells.py: LoG seeds within the foreground, EDM peaks within the nuclei."""
    from ihcscore.cells import EDM_SMOOTH_PX, LAPLACIAN, SEED_TOLERANCE, subtract_background
    measure, _ = subtract_background(region[0], 16, 2.0)
    for sigma in (1.5, 3.0):
        log = ndi.convolve(ndi.gaussian_filter(measure, sigma, mode="nearest"), LAPLACIAN, mode="nearest")
        ref = _check_h_maxima(log, SEED_TOLERANCE, (None, log > 0))
        assert ref.sum() > 50
        _check_h_maxima(log.astype(np.float64), SEED_TOLERANCE, (log > 0,))
    m = region[1] > 0
    d = ndi.distance_transform_edt(m)
    for dist in (d, ndi.gaussian_filter(d, EDM_SMOOTH_PX)):
        ref = _check_h_maxima(dist, 0.5, (None, m))
        assert ref.sum() > 20
    _check_h_maxima(region[0], 0.05, (None, region[1] > 0))


def test_h_maxima_long_floods():
    """Wide areas within h of their maxima, full of holes: long floods in many short runs
    (what outgrows the first flood buffers), decided both ways."""
    rng = np.random.default_rng(5)
    x = ndi.gaussian_filter(rng.random((240, 300)), 2).astype(np.float32) * np.float32(0.02)
    x[::2, ::2] = -1  # a sieve: every run is short
    x[200:, 280:] += 1  # the only ground higher by more than h, in a corner
    _check_h_maxima(x, 0.1, (None, x > 0.005))
    x[200:, 280:] = -1
    _check_h_maxima(x, 0.1)


def test_h_maxima_infinite_values():
    """skimage breaks on +inf (a NaN seed); here +inf seeds +inf (same as a reconstruction
    of that seed), -inf seeds -inf as in skimage."""
    rng = np.random.default_rng(7)
    for dt in (np.float32, np.float64):
        x = np.round(ndi.gaussian_filter(rng.random((30, 40)), 1.5) * 20).astype(dt)
        k = rng.random(x.shape)
        x[k < 0.03] = np.inf
        x[k > 0.97] = -np.inf
        h = dt(0.5)
        with np.errstate(invalid="ignore"):
            s = (x - h) - dt(2 * np.finfo(dt).resolution) * np.abs(x)
            s[x == np.inf] = np.inf
            ref = (x - morphology.reconstruction(s, x, method="dilation")) >= h
        assert ref.any() and np.array_equal(K.h_maxima(x, 0.5), ref)


def test_watershed_components_matches_skimage_on_raw_od_log(region):
    """LoG of the raw OD sum (no background subtraction), local-maxima seeds: equal up to
    equal-valued markers (none meet here: identical)."""
    img = region[0]
    log = ndi.convolve(ndi.gaussian_filter(img, 2.0), np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]],
                                                                 np.float32))
    fg = log > 0
    mk, _ = ndi.label(_local_maxima(log) & fg, structure=np.ones((3, 3)))
    a = K.watershed_components(-log, mk, fg)
    b = segmentation.watershed(-log, mk, mask=fg)
    assert np.array_equal(a, b)


def test_edt_and_expand_labels(region):
    for img in list(_images()):
        m = img > np.median(img)
        if (~m).any():
            assert np.array_equal(K.distance_transform_edt(m, np.float64), ndi.distance_transform_edt(m))
            assert np.allclose(K.distance_transform_edt(m), ndi.distance_transform_edt(m), atol=1e-4)
        lab, _ = ndi.label(m)
        for dist in (0, 1.5, 3, 10):
            a, b = K.expand_labels(lab, dist), segmentation.expand_labels(lab, dist)
            # equal except where two labels are exactly equally near
            assert (a != b).mean() < 0.01
            assert np.array_equal(a > 0, b > 0)
    lab = region[1]
    a, b = K.expand_labels(lab, 10), segmentation.expand_labels(lab, 10)
    assert (a != b).mean() < 1e-3



def test_expand_labels_bounded_equals_feature_transform(region):
    """The bounded search picks exactly the label the full feature transform picks, ties included."""
    rng = np.random.default_rng(5)
    for it in range(400):
        h, w = rng.integers(1, 40, 2)
        dens = rng.choice([0.002, 0.02, 0.1, 0.4])
        lab = np.where(rng.random((h, w)) < dens, rng.integers(1, 5, (h, w)), 0).astype(np.int32)
        for dist in (0, 0.5, 1, 1.5, 2, 3, np.sqrt(8), 4.2, 10, 50):
            assert np.array_equal(K.expand_labels(lab, dist), K._expand_labels_ft(lab, dist)), (it, dist)
    for dist in (5, 7.5, 10):
        assert np.array_equal(K.expand_labels(region[1], dist), K._expand_labels_ft(region[1], dist))


def test_membrane_ring_and_boundaries(region):
    cells = segmentation.expand_labels(region[1], 5)
    b = segmentation.find_boundaries(cells, mode="inner")
    assert np.array_equal(K.find_inner_boundaries(cells), b)
    dist = ndi.distance_transform_edt(~b)
    for w in (0.5, 1.0, 2.0, 2.27, 3.0, 7.5):
        ref = np.where((cells > 0) & (dist < w), cells, 0)
        assert np.array_equal(K.membrane_ring(cells, w), ref), w


def test_label_stats_equal_label_statistics(region):
    img, lab = region
    cells = segmentation.expand_labels(lab, 4)
    n = int(cells.max()) + 2  # two empty labels at the end
    rng = np.random.default_rng(0)
    od = np.stack([img, rng.random(img.shape).astype(np.float32)], -1)
    count, s, s2, mn, mx = K.label_stats(cells, [od[..., 0], od[..., 1]], n)
    flat = cells.ravel()
    assert np.array_equal(count, np.bincount(flat, minlength=n + 1)[1:])
    for k in range(2):
        v = od[..., k].ravel().astype(np.float64)
        assert np.array_equal(s[k], np.bincount(flat, weights=v, minlength=n + 1)[1:])
        assert np.array_equal(s2[k], np.bincount(flat, weights=v * v, minlength=n + 1)[1:])
        assert np.array_equal(mx[k][:-2], ndi.maximum(v.reshape(img.shape), cells, np.arange(1, n - 1)))
        assert np.array_equal(mn[k][:-2], ndi.minimum(v.reshape(img.shape), cells, np.arange(1, n - 1)))
        assert np.isnan(mx[k][-1]) and np.isnan(mn[k][-1])
    stats = label_statistics(cells, {"A": od[..., 0]}, n)
    assert np.allclose(stats["A mean"][:-2], ndi.mean(od[..., 0], cells, np.arange(1, n - 1)))


def test_morphology_helpers(region):
    for img in list(_images()) + [region[0]]:
        for r in (1, 3, 16):
            fp = morphology.disk(r, decomposition="sequence")
            assert _same_bits(K.grey_erosion_sequence(img, fp), morphology.erosion(img, fp))
        m = img > np.quantile(img, 0.6)
        assert np.array_equal(K.fill_holes(m), ndi.binary_fill_holes(m))
        hi = img > np.quantile(img, 0.97)
        for R in (2.5, 4.0, 6.3):
            rr = int(np.floor(R))
            y, x = np.ogrid[-rr:rr + 1, -rr:rr + 1]
            ref = ndi.binary_dilation(hi, structure=(x * x + y * y) <= R * R + 1e-6)
            assert np.array_equal(K.binary_dilation_disk(hi, R), ref)


@pytest.mark.parametrize("line", [False, True])
def test_watershed_components_equals_raster_watershed(region, line):
    """Flooding each mask component alone gives exactly the whole-image (value, age) flood."""
    rng = np.random.default_rng(5)
    for img in list(_images()):
        m = img > np.quantile(img, 0.4)
        mk, _ = ndi.label(_local_maxima(img) & m, structure=np.ones((3, 3)))
        # also several markers with one label (a component then needs no flood)
        mk = np.where(mk > 0, (mk + 1) // 2, 0).astype(np.int32)
        for im in (-img, -img.astype(np.float64)):
            assert np.array_equal(K.watershed_components(im, mk, m, line), _raster_watershed(im, mk, m, line))
    img = rng.integers(0, 4, (60, 70)).astype(np.float32)  # many exact ties
    m = rng.random(img.shape) < 0.8
    mk = np.where(rng.random(img.shape) < 0.05, rng.integers(1, 9, img.shape), 0).astype(np.int32)
    assert np.array_equal(K.watershed_components(img, mk, m, line), _raster_watershed(img, mk, m, line))
    assert np.array_equal(K.watershed_components(img, mk, None, line), _raster_watershed(img, mk, None, line))


@pytest.mark.parametrize("line", [False, True])
def test_watershed_components_equals_skimage_without_marker_ties(line):
    """Where no two markers share a value (continuous images), identical to skimage, line or not."""
    for img in list(_images(seed=7))[::2]:  # the unquantised ones
        m = img > np.quantile(img, 0.4)
        mk, _ = ndi.label(_local_maxima(img) & m, structure=np.ones((3, 3)))
        vals = img[mk > 0]
        if np.unique(vals).size < vals.size:
            continue
        for im in (-img, -img.astype(np.float64)):
            a = K.watershed_components(im, mk, m, line)
            assert np.array_equal(a, segmentation.watershed(im, mk, mask=m, watershed_line=line))


def test_watershed_components_equals_skimage_on_log(region):
    """The over-segmentation (LoG, no line): identical to skimage on a realistic detection image."""
    from ihcscore.cells import LAPLACIAN, SEED_TOLERANCE, subtract_background
    measure, _ = subtract_background(region[0], 16, 2.0)
    for sigma in (1.5, 3.0):
        log = ndi.convolve(ndi.gaussian_filter(measure, sigma, mode="nearest"), LAPLACIAN, mode="nearest")
        fg = log > 0
        for seeds in (_local_maxima(log), K.h_maxima(log, SEED_TOLERANCE)):
            mk, _ = ndi.label(seeds & fg, structure=np.ones((3, 3)))
            a = K.watershed_components(-log, mk, fg)
            assert np.array_equal(a, segmentation.watershed(-log, mk, mask=fg))


def test_watershed_components_split_differs_only_at_ties(region):
    """The distance-map split: equal to skimage up to equal-valued markers (a handful of pixels)."""
    m = region[1] > 0
    d = ndi.gaussian_filter(ndi.distance_transform_edt(m), 0.75)
    mk, _ = ndi.label(K.h_maxima(d, 0.5) & m, structure=np.ones((3, 3)))
    a = K.watershed_components(-d, mk, m, watershed_line=True)
    b = segmentation.watershed(-d, mk, mask=m, watershed_line=True)
    assert (a != b).sum() <= 0.001 * m.sum()


def test_bincount_sum_and_shape_sums(region):
    img, lab = region
    n = int(lab.max())
    c, s = K.bincount_sum(lab, img, n)
    assert np.array_equal(c, np.bincount(lab.ravel(), minlength=n + 1))
    assert np.array_equal(s, np.bincount(lab.ravel(), weights=img.ravel(), minlength=n + 1))
    c, s = K.bincount_sum(lab, img, n - 1)  # labels beyond n: numpy's longer result
    assert np.array_equal(s, np.bincount(lab.ravel(), weights=img.ravel(), minlength=n))
    rows, cols = np.indices(lab.shape, dtype=np.float64)
    flat = lab.ravel()
    count, raw, edges = K.shape_sums(lab, n + 1)  # one empty label at the end
    assert np.array_equal(count, np.bincount(flat, minlength=n + 2)[1:])
    for i, w in enumerate((rows, cols, rows * rows, cols * cols, rows * cols)):
        assert np.array_equal(raw[i], np.bincount(flat, weights=w.ravel(), minlength=n + 2)[1:])
    ref = np.zeros(n + 2)
    padded = np.pad(lab, 1)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        ref += np.bincount(lab[shifted != lab], minlength=n + 2)
    assert np.array_equal(edges, ref[1:])


def test_bounded_reconstruction_equals_iterated_dilation(region):
    """Every step is a 3x3 grey dilation clipped to the mask (the scipy loop it replaces in cells)."""
    rng = np.random.default_rng(2)
    cases = [(img - np.float32(0.3) * rng.random(img.shape).astype(np.float32), img) for img in _images()]
    img = region[0]
    cases.append((np.minimum(morphology.erosion(img, morphology.disk(5)), img), img))
    for seed, mask in cases:
        ref, done = seed, 0
        for steps in (1, 2, 7, 40):
            for _ in range(steps - done):
                ref = np.minimum(ndi.grey_dilation(ref, size=(3, 3)), mask)
            done = steps
            a = K.bounded_reconstruction_dilation(seed, mask, steps)
            assert a.dtype == np.float32 and np.array_equal(a, ref), (seed.shape, steps)


def test_bounded_reconstruction_is_translation_invariant(region):
    """A pixel's result depends only on pixels within ``n_steps``: a crop gives the same values
    wherever the crop's edge is more than ``n_steps`` away (seam-free tiles)."""
    img = region[0]
    seed = np.minimum(morphology.erosion(img, morphology.disk(5)), img)
    for n in (3, 16, 48):
        full = K.bounded_reconstruction_dilation(seed, img, n)
        for r0, c0, r1, c1 in ((0, 0, 200, 170), (37, 101, 301, 384), (150, 13, 384, 250)):
            crop = K.bounded_reconstruction_dilation(seed[r0:r1, c0:c1], img[r0:r1, c0:c1], n)
            # rows / columns on the image border have no missing neighbours
            t, l = (0 if r0 == 0 else n), (0 if c0 == 0 else n)
            b, r = (None if r1 == img.shape[0] else -n), (None if c1 == img.shape[1] else -n)
            assert np.array_equal(crop[t:b, l:r], full[r0:r1, c0:c1][t:b, l:r]), (n, r0, c0)


def _same_bits(a, b):
    """Equal dtype, shape and bits (``np.array_equal`` takes -0.0 for 0.0)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        u = np.dtype(f"u{a.dtype.itemsize}")
        return np.array_equal(a.view(u), b.view(u))
    return np.array_equal(a, b)


def _edge_images(rng):
    """Tiny and one-row / one-column images, and ones whose float64 sums depend on the order
    of the terms (magnitudes 1e-8..1e8, signs mixed, exact zeros of both signs)."""
    ims = [rng.random(shape).astype(np.float32) for shape in ((1, 1), (1, 7), (9, 1), (2, 2), (2, 5), (4, 3))]
    for shape in ((31, 17), (3, 40)):
        x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 9, shape)).astype(np.float32)
        x[rng.random(shape) < 0.1] = 0.0
        x[rng.random(shape) < 0.1] = -0.0
        ims.append(x)
    return ims


def _iterated_reconstruction(seed, mask, steps):
    ref = np.minimum(seed, mask)
    for _ in range(steps):
        ref = np.minimum(ndi.grey_dilation(ref, size=(3, 3)), mask)
    return ref


def test_bounded_reconstruction_edge_cases():
    """Tiny and one-row/one-column images, plateaus, float64, images wider than one column strip
    (``_REC_STRIP``) and step counts around the steps of one pass (``_REC_LEVELS``)."""
    rng = np.random.default_rng(6)
    cases = []
    for shape in ((1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (40, 37)):
        img = rng.random(shape).astype(np.float32)
        cases.append((img - np.float32(0.4) * rng.random(shape).astype(np.float32), img))
        q = np.round(img.astype(np.float64) * 3) / 3            # plateaus, exact ties
        cases.append((q - 0.3 * (rng.random(shape) < 0.7), q))  # float64
    wide = ndi.gaussian_filter(rng.random((7, 2 * K._REC_STRIP + 300)), 1.5).astype(np.float32)
    cases.append((wide - np.float32(0.05) * rng.random(wide.shape).astype(np.float32), wide))
    seed_above = rng.random((30, 30)).astype(np.float32)       # seed above the mask somewhere
    cases.append((seed_above, np.float32(0.5) * rng.random((30, 30)).astype(np.float32) + 0.25))
    n = K._REC_LEVELS
    for seed, mask in cases:
        for steps in (1, 3, n, n + 1, 2 * n + 5):
            a = K.bounded_reconstruction_dilation(seed, mask, steps)
            ref = _iterated_reconstruction(seed, mask, steps)
            assert a.dtype == mask.dtype and np.array_equal(a, ref), (seed.shape, steps)


def _edt_masks(region):
    rng = np.random.default_rng(8)
    yield region[1] > 0                                       # nuclei: the split's input
    for i in range(30):
        h, w = rng.integers(1, 90, 2)
        if i % 3 == 0:                                        # blobs
            yield ndi.binary_dilation(rng.random((h, w)) < 0.01, iterations=int(rng.integers(1, 15)))
        else:
            yield rng.random((h, w)) < rng.choice([0.1, 0.5, 0.9, 0.99])
    for shape, zeros in ((((9, 300)), [(4, 150)]),             # runs longer than the brute-force ones
                         ((300, 9), [(0, 0)]),                 # columns without background
                         ((5, 400), [(0, 0), (4, 399)]),       # runs touching the image edges
                         ((1, 1), [(0, 0)]), ((1, 7), [(0, 3)]), ((7, 1), [(6, 0)]),
                         ((6, 6), [(r, c) for r in range(6) for c in range(6) if (r, c) != (2, 3)])):
        m = np.ones(shape, bool)
        for p in zeros:
            m[p] = False
        yield m
    yield np.zeros((4, 5), bool)
    yield np.ones((4, 5), bool)                               # no background: scipy's fallback


def test_distance_transform_edt_equals_scipy(region):
    for m in _edt_masks(region):
        ref = ndi.distance_transform_edt(m)
        assert np.array_equal(K.distance_transform_edt(m, np.float64), ref), m.shape
        assert np.array_equal(K.distance_transform_edt(m), ref.astype(np.float32)), m.shape
        assert np.array_equal(K.distance_transform_edt(m.astype(np.uint8) * 7, np.float64), ref)


def test_gaussian_filter_bit_identical_to_scipy(region):
    rng = np.random.default_rng(4)
    ims = list(_images()) + [region[0], rng.random((9, 1))] + _edge_images(rng)
    for img in ims:
        for dt in (np.float32, np.float64):
            x = img.astype(dt)
            for sigma in (0.75, 1.0, 3.0, 5.5):
                for mode in ("nearest", "reflect"):
                    a = K.gaussian_filter(x, sigma, mode=mode)
                    assert _same_bits(a, ndi.gaussian_filter(x, sigma, mode=mode)), (x.shape, sigma, mode)


def _scipy_resample(src, src_origin, scale, out_origin, out_shape):
    """The scipy definition ``kernels.resample_rgb`` replaces (Gaussian anti-alias, then bilinear)."""
    g = ndi.gaussian_filter(src.astype(np.float32), ((scale - 1) / 2, (scale - 1) / 2, 0), mode="nearest")
    offset = [(out_origin[0] + 0.5) * scale - 0.5 - src_origin[0], (out_origin[1] + 0.5) * scale - 0.5 - src_origin[1]]
    out = np.empty(tuple(out_shape) + (src.shape[2],), np.float32)
    for c in range(src.shape[2]):
        ndi.affine_transform(g[..., c], [scale, scale], offset=offset, output_shape=tuple(out_shape),
                             output=out[..., c], order=1, mode="nearest")
    return out


def test_resample_rgb_bit_identical_to_scipy():
    from ihcscore.synthetic import make_synthetic_region
    rng = np.random.default_rng(11)
    rgb, _, _ = make_synthetic_region((200, 240), 0.25, seed=2)
    cases = 0
    for scale in (2.0, 1.9782, 2.2, 1.3, 4.0, 3.7, 1.0 + 1e-6):
        for src in (rgb, rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), rgb[:5, :7],
                    rng.integers(0, 256, (30, 20, 1), dtype=np.uint8)):
            M, N = src.shape[:2]
            so = (int(rng.integers(0, 40)), int(rng.integers(0, 40)))
            oo = (int(np.ceil(so[0] / scale)), int(np.ceil(so[1] / scale)))
            # inside the source, and running past its far edges (clamped indices, like scipy's "nearest")
            for shape in ((max(1, int(M / scale) - 1), max(1, int(N / scale) - 1)), (int(M / scale) + 3, int(N / scale) + 2)):
                a = K.resample_rgb(src, so, scale, oo, shape)
                assert _same_bits(a, _scipy_resample(src, so, scale, oo, shape)), (scale, src.shape, shape)
                cases += 1
    assert cases == 56
    assert K.resample_rgb(rgb, (0, 0), 2.0, (0, 0), (0, 5)).shape == (0, 5, 3)


def test_resample_rgb_edge_shapes_and_radii():
    # every smoothing radius path (0, 1, 2 fused; larger ones tap by tap in column blocks, here
    # rows longer than one block), single rows / columns / pixels, one channel
    rng = np.random.default_rng(12)
    wide = rng.integers(0, 256, (19, K._SMOOTH_BLOCK // 3 + 41, 3), dtype=np.uint8)
    assert wide.shape[1] * 3 > K._SMOOTH_BLOCK
    srcs = [wide, rng.integers(0, 256, (9, K._SMOOTH_BLOCK + 7, 1), dtype=np.uint8),
            rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), rng.integers(0, 256, (1, 17, 3), dtype=np.uint8),
            rng.integers(0, 256, (15, 1, 3), dtype=np.uint8), rng.integers(0, 256, (2, 3, 1), dtype=np.uint8),
            np.full((6, 7, 3), 255, np.uint8)]
    for scale in (1.0 + 1e-6, 1.3, 1.9782, 2.0, 2.3, 3.0, 4.0, 6.5):
        for src in srcs:
            M, N = src.shape[:2]
            for so, shape in (((0, 0), (max(1, int(M / scale)), max(1, int(N / scale)))),
                              ((5, 3), (int(M / scale) + 4, int(N / scale) + 3))):
                oo = (int(np.ceil(so[0] / scale)), int(np.ceil(so[1] / scale)))
                a = K.resample_rgb(src, so, scale, oo, shape)
                assert _same_bits(a, _scipy_resample(src, so, scale, oo, shape)), (scale, src.shape, so, shape)


def test_correlate3x3_bit_identical_to_scipy(region):
    from ihcscore.cells import LAPLACIAN
    rng = np.random.default_rng(5)
    ims = list(_images()) + [region[0], ndi.gaussian_filter(region[0], 2.0)] + _edge_images(rng)
    weights = [LAPLACIAN[::-1, ::-1], rng.standard_normal((3, 3)),
               np.where(rng.random((3, 3)) < 0.5, 0.0, rng.standard_normal((3, 3))).astype(np.float32),
               np.array([[0, 0, 0], [0, 1e-17, 0], [0, 0, 0]]),  # |w| <= DBL_EPSILON: left out, as scipy
               np.array([[1e-300, 0, 1], [0, -2, 0], [3, 0, 1e-15]]), np.zeros((3, 3)), np.ones((3, 3), int)]
    for img in ims:
        for dt in (np.float32, np.float64):
            x = img.astype(dt)
            assert _same_bits(K.correlate3x3(x, LAPLACIAN[::-1, ::-1]), ndi.convolve(x, LAPLACIAN, mode="nearest"))
            for w in weights:
                for mode in ("nearest", "reflect"):
                    assert _same_bits(K.correlate3x3(x, w, mode=mode), ndi.correlate(x, w, mode=mode)), \
                        (x.shape, dt, w, mode)
    x = region[0][:20, :30]
    assert _same_bits(K.correlate3x3(x, LAPLACIAN, mode="mirror"), ndi.correlate(x, LAPLACIAN, mode="mirror"))


def test_laplacian_in_detection_equals_scipy(region):
    from ihcscore import cells
    from ihcscore.cells import LAPLACIAN
    x = K.gaussian_filter(region[0], 3.0, mode="nearest")
    assert _same_bits(cells._laplacian(x), ndi.convolve(x, LAPLACIAN, mode="nearest"))


def test_watershed_negate_equals_negated_image(region):
    rng = np.random.default_rng(7)
    for img in _images(10, seed=3):
        fg = img > np.quantile(img, 0.3)
        pk = (img == ndi.maximum_filter(img, size=5)) & fg
        mk, _ = ndi.label(pk, structure=np.ones((3, 3)))
        for im in (img, img.astype(np.float64)):
            for wsl in (False, True):
                a = K.watershed_components(im, mk, fg, watershed_line=wsl, negate=True)
                b = K.watershed_components(-im, mk, fg, watershed_line=wsl)
                assert np.array_equal(a, b)
    assert rng is not None


def test_rgb_to_od_lut():
    from ihcscore.stains import rgb_to_od
    rng = np.random.default_rng(8)
    for shape in ((1, 1, 3), (17, 5, 3), (40, 33, 4)):
        rgb = rng.integers(0, 256, shape).astype(np.uint8)
        for bg in ((255, 255, 255), (240.5, 231.0, 250.0)):
            assert np.array_equal(K.rgb_to_od(rgb, bg), rgb_to_od(rgb, bg))
    rgb = rng.integers(0, 256, (9, 7, 3)).astype(np.uint8)[:, ::2]  # non-contiguous view
    assert np.array_equal(K.rgb_to_od(rgb), rgb_to_od(rgb))


def test_grey_erosion_sequence_equals_skimage_on_edge_cases(region):
    """Tiny, one-row and one-column images, plateaus, signed zeros, other dtypes and any 3x3
    footprints (each one a stage of the streamed sweep)."""
    rng = np.random.default_rng(9)
    ims = _edge_images(rng) + [np.round(region[0][:50, :61] * 4) / 4, region[0][:33, :1], region[0][:1, :40]]
    zeros = rng.choice(np.array([0.0, -0.0, 1.0], np.float32), (23, 19))  # ties between -0.0 and 0.0
    ims += [zeros, zeros.astype(np.float64), (region[0][:40, :37] * 60).astype(np.uint8)]
    seqs = [morphology.disk(r, decomposition="sequence") for r in (1, 2, 5, 16)]
    seqs += [np.ones((3, 3), bool), np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], bool),
             ((np.ones((3, 3)), 2),), ((np.ones((3, 3)), 1), (morphology.disk(1), 2))]
    for _ in range(6):
        seqs.append(tuple((fp | (rng.random((3, 3)) < 0.3), int(rng.integers(1, 4)))
                          for fp in np.zeros((int(rng.integers(1, 5)), 3, 3), bool)))
    for img in ims:
        for fp in seqs:
            fps = fp if isinstance(fp, np.ndarray) else [(f, n) for f, n in fp if f.any()]
            if len(fps) == 0:
                continue
            assert _same_bits(K.grey_erosion_sequence(img, fps), morphology.erosion(img, fps)), (img.shape, fp)
    with pytest.raises(ValueError):
        K.grey_erosion_sequence(ims[0], morphology.disk(2))


def test_binary_3x3_equals_scipy(region):
    rng = np.random.default_rng(11)
    img = region[0]
    masks = [img > np.quantile(img, q) for q in (0.2, 0.6, 0.95)]
    masks += [rng.random(shape) < p for shape in ((1, 1), (1, 9), (8, 1), (2, 2), (3, 3), (2, 7), (37, 53))
              for p in (0.3, 0.9)]
    masks += [np.ones((6, 5), bool), np.zeros((6, 5), bool), np.ones((1, 1), bool), np.ones((1, 4), bool),
              np.ones((4, 1), bool), np.ones((3, 3), bool)]
    s = np.ones((3, 3))
    for m in masks:
        for view in (m, m[:, ::-1].T):  # also a non-contiguous input
            e, d = K.binary_erosion_3x3(view), K.binary_dilation_3x3(view)
            assert e.dtype == bool and d.dtype == bool
            assert np.array_equal(e, ndi.binary_erosion(view, structure=s)), m.shape
            assert np.array_equal(d, ndi.binary_dilation(view, structure=s)), m.shape
    x = (rng.random((20, 21)) * 3).astype(np.int32)  # non-zero is True
    assert np.array_equal(K.binary_erosion_3x3(x), ndi.binary_erosion(x, structure=s))
    assert np.array_equal(K.binary_dilation_3x3(x), ndi.binary_dilation(x, structure=s))


def _bool_images(seed=11):
    """Binary images: odd and degenerate shapes, empty / full / sparse / dense, checkerboards
    (components joined only diagonally), True on the borders."""
    rng = np.random.default_rng(seed)
    ims = [np.zeros((0, 5), bool), np.zeros((1, 1), bool), np.ones((1, 1), bool), np.ones((1, 9), bool),
           np.ones((9, 1), bool), np.zeros((7, 8), bool), np.ones((7, 8), bool),
           (np.indices((9, 12)).sum(0) % 2).astype(bool), (np.indices((8, 8)).sum(0) % 2 == 0)]
    for _ in range(40):
        h, w = rng.integers(1, 60, 2)
        ims.append(rng.random((h, w)) < rng.choice([0.002, 0.05, 0.3, 0.5, 0.7, 0.95]))
    return ims


def test_label_equals_scipy(region):
    """Same labels (numbering included), dtype and count as scipy, both connectivities."""
    ims = _bool_images() + [region[1] > 0, region[0] > np.quantile(region[0], 0.6)]
    for x in ims:
        for conn, structure in ((1, None), (2, np.ones((3, 3)))):
            a, n = K.label(x, conn)
            b, m = ndi.label(x, structure=structure)
            assert n == m and a.dtype == b.dtype and np.array_equal(a, b), (x.shape, conn)
    with pytest.raises(ValueError):
        K.label(np.ones((3, 3), bool), 3)


def test_label_stats_many_equals_separate_label_stats(region):
    """All compartments in one pass give each compartment's own statistics (bincount sums,
    scipy min/max), for one to three images, labels beyond ``n``, negative and empty labels."""
    img, lab = region
    cells = segmentation.expand_labels(lab, 4)
    nuclei = np.where(lab > 0, cells, 0)
    cyto = np.where(lab > 0, 0, cells)
    ring = K.membrane_ring(cells, 2.0)
    odd = cells.copy()
    odd[:5] = -3
    odd[-5:] = cells.max() + 7  # beyond n: ignored
    rng = np.random.default_rng(1)
    planes = [img, rng.random(img.shape).astype(np.float32), np.round(img * 4).astype(np.float32) / 4]
    n = int(cells.max()) + 2  # two empty labels
    for K_ in (1, 2, 3):
        ims = planes[:K_]
        many = K.label_stats_many([nuclei, cyto, ring, cells, odd], ims, n)
        for labs, got in zip((nuclei, cyto, ring, cells, odd), many):
            count, s, s2, mn, mx = got
            inside = (labs > 0) & (labs <= n)
            flat = np.where(inside, labs, 0).ravel()
            assert np.array_equal(count, np.bincount(flat, minlength=n + 1)[1:])
            idx = np.arange(1, n + 1)
            for k, im in enumerate(ims):
                v = im.ravel().astype(np.float64)
                assert np.array_equal(s[k], np.bincount(flat, weights=v, minlength=n + 1)[1:])
                assert np.array_equal(s2[k], np.bincount(flat, weights=v * v, minlength=n + 1)[1:])
                present = count > 0
                lab2 = np.where(inside, labs, 0)
                assert np.array_equal(mx[k][present], ndi.maximum(im, lab2, idx[present]))
                assert np.array_equal(mn[k][present], ndi.minimum(im, lab2, idx[present]))
                assert np.isnan(mx[k][~present]).all() and np.isnan(mn[k][~present]).all()
            single = K.label_stats(labs, ims, n)
            assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(got, single))
    # the measurement table's path: label_statistics of each compartment alone is the same
    from ihcscore.measure import label_statistics_many
    chans = {"A": planes[0], "B": planes[1]}
    for labs, st in zip((nuclei, cells), label_statistics_many([nuclei, cells], chans, n)):
        ref = label_statistics(labs, chans, n)
        assert st.keys() == ref.keys()
        assert all(np.array_equal(st[k], ref[k], equal_nan=True) for k in st)
    # tiny and empty label images
    c, *_ = K.label_stats(np.ones((1, 1), np.int32), [np.ones((1, 1), np.float32)], 1)
    assert c.tolist() == [1]
    c, *_ = K.label_stats(np.zeros((0, 4), np.int32), [np.zeros((0, 4), np.float32)], 2)
    assert c.tolist() == [0, 0]


def test_bincount_sum_runs_and_edges():
    """Long runs, single pixels, all-background, out-of-range labels (numpy's answer)."""
    rng = np.random.default_rng(3)
    w = rng.random((37, 53)).astype(np.float32)
    cases = [np.zeros((37, 53), np.int32), np.full((37, 53), 4, np.int32),
             np.repeat(rng.integers(0, 6, (37, 1)), 53, axis=1).astype(np.int32),
             rng.integers(0, 6, (37, 53)).astype(np.int32)]
    for lab in cases:
        c, s = K.bincount_sum(lab, w, 5)
        assert np.array_equal(c, np.bincount(lab.ravel(), minlength=6))
        assert np.array_equal(s, np.bincount(lab.ravel(), weights=w.ravel(), minlength=6))
    bad = cases[3].copy()
    bad[3, 3] = -1
    with pytest.raises(ValueError):  # numpy's own error for negative labels
        K.bincount_sum(bad, w, 5)


def test_membrane_ring_equals_distance_reference_on_edge_cases():
    """The row-vectorised stencil against the distance-transform definition (from the kernel's
    own inner boundaries: skimage's differ on images of one pixel's width): tiny images, labels
    on the borders, one label everywhere, widths whose stencil is wider than the image."""
    rng = np.random.default_rng(4)
    cases = [np.ones((1, 1), np.int32), np.ones((1, 7), np.int32), np.ones((6, 1), np.int32),
             np.full((5, 6), 3, np.int32), np.zeros((4, 4), np.int32)]
    for _ in range(30):
        h, w = rng.integers(1, 30, 2)
        lab, _ = ndi.label(rng.random((h, w)) < 0.6)
        cases.append(segmentation.expand_labels(lab, 2).astype(np.int32))
    for cells in cases:
        b = K.find_inner_boundaries(cells)
        dist = ndi.distance_transform_edt(~b) if b.any() else np.full(b.shape, np.inf)
        for w in (0.5, 1.0, 1.5, 2.0, 3.3, 5.9, 8.0):
            ref = np.where((cells > 0) & (dist < w), cells, 0)
            assert np.array_equal(K.membrane_ring(cells, w), ref), (cells.shape, w)


def test_expand_row_passes_agree():
    """The offset scan (small reach) and the parabola envelope pick the same label for every
    reach the scan serves, ties included (the scan's upper limit and just past it too)."""
    rng = np.random.default_rng(6)
    for it in range(60):
        h, w = rng.integers(1, 70, 2)
        dens = rng.choice([0.002, 0.02, 0.1, 0.4])
        lab = np.where(rng.random((h, w)) < dens, rng.integers(1, 5, (h, w)), 0).astype(np.int32)
        for R in list(range(0, 7)) + [K._EXPAND_NEAR_MAX_R]:
            for max_d2 in {R * R, R * R + R, R * R + 2 * R}:
                dy = np.empty(lab.shape, np.int16)
                K._expand_columns(lab, R, dy)
                a = np.empty_like(lab)
                K._expand_near(lab, R, max_d2, a, dy)
                b = np.empty_like(lab)
                K._expand_bounded(lab, R, max_d2, b, np.empty(lab.shape, np.int16))
                assert np.array_equal(a, b), (it, R, max_d2)
    for dist in (K._EXPAND_NEAR_MAX_R, K._EXPAND_NEAR_MAX_R + 0.5, K._EXPAND_NEAR_MAX_R + 1):
        lab = np.where(rng.random((90, 80)) < 0.01, rng.integers(1, 5, (90, 80)), 0).astype(np.int32)
        assert np.array_equal(K.expand_labels(lab, dist), K._expand_labels_ft(lab, dist))


@pytest.mark.parametrize("line", [False, True])
def test_watershed_components_edge_cases(line):
    """Against the whole-image reference: empty and full masks, one-row / one-column images
    (both column borders at once), markers on the borders and outside the mask, plateaus,
    -0.0 beside 0.0, one label split over several markers, float32 and float64."""
    rng = np.random.default_rng(9)
    cases = []
    for shape in ((1, 1), (1, 17), (17, 1), (2, 2), (13, 11), (40, 3)):
        img = rng.integers(0, 3, shape).astype(np.float32)  # plateaus, exact ties
        mk = np.where(rng.random(shape) < 0.2, rng.integers(1, 4, shape), 0).astype(np.int32)
        mk[0, 0] = 1
        mk[-1, -1] = 2
        for m in (np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.7):
            cases.append((img, mk, m))
    img = np.where(rng.random((30, 30)) < 0.5, np.float32(-0.0), np.float32(0.0))
    mk = np.zeros((30, 30), np.int32)
    mk[0, 0], mk[29, 29], mk[0, 29], mk[15, 15] = 1, 2, 3, 1
    cases.append((img, mk, None))
    for img, mk, m in cases:
        for im in (img, img.astype(np.float64)):
            ref = _raster_watershed(im, mk, m, line)
            assert np.array_equal(K.watershed_components(im, mk, m, line), ref), (img.shape, line)
            ref = _raster_watershed(-im, mk, m, line)
            assert np.array_equal(K.watershed_components(im, mk, m, line, negate=True), ref)


def test_label_order_and_extent_helpers():
    """first_pixel_index / label_boxes against numpy and ndi.find_objects; paste_labels against copyto;
    apply_lut against fancy indexing."""
    rng = np.random.default_rng(12)
    for shape in ((1, 1), (1, 9), (9, 1), (37, 23)):
        lab = rng.integers(0, 7, shape).astype(np.int32)
        lab[lab == 3] = 0  # an absent label
        n = 8  # two labels past the largest one present
        flat = lab.ravel()
        first = K.first_pixel_index(lab, n)
        box = K.label_boxes(lab, n)
        slices = ndi.find_objects(lab, max_label=n)
        for i in range(1, n + 1):
            hits = np.flatnonzero(flat == i)
            assert first[i - 1] == (hits[0] if len(hits) else -1)
            sl = slices[i - 1]
            assert tuple(box[i - 1]) == ((sl[0].start, sl[0].stop, sl[1].start, sl[1].stop) if sl else (-1,) * 4)
        lut = rng.integers(-1, 3, n + 1).astype(np.int32)
        lut[0] = 0
        dst = rng.integers(0, 5, (shape[0] + 4, shape[1])).astype(np.int32)
        ref = dst.copy()
        moved = lut[lab]
        np.copyto(ref[2:2 + shape[0]], moved, where=moved > 0)
        K.paste_labels(lab, lut, dst[2:2 + shape[0]])
        assert np.array_equal(dst, ref)
        assert np.array_equal(K.apply_lut(lut, lab), lut[lab])
        assert np.array_equal(K.apply_lut(lut > 0, lab[:, ::-1]), (lut > 0)[lab[:, ::-1]])  # bool, a view


def test_fill_holes_edge_cases():
    """Run-based fill_holes against scipy: empty/full masks, single rows and columns, holes
    touching nothing but the border, nested holes, one-pixel holes, random masks."""
    rng = np.random.default_rng(4)
    masks = []
    for shape in ((1, 1), (1, 9), (9, 1), (2, 2), (3, 3), (5, 7), (64, 33)):
        masks += [np.zeros(shape, bool), np.ones(shape, bool)]
        for p in (0.3, 0.6, 0.8):
            masks.append(rng.random(shape) < p)
    ring = np.ones((9, 9), bool)
    ring[1:-1, 1:-1] = False
    ring[3:6, 3:6] = True
    ring[4, 4] = False  # a hole inside an island inside a hole
    masks.append(ring)
    masks.append(~ring)
    open_left = ring.copy()
    open_left[4, 0] = False  # background reaches the border only through one pixel
    masks.append(open_left)
    diag = np.ones((5, 5), bool)
    diag[1, 1] = diag[2, 2] = diag[3, 3] = False  # diagonal only: three separate holes
    masks.append(diag)
    comb = np.ones((6, 12), bool)
    comb[1:5, 1::2] = False  # teeth joined by a row below (one U-shaped hole each side)
    comb[4, 1:11] = False
    masks.append(comb)
    for m in masks:
        assert np.array_equal(K.fill_holes(m), ndi.binary_fill_holes(m)), m.shape


# --------------------------------------------------------------------------- label_contours / label_polygons

def _contours_reference(labels, ids=None):
    """``{lab: (longest find_contours contour, box start)}``, as label_polygons traced them before."""
    from skimage import measure
    slices = ndi.find_objects(labels)
    wanted = range(1, len(slices) + 1) if ids is None else ids
    out = {}
    for lab in wanted:
        sl = slices[lab - 1] if lab - 1 < len(slices) else None
        if sl is None:
            continue
        contours = measure.find_contours(np.pad(labels[sl] == lab, 1).astype(np.float32), 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        if len(c) < 4:
            continue
        out[lab] = (c, (sl[0].start, sl[1].start))
    return out


def _geos_version():
    import shapely
    return shapely.geos_version


#: kernels.simplify_rings follows GEOS >= 3.12 on rings (the start point may be dropped); the shapely oracle
#: of older GEOS simplifies rings differently, so the comparisons would not hold there.
needs_geos_312 = pytest.mark.skipif(_geos_version() < (3, 12, 0), reason="shapely's GEOS older than 3.12")


def _label_polygons_reference(labels, ids=None, *, origin_px=(0.0, 0.0), downsample=1.0, grid_origin=(0, 0)):
    """``ihcscore.measure.label_polygons`` before ``kernels.label_contours`` (find_contours per object)
    and ``kernels.simplify_rings`` (shapely's GEOS Douglas-Peucker)."""
    import shapely
    from skimage import measure
    slices = ndi.find_objects(labels)
    wanted = range(1, len(slices) + 1) if ids is None else ids
    found, rings = [], []
    for lab in wanted:
        sl = slices[lab - 1] if lab - 1 < len(slices) else None
        if sl is None:
            continue
        mask = np.pad(labels[sl] == lab, 1).astype(np.float32)
        contours = measure.find_contours(mask, 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        if len(c) < 4:
            continue
        r = (c[:, 0] - 1 + sl[0].start + grid_origin[0] + 0.5) * downsample + origin_px[1]
        x = (c[:, 1] - 1 + sl[1].start + grid_origin[1] + 0.5) * downsample + origin_px[0]
        found.append(lab)
        rings.append(shapely.linearrings(np.column_stack([x, r])))
    if not rings:
        return {}
    simple = shapely.simplify(np.asarray(rings, dtype=object), 0.5 * downsample, preserve_topology=False)
    coords, index = shapely.get_coordinates(simple, return_index=True)
    splits = np.searchsorted(index, np.arange(1, len(found)))
    out = {}
    for lab, ring in zip(found, np.split(coords, splits)):
        if len(ring) >= 4:
            out[lab] = ring
    return out


def _assert_contours_equal(labels, ids=None):
    ref = _contours_reference(labels, ids)
    found, offsets, coords, origin = K.label_contours(labels, ids)
    assert found.tolist() == list(ref)
    for k, lab in enumerate(found.tolist()):
        c, start = ref[lab]
        got = coords[offsets[k]:offsets[k + 1]]
        assert got.shape == c.shape and np.array_equal(got, c), lab
        assert tuple(origin[k]) == start
    return ref


def _contour_edge_cases():
    """Label images with holes, diagonal-only contacts (several contours), thin and border objects."""
    z = np.zeros((9, 9), np.int32)
    yield z  # empty
    yield np.ones((5, 7), np.int32)  # one object filling the image (touches every border)
    yield np.ones((1, 1), np.int32)
    yield np.array([[0, 3, 0, 3, 0, 3]], np.int32)  # 1-row image, one label in three pieces (ties)
    ring = np.ones((7, 7), np.int32)
    ring[2:5, 2:5] = 0  # hole
    ring[3, 3] = 2  # an object inside the hole
    yield ring
    diag = np.zeros((8, 8), np.int32)
    diag[[1, 2, 3, 4], [1, 2, 3, 4]] = 1  # diagonal chain: one contour per pixel, all of length 5
    diag[6, 0:3] = 1  # a longer piece later in raster order: it wins
    diag[0, 7] = 2
    diag[1, 6] = 2  # two pixels touching at a corner
    yield diag
    checker = (np.indices((6, 6)).sum(0) % 2).astype(np.int32)  # only diagonal contacts
    yield checker
    yield checker * 3 + (1 - checker)  # two interleaved labels
    tie = np.zeros((6, 9), np.int32)
    tie[1:3, 1:3] = 5  # two equal squares, diagonally apart: the first (raster) one wins
    tie[3:5, 3:5] = 5
    tie[0:2, 6:8] = 5
    yield tie
    line = np.zeros((5, 12), np.int32)
    line[2, 1:11] = 1  # 1-row object
    line[0:5, 11] = 2  # 1-column object on the border
    line[4, 0] = 3  # 1-pixel object in a corner
    yield line
    spiral = np.zeros((11, 11), np.int32)
    spiral[1, 1:10] = 1
    spiral[1:10, 9] = 1
    spiral[9, 1:10] = 1
    spiral[3:10, 1] = 1
    spiral[3, 1:8] = 1
    spiral[3:8, 7] = 1
    spiral[7, 3:8] = 1
    spiral[5, 5] = 1  # isolated pixel inside, touching nothing
    yield spiral


@pytest.mark.parametrize("labels", list(_contour_edge_cases()), ids=lambda a: f"{a.shape}")
def test_label_contours_edge_cases(labels):
    _assert_contours_equal(labels)
    assert _label_polygons_dicts_equal(labels)


def test_label_contours_random_masks():
    rng = np.random.default_rng(7)
    n_multi = 0
    for i in range(150):
        h, w = rng.integers(1, 40, 2)
        if i % 3 == 0:  # blobs with holes and diagonal contacts
            lab = (ndi.gaussian_filter(rng.random((h, w)), 1.5) > 0.5).astype(np.int32)
            lab = ndi.label(lab)[0].astype(np.int32) if i % 2 else lab
        else:  # noise: many contours per label
            lab = (rng.random((h, w)) < rng.uniform(0.2, 0.8)) * rng.integers(1, 5, (h, w))
            lab = lab.astype(np.int32)
        ref = _assert_contours_equal(lab)
        n_multi += sum(ndi.label(lab == k)[1] > 1 for k in ref)  # 4-connected pieces: several contours
        ids = rng.permutation(np.arange(0, 7))  # any order; missing and out-of-range labels skipped
        ids = ids[ids > 0]
        _assert_contours_equal(lab, ids.tolist())
    assert n_multi > 50  # the choice among several contours was exercised


def test_label_contours_dtypes():
    lab = np.zeros((6, 6), np.uint16)
    lab[1:4, 2:5] = 300
    lab[5, 5] = 2
    for dt in (np.uint16, np.int32, np.int64, np.uint32):
        _assert_contours_equal(lab.astype(dt))


def _label_polygons_dicts_equal(labels, **kw):
    from ihcscore.measure import label_polygons
    new = label_polygons(labels, **kw)
    old = _label_polygons_reference(labels, **kw)
    return list(new) == list(old) and all(
        new[k].dtype == old[k].dtype and np.array_equal(new[k], old[k]) for k in old)


@pytest.fixture(scope="module")
def analysed_region():
    from ihcscore.pipeline import analyze_region
    from ihcscore.preset import load_preset
    from ihcscore.synthetic import make_synthetic_region
    rgb, _, _ = make_synthetic_region((512, 512), 0.5, seed=1)
    return analyze_region(rgb, 0.5, load_preset("cxcr4")).segmentation


@needs_geos_312
@pytest.mark.parametrize("which", ["nuclei", "cells"])
def test_label_polygons_on_segmentation(analysed_region, which):
    labels = getattr(analysed_region, which)
    ref = _assert_contours_equal(labels)
    assert len(ref) > 100
    assert _label_polygons_dicts_equal(labels)
    assert _label_polygons_dicts_equal(labels, origin_px=(1234.0, 567.5), downsample=2.0)
    assert _label_polygons_dicts_equal(labels, ids=[5, 3, 10 ** 6, 17])
    # non-integer downsamples: vertices off the half-pixel grid, tolerance 0.5 * downsample
    assert _label_polygons_dicts_equal(labels, downsample=1.9782, grid_origin=(4321, 98765))
    assert _label_polygons_dicts_equal(labels, downsample=0.7, origin_px=(-5.5, 1e5 + 0.1), grid_origin=(3, -2))


def _ring_cases(rng):
    """Closed rings: grid points with repeats and collinear runs, noisy circles, lines with one bump."""
    for t in range(3000):
        n = int(rng.integers(3, 40))
        if t % 3 == 0:
            pts = rng.integers(-4, 5, (n, 2)) * 0.5
        elif t % 3 == 1:
            ang = np.sort(rng.random(n)) * 2 * np.pi
            pts = np.column_stack([np.cos(ang), np.sin(ang)]) * rng.uniform(0.3, 5) + rng.normal(0, 0.2, (n, 2))
        else:
            pts = np.column_stack([np.arange(n) * 0.5, np.zeros(n)])
            pts[rng.integers(n)] += rng.normal(0, 1, 2)
        yield np.vstack([pts, pts[:1]]).astype(np.float64), float(rng.choice([0.0, 0.25, 0.5, 0.98891, 1.0]))


@needs_geos_312
def test_simplify_rings_equals_geos():
    import shapely
    rng = np.random.default_rng(3)
    cases = list(_ring_cases(rng))
    n_moved = n_collapsed = 0
    for tol in (0.0, 0.25, 0.5, 0.98891, 1.0):
        rings = [pts for pts, t in cases if t == tol]
        offsets = np.cumsum([0] + [len(p) for p in rings])
        kept, out_offsets, out = K.simplify_rings(np.concatenate(rings), offsets, tol)
        simple = shapely.simplify(shapely.linearrings(np.concatenate(rings), indices=np.repeat(
            np.arange(len(rings)), np.diff(offsets))), tol, preserve_topology=False)
        ref = [shapely.get_coordinates(g) for g in simple]
        want = [k for k, r in enumerate(ref) if len(r) >= 4]
        assert kept.tolist() == want and out.dtype == np.float64
        for j, k in enumerate(want):
            assert np.array_equal(out[out_offsets[j]:out_offsets[j + 1]], ref[k]), (tol, rings[k])
            n_moved += not np.array_equal(ref[k][0], rings[k][0])
        n_collapsed += len(rings) - len(want)
    # GEOS's ring step (start point dropped, also from a 4-point ring) and collapsed rings were exercised
    assert n_moved > 100 and n_collapsed > 100
    kept, out_offsets, out = K.simplify_rings(np.empty((0, 2)), np.zeros(1, np.int64), 0.5)
    assert kept.size == 0 and out_offsets.tolist() == [0] and out.shape == (0, 2)
    with pytest.raises(ValueError):
        K.simplify_rings(cases[0][0], [0, len(cases[0][0])], -1.0)


@needs_geos_312
def test_label_polygons_edge_cases_at_non_integer_downsample():
    """Thin lines, 1-pixel and 2x1 objects, holes, border objects, collinear runs; rings collapsing."""
    img = np.zeros((30, 40), np.int32)
    img[0, 0] = 1  # 1 pixel in a corner
    img[5, 5:7] = 2  # 2x1
    img[8:10, 2] = 3  # 1x2
    img[2, 10:38] = 4  # long 1-row line: collinear runs
    img[5:28, 39] = 5  # 1-column line on the border
    img[10:20, 10:20] = 6
    img[13:16, 13:16] = 0  # hole
    for i in range(12):
        img[12 + i, 22 + i:24 + i] = 7  # thin diagonal staircase
    img[25:30, 0:8] = 8  # touches two borders
    from ihcscore.measure import label_polygons
    n_dropped = 0
    for kw in ({}, {"downsample": 2.0}, {"downsample": 1.9782, "grid_origin": (77, 12345)},
               {"downsample": 4.000123, "origin_px": (1000.25, 333.7)}):
        assert _label_polygons_dicts_equal(img, **kw)
        n_dropped += 8 - len(label_polygons(img, **kw))
    assert n_dropped > 0  # thin objects collapse (or not: at distances of exactly the tolerance, rounding decides)
    for labels in _contour_edge_cases():
        assert _label_polygons_dicts_equal(labels, downsample=1.9782, grid_origin=(5, 9))


def test_watershed_components_one_word_flood_equals_general_flood(region):
    """float32 without a line takes the one-word-key flood; float64 (exact widening, same
    order) the general one: identical labels on LoG data, plateaus, signed zeros, negate."""
    from ihcscore.cells import LAPLACIAN
    rng = np.random.default_rng(11)
    log = ndi.convolve(ndi.gaussian_filter(region[0], 2.0, mode="nearest"), LAPLACIAN, mode="nearest")
    log = log.astype(np.float32)
    fg = log > 0
    mk, _ = ndi.label(_local_maxima(log) & fg, structure=np.ones((3, 3)))
    ties = rng.integers(-2, 3, (50, 61)).astype(np.float32) * np.float32(0.5)
    ties[rng.random(ties.shape) < 0.2] = np.float32(-0.0)
    mt = np.where(rng.random(ties.shape) < 0.05, rng.integers(1, 6, ties.shape), 0).astype(np.int32)
    for img, m, msk in ((log, mk, fg), (ties, mt, rng.random(ties.shape) < 0.8), (ties, mt, None)):
        for neg in (False, True):
            a = K.watershed_components(img, m, msk, negate=neg)
            b = K.watershed_components(img.astype(np.float64), m, msk, negate=neg)
            assert np.array_equal(a, b)
            assert (a > 0).sum() > 0


def test_bin_mean_uint8_equals_numpy_block_sum():
    rng = np.random.default_rng(12)
    for k in (1, 2, 3, 8):
        for shape in ((k * 37, k * 29, 3), (k, k, 1), (0, k * 3, 3)):
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            h, w, c = shape[0] // k, shape[1] // k, shape[2]
            s = a.reshape(h, k, w, k, c).astype(np.uint32).sum(axis=(1, 3))
            np.testing.assert_array_equal(K.bin_mean_uint8(a, k), ((s + (k * k) // 2) // (k * k)).astype(np.uint8))
    assert K.bin_mean_uint8(np.full((16, 16, 3), 255, np.uint8), 16).tolist() == [[[255, 255, 255]]]  # no overflow
    with pytest.raises(ValueError, match="binned"):
        K.bin_mean_uint8(np.zeros((5, 4, 3), np.uint8), 2)


def _smooth_ring_reference(ring, step):
    """QuPath's smoothing in plain numpy: resample every `step`, average every second point with its two
    neighbours, resample every min(2, 0.1 * points) * step (evenly, from the first vertex)."""
    def resample(pts, spacing):
        closed = np.vstack([pts, pts[:1]])
        seg = np.hypot(*np.diff(closed, axis=0).T)
        cum = np.concatenate([[0], np.cumsum(seg)])
        m = max(3, int(np.floor(cum[-1] / spacing + 0.5)))
        t = np.arange(m) * (cum[-1] / m)
        return np.column_stack([np.interp(t, cum, closed[:, 0]), np.interp(t, cum, closed[:, 1])])

    a = resample(ring[:-1], step)
    b = ((np.roll(a, 1, axis=0) + a + np.roll(a, -1, axis=0)) / 3)[::2]
    c = resample(b, min(2.0, 0.1 * len(b)) * step)
    return np.vstack([c, c[:1]])


@pytest.mark.parametrize("step", [1.0, 2.2017])
def test_smooth_rings_is_qupaths_smoothing(step):
    from skimage.draw import disk

    from ihcscore.measure import label_outlines

    labels = np.zeros((120, 160), np.int32)
    labels[disk((40, 50), 25)] = 1
    labels[disk((90, 120), 4)] = 2
    labels[10:14, 130:150] = 3
    found, offsets, xy = label_outlines(labels, downsample=step)
    out_offsets, out = K.smooth_rings(xy, offsets, step)
    assert len(out_offsets) == len(offsets)
    for k in range(len(found)):
        ring, got = xy[offsets[k]:offsets[k + 1]], out[out_offsets[k]:out_offsets[k + 1]]
        np.testing.assert_allclose(got, _smooth_ring_reference(ring, step), atol=1e-9)
        # smoothing rounds corners off but keeps the object's size
        from shapely import Polygon
        assert Polygon(got).area == pytest.approx(Polygon(ring).area, rel=0.12)


def test_smoothed_outlines_keep_objects_of_a_few_pixels():
    from ihcscore.measure import label_polygons

    labels = np.zeros((20, 20), np.int32)
    labels[5, 5:7] = 2  # two pixels: its smoothed ring collapses, its traced ring is kept
    labels[10:15, 10:15] = 1
    plain, smooth = label_polygons(labels), label_polygons(labels, smooth=True)
    assert set(smooth) == set(plain) == {1, 2}
    np.testing.assert_array_equal(smooth[2], plain[2])
    assert not np.array_equal(smooth[1], plain[1])
