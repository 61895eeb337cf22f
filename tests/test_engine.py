"""Detection, measurement and scoring of one region against computed truth."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from skimage import data, draw

from ihcscore.cells import DetectionParams, compartments, expand_cells
from ihcscore.measure import label_statistics, measure_cells
from ihcscore.cells import Segmentation
from ihcscore.pipeline import analyze_region, resample_to_grid
from ihcscore.preset import load_preset
from ihcscore.synthetic import make_synthetic_region, truth_scores

MATCH_RADIUS_UM = 4.0


def match(truth_xy, found_xy, radius_px):
    """One-to-one matching of centroids within ``radius_px`` (Hungarian)."""
    if len(truth_xy) == 0 or len(found_xy) == 0:
        return np.array([], int), np.array([], int)
    d = cdist(truth_xy, found_xy)
    ri, ci = linear_sum_assignment(d)
    ok = d[ri, ci] <= radius_px
    return ri[ok], ci[ok]


@pytest.fixture(scope="module")
def synthetic():
    rgb, truth, _ = make_synthetic_region((1024, 1024), 0.5, seed=7, dab_location="cell")
    result = analyze_region(rgb, 0.5, load_preset("cxcr4"))
    return rgb, truth, result


def test_detection_f1_on_synthetic(synthetic):
    _, truth, result = synthetic
    ti, ci = match(truth[["x_px", "y_px"]].to_numpy(), result.cells[["x_px", "y_px"]].to_numpy(),
                   MATCH_RADIUS_UM / 0.5)
    precision = len(ci) / len(result.cells)
    recall = len(ti) / len(truth)
    f1 = 2 * precision * recall / (precision + recall)
    assert f1 >= 0.9, (precision, recall)


def test_bins_match_truth(synthetic):
    _, truth, result = synthetic
    ti, ci = match(truth[["x_px", "y_px"]].to_numpy(), result.cells[["x_px", "y_px"]].to_numpy(), 8)
    accuracy = np.mean(truth["bin"].to_numpy()[ti] == result.cells["bin"].to_numpy()[ci])
    assert accuracy >= 0.9


def test_tumour_h_score_close_to_truth_and_all_cells_biased(synthetic):
    _, truth, result = synthetic
    true = truth_scores(truth, (0.2, 0.4, 0.6))
    ours = result.summary
    assert abs(ours["tumour"]["h_score"] - true["tumour"]["h_score"]) <= 10
    assert abs(ours["all"]["h_score"] - true["all"]["h_score"]) <= 10
    # Lymphocytes are strongly positive: the all-cell score is visibly higher than the tumour truth.
    assert ours["all"]["h_score"] - true["tumour"]["h_score"] > 10
    assert ours["tumour"]["n"] < ours["all"]["n"]


def test_every_compartment_reported(synthetic):
    _, _, result = synthetic
    for group in ("tumour", "all"):
        by = result.summary[group]["by_compartment"]
        assert set(by) == {"nucleus", "cytoplasm", "membrane", "cell"}
        assert all(by[c]["n"] > 0 and by[c]["h_score"] is not None for c in by)


def test_skimage_ihc_scores_finite_and_deterministic():
    rgb = data.immunohistochemistry()
    preset = load_preset("cxcr4")
    a = analyze_region(rgb, 0.5, preset)
    b = analyze_region(rgb, 0.5, preset)
    assert len(a.cells) > 100
    for group in ("tumour", "all"):
        h = a.summary[group]["h_score"]
        assert h is not None and 0 <= h <= 300
        assert abs(h - b.summary[group]["h_score"]) <= 1
    assert np.array_equal(a.cells["bin"].to_numpy(), b.cells["bin"].to_numpy())


def test_region_pixels_of_other_types_score_as_their_uint8_equivalent():
    """uint16 (full range, or 8-bit values in a wider type), float 0-1 and RGBA arrays are converted as the
    slide reader converts them (before, a cast wrapped or truncated them: 0 cells for float and full-range
    uint16)."""
    rgb = data.immunohistochemistry()[:256, :256]
    preset = load_preset("cxcr4")
    ref = analyze_region(rgb, 0.5, preset)
    assert len(ref.cells) > 20
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    for other in (rgb.astype(np.uint16) * 257, rgb.astype(np.uint16), rgb.astype(np.float32) / 255, rgba):
        got = analyze_region(other, 0.5, preset)
        pd.testing.assert_frame_equal(got.cells, ref.cells)


@pytest.mark.parametrize("mpp", [0, -0.5, float("nan"), float("inf"), "0.5"])
def test_region_pixel_size_must_be_positive_and_finite(mpp):
    with pytest.raises(ValueError, match="mpp must be a positive pixel size in µm/px"):
        analyze_region(np.full((64, 64, 3), 200, np.uint8), mpp, load_preset("cxcr4"))


def test_blank_glass_gives_no_cells_and_null_scores():
    rgb = np.full((300, 300, 3), 250, np.uint8)
    result = analyze_region(rgb, 0.5, load_preset("cxcr4"))
    assert len(result.cells) == 0
    assert result.summary["all"]["n"] == 0
    assert result.summary["all"]["h_score"] is None
    assert result.summary["tumour"]["percent_positive"] is None


def test_measurements_of_known_disks():
    """Areas, centroid and OD mean of painted disks come back exactly (pixel counts)."""
    nuclei = np.zeros((100, 160), np.int32)
    rr, cc = draw.disk((50, 40), 8)
    nuclei[rr, cc] = 1
    rr, cc = draw.disk((50, 110), 6)
    nuclei[rr, cc] = 2
    cells = expand_cells(nuclei, 4)
    cyto, membrane = compartments(nuclei, cells, 1.0)
    seg = Segmentation(nuclei, cells, cyto, membrane, pixel_size_um=0.5)
    stain = np.zeros((100, 160, 3), np.float32)
    stain[..., 1] = np.where(nuclei == 1, 0.7, 0.1)
    t = measure_cells(seg, stain, origin_px=(1000, 2000), downsample=2.0)
    a1 = (nuclei == 1).sum() * 0.25
    assert t.loc[0, "Nucleus: Area µm^2"] == pytest.approx(a1)
    assert t.loc[0, "Cell: Area µm^2"] == pytest.approx((cells == 1).sum() * 0.25)
    assert t.loc[0, "Nucleus: DAB OD mean"] == pytest.approx(0.7)
    assert t.loc[1, "Nucleus: DAB OD mean"] == pytest.approx(0.1)
    # Detection pixel (40, 50) covers level-0 pixels 1080-1081, [1080, 1082) in QuPath's convention: centre 1081.
    assert t.loc[0, "x_px"] == pytest.approx(1000 + 40.5 * 2)
    assert t.loc[0, "y_px"] == pytest.approx(2000 + 50.5 * 2)
    # Circularity of a digitised disk is close to 1; the perimeter close to 2 pi r.
    assert t.loc[0, "Nucleus: Perimeter µm"] == pytest.approx(2 * np.pi * 8 * 0.5, rel=0.1)
    assert t.loc[0, "Nucleus: Circularity"] > 0.85
    assert t.loc[0, "Nucleus: Eccentricity"] < 0.2



def test_level0_coordinates_follow_qupaths_pixel_convention():
    """Level-0 pixel k spans [k, k + 1) (QuPath's convention, that of GeoJSON annotations): a nucleus on
    pixels 20-23 has its outline from 20 to 24 and its centroid at 22, on any detection grid."""
    import shapely

    from ihcscore.measure import grid_to_level0, label_polygons
    from ihcscore.tissue import rasterize_geometries

    labels = np.zeros((40, 40), np.int32)
    labels[10:14, 20:24] = 1
    for ds, origin in ((1.0, (0, 0)), (2.0, (0, 0)), (2.2017, (5, 7))):
        ring = label_polygons(labels, downsample=ds, grid_origin=origin)[1]
        x0, y0 = origin[1] * ds, origin[0] * ds
        np.testing.assert_allclose(ring.min(axis=0), [x0 + 20 * ds, y0 + 10 * ds], atol=1e-9)
        np.testing.assert_allclose(ring.max(axis=0), [x0 + 24 * ds, y0 + 14 * ds], atol=1e-9)
        assert grid_to_level0(origin[1] + 21.5, ds) == pytest.approx(x0 + 22 * ds)
    # the annotation with the nucleus's outline rasterises to the nucleus's pixels, and holds its centroid
    square = shapely.box(20, 10, 24, 14)
    np.testing.assert_array_equal(rasterize_geometries([square], labels.shape, 1.0), labels == 1)
    assert shapely.contains_xy(square, 22.0, 12.0) and not shapely.contains_xy(shapely.box(22.5, 10, 24, 14), 22, 12)

def test_measure_cells_in_bands_is_identical():
    """Measuring in 1 or 5 row bands gives the same table bit for bit: cells across band edges,
    a band without cells, a label with no pixels, cells touching the image's first and last rows."""
    rng = np.random.default_rng(3)
    nuclei = np.zeros((1400, 90), np.int32)
    centres = [(0, 20), (279, 45), (281, 60), (560, 30), (1399, 70)] + [(int(r), int(c)) for r, c in
                                                                       zip(rng.integers(300, 1300, 40),
                                                                           rng.integers(5, 85, 40))]
    for i, (r, c) in enumerate(centres, start=1):
        rr, cc = draw.ellipse(r, c, 5 + i % 4, 3 + i % 3, shape=nuclei.shape, rotation=0.3 * i)
        nuclei[rr, cc] = i
    nuclei[nuclei == 7] = 0  # label 7 has no pixels left
    nuclei[560:900] = 0  # rows without cells (a band owns none)
    cells = expand_cells(nuclei, 4)
    cyto, membrane = compartments(nuclei, cells, 1.0)
    seg = Segmentation(nuclei, cells, cyto, membrane, pixel_size_um=0.5)
    stain = rng.random((1400, 90, 3)).astype(np.float32)
    one = measure_cells(seg, stain, origin_px=(1000, 2000), downsample=2.0, threads=1)
    five = measure_cells(seg, stain, origin_px=(1000, 2000), downsample=2.0, threads=5)
    pd.testing.assert_frame_equal(one, five, check_exact=True)
    assert np.isnan(one.loc[6, "Nucleus: DAB OD mean"]) and one.loc[6, "Nucleus: Area µm^2"] == 0


def test_compartments_partition_the_cell():
    nuclei = np.zeros((60, 60), np.int32)
    rr, cc = draw.disk((30, 22), 6)
    nuclei[rr, cc] = 1
    rr, cc = draw.disk((30, 40), 6)
    nuclei[rr, cc] = 2
    cells = expand_cells(nuclei, 10)
    cyto, membrane = compartments(nuclei, cells, 2.0)
    assert np.all((cyto > 0) == ((cells > 0) & (nuclei == 0)))
    assert np.all(cells[membrane > 0] == membrane[membrane > 0])
    # Membrane pixels lie on the cell's outer ring only: never deep inside.
    from scipy import ndimage as ndi

    inner = ndi.binary_erosion(cells == 1, iterations=3)
    assert not np.any(inner & (membrane == 1))
    # Cells grow by at most the expansion distance and never overlap (one label per pixel).
    assert (cells > 0).sum() > (nuclei > 0).sum()


def test_label_statistics_match_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(40, 40))
    img = rng.random((40, 40)).astype(np.float32)
    stats = label_statistics(labels, {"x": img}, 4)
    for lab in range(1, 5):
        v = img[labels == lab].astype(np.float64)
        assert stats["x mean"][lab - 1] == pytest.approx(v.mean())
        assert stats["x std dev"][lab - 1] == pytest.approx(v.std(ddof=1), abs=1e-6)  # sample std, as QuPath
        assert stats["x max"][lab - 1] == pytest.approx(v.max())
        assert stats["x min"][lab - 1] == pytest.approx(v.min())
    one = np.zeros((3, 3), int)
    one[1, 1] = 1
    assert label_statistics(one, {"x": img[:3, :3]}, 2)["x std dev"].tolist()[0] == 0.0  # one pixel: no spread
    assert np.isnan(label_statistics(one, {"x": img[:3, :3]}, 2)["x std dev"][1])  # no pixel


def test_resample_is_independent_of_the_window():
    """A detection pixel gets the same value whichever tile window computes it."""
    rng = np.random.default_rng(1)
    src = rng.integers(0, 255, size=(400, 400, 3)).astype(np.float32)
    scale = 2.2
    whole = resample_to_grid(src, (0, 0), scale, (0, 0), (150, 150))
    part = resample_to_grid(src[100:300, 120:330], (100, 120), scale, (60, 70), (40, 50))
    assert np.allclose(part, whole[60:100, 70:120], atol=1e-3)


def test_od_sum_detection_finds_dab_heavy_nuclei():
    """Nuclear-marker detection (OD sum) finds strongly DAB-stained nuclei that hematoxylin misses."""
    rgb, truth, _ = make_synthetic_region((768, 768), 0.5, seed=3, dab_location="nucleus")
    strong = truth[truth["dab_od"] >= 0.6][["x_px", "y_px"]].to_numpy()
    assert len(strong) > 10
    ki67 = analyze_region(rgb, 0.5, load_preset("ki67"))
    ti, _ = match(strong, ki67.cells[["x_px", "y_px"]].to_numpy(), 8)
    assert len(ti) / len(strong) >= 0.9


def test_detection_params_validate():
    with pytest.raises(ValueError, match="detection.image"):
        DetectionParams(image="eosin")
    with pytest.raises(ValueError, match="max_area"):
        DetectionParams(min_area_um2=50, max_area_um2=10)


def test_filters_use_imagej_footprints_as_qupath():
    """QuPath's median and exclude-DAB filters are ImageJ rank filters: radius 2 covers 21 pixels (a
    plain disk 13), radius 2.5 is bumped to 2.85 and covers 29, radius 1.5 to 1.75 (13), radius 1 is 3x3."""
    from ihcscore.cells import _rank_filter_disk

    assert {r: int(_rank_filter_disk(r).sum()) for r in (1, 1.5, 2, 2.5)} == {1: 9, 1.5: 13, 2: 21, 2.5: 29}


def test_max_background_zero_turns_the_limit_off():
    """QuPath applies max background only when it is > 0; 0 rejected every region (0 cells)."""
    rgb = data.immunohistochemistry()[:256, :256]
    p = load_preset("cxcr4")
    off = analyze_region(rgb, 0.5, p.replace(max_background=0.0)).cells
    unlimited = analyze_region(rgb, 0.5, p.replace(max_background=1e9)).cells
    assert len(off) == len(unlimited) > 20


def test_refinement_erosion_repeats_the_image_edge():
    """ImageJ's 3x3 minimum repeats edge pixels: a nucleus cut by the image edge keeps its edge row."""
    from ihcscore.cells import _erode_3x3_repeating_edge

    mask = np.zeros((6, 6), bool)
    mask[:3, 1:5] = True  # touches the top edge
    eroded = _erode_3x3_repeating_edge(mask)
    np.testing.assert_array_equal(np.flatnonzero(eroded.any(axis=1)), [0, 1])
    assert eroded[0, 2:4].all() and not eroded[0, 1] and not eroded[2].any()


def test_valid_part_bounds_cells_whatever_the_threads():
    """segment_cells(valid=...) keeps nuclei and cells to the part that is image, also when threads would
    segment bands (the banded path dropped `valid`)."""
    from ihcscore.cells import segment_cells
    from ihcscore.stains import H_DAB_DEFAULT, rgb_to_od, unmix

    rgb, _, _ = make_synthetic_region((1400, 300), 0.5, seed=3, dab_location="cell")
    od = rgb_to_od(rgb, H_DAB_DEFAULT.background)
    stain_od = unmix(od, H_DAB_DEFAULT)
    params = load_preset("cxcr4").detection
    valid = (0, 0, 1400, 140)
    for threads in (1, 3):
        seg = segment_cells(od, stain_od, params, threads=threads, valid=valid)
        assert seg.cells[:, 140:].max() == 0 and seg.nuclei[:, 140:].max() == 0
        assert seg.cells[:, :140].max() > 50
