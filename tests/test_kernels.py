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
            assert np.array_equal(K.grey_erosion_sequence(img, fp), morphology.erosion(img, fp))
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


def test_gaussian_filter_bit_identical_to_scipy(region):
    rng = np.random.default_rng(4)
    ims = list(_images()) + [region[0], rng.random((1, 7)).astype(np.float32), rng.random((9, 1))]
    for img in ims:
        for dt in (np.float32, np.float64):
            x = img.astype(dt)
            for sigma in (0.75, 1.0, 3.0, 5.5):
                for mode in ("nearest", "reflect"):
                    a = K.gaussian_filter(x, sigma, mode=mode)
                    assert a.dtype == x.dtype
                    assert np.array_equal(a, ndi.gaussian_filter(x, sigma, mode=mode)), (x.shape, sigma, mode)


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
